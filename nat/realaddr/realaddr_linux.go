package realaddr

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
)

// Net is real-address mode, running: the local routes in Table, the
// policy rules that lead marked packets to them, and the nftables table
// whose sets hold the sessions' sockets. Dial opens the sockets; Close
// removes all of it.
type Net struct {
	// Set by Setup, read-only afterwards.
	cfg   Config
	log   *slog.Logger
	ns    nsID // the network namespace Setup ran in, where Dial's sockets must be made
	v6    bool // IPv6 is on: its route and rule are installed
	table *nftables.Table
	set4  *nftables.Set
	set6  *nftables.Set
	// closed is set first thing in Close.
	closed atomic.Bool

	// mu guards what was installed, which teardown removes once, and the
	// sockets with their elements: an element is added and removed, and
	// its socket closed, under mu, so that a socket that takes a released
	// one's port never loses its element to the release. The handles are
	// bound to the network namespace Setup ran in, so Dial and Close work
	// from any thread; nl is nil once torn down.
	mu      sync.Mutex
	nl      *netlink.Handle
	nft     *nftables.Conn
	routes  []netlink.Route
	rules   []netlink.Rule
	tableUp bool
	socks   map[*socket]struct{} // the sockets not released
	claims  map[string]int       // how many of them claim each element, by key
}

// Setup starts real-address mode in the calling thread's network
// namespace (the process's, unless the caller moved its thread). It
// removes what a crashed run left for the same Table and Name, checks
// that no other policy rule selects Mark, and installs (IPv6 only where
// IPv6 is on, as lo's disable_ipv6 says):
//
//	ip route:     local default dev lo table TABLE scope host
//	ip -6 route:  local default dev lo table TABLE
//	ip rule:      PRIORITY: from all fwmark MARK lookup TABLE
//	ip -6 rule:   PRIORITY: from all fwmark MARK lookup TABLE
//	nftables:     table inet iketcp_realaddr[_NAME] {
//	                set sessions4 { type ipv4_addr . inet_service . ipv4_addr . inet_service }
//	                set sessions6 { type ipv6_addr . inet_service . ipv6_addr . inet_service }
//	                chain output {
//	                  type route hook output priority mangle; policy accept;
//	                  ip daddr . udp dport . ip saddr . udp sport @sessions4 meta mark set MARK
//	                  ip6 daddr . udp dport . ip6 saddr . udp sport @sessions6 meta mark set MARK
//	                }
//	              }
//
// On failure it undoes what it did. Without CAP_NET_ADMIN the error wraps
// nat.ErrNeedsNetAdmin. One Table and Name serve one Net at a time: a
// second Setup with the same ones removes the first one's as stale.
func Setup(cfg Config) (*Net, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	n := newNet(cfg)
	if err := modeRealAddr.Run(n.start); err != nil {
		return nil, err
	}
	n.log.Info("real-address mode: sessions' sockets send from their clients' addresses",
		"table", cfg.Table, "priority", cfg.Priority, "mark", fmt.Sprintf("%#x", cfg.Mark),
		"nftables", n.table.Name, "ipv6", n.v6)
	return n, nil
}

func newNet(cfg Config) *Net {
	n := &Net{
		cfg:    cfg,
		log:    cfg.Logger,
		table:  &nftables.Table{Name: cfg.tableName(), Family: nftables.TableFamilyINet},
		socks:  make(map[*socket]struct{}),
		claims: make(map[string]int),
	}
	n.set4 = &nftables.Set{Table: n.table, Name: "sessions4", KeyType: sessionKey4, Concatenation: true}
	n.set6 = &nftables.Set{Table: n.table, Name: "sessions6", KeyType: sessionKey6, Concatenation: true}
	return n
}

// start is Setup's work, on one thread: it removes what a crashed run
// left, then sets up, and undoes a setup that fails.
func (n *Net) start() error {
	n.ns = threadNetns()
	h, nft, err := handles()
	if err != nil {
		return err
	}
	if err := removeStale(h, nft, n.cfg); err != nil {
		nft.CloseLasting()
		h.Close()
		return err
	}
	n.nl, n.nft = h, nft
	if err := n.setup(); err != nil {
		n.closed.Store(true)
		return setup.Undo(err, n.teardown)
	}
	return nil
}

// handles opens the netlink sockets of a setup or a clean-up in the
// calling thread's namespace.
func handles() (*netlink.Handle, *nftables.Conn, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, nil, fmt.Errorf("real-address mode: open a netlink socket: %w", err)
	}
	// Lasting: the socket, made now, stays in this namespace for Dial and
	// Close.
	nft, err := nftables.New(nftables.AsLasting())
	if err != nil {
		h.Close()
		return nil, nil, modeRealAddr.Failed("open an nftables netlink socket (is nf_tables available?)", err)
	}
	return h, nft, nil
}

// setup installs the routes, the rules and the table, recording each as
// it goes so that teardown can undo a partial setup.
func (n *Net) setup() error {
	cfg := &n.cfg
	if err := n.checkMarkFree(); err != nil {
		return err
	}
	n.v6 = ipv6On()
	if !n.v6 {
		n.log.Info("real-address mode: IPv6 is off on this host (lo's disable_ipv6); serving IPv4 clients only")
	}
	lo, err := n.nl.LinkByName("lo")
	if err != nil {
		return modeRealAddr.Failed("find the loopback device lo", err)
	}
	for _, fam := range families(n.v6) {
		r := localRoute(fam, lo.Attrs().Index, cfg.Table)
		if err := n.nl.RouteAdd(&r); err != nil {
			return modeRealAddr.Failed("add "+setup.DescribeRoute(r, ""), err)
		}
		n.routes = append(n.routes, r)
		if err := setup.Installed(setup.DescribeRoute(r, "")); err != nil {
			return err
		}
	}
	for _, fam := range families(n.v6) {
		r := markRule(fam, cfg)
		if err := n.nl.RuleAdd(&r); err != nil {
			return modeRealAddr.Failed("add "+setup.DescribeRule(r), err)
		}
		n.rules = append(n.rules, r)
		if err := setup.Installed(setup.DescribeRule(r)); err != nil {
			return err
		}
	}
	if err := n.installTable(); err != nil {
		return err
	}
	n.tableUp = true
	return setup.Installed("nftables table " + n.table.Name)
}

// checkMarkFree fails if a policy rule of the namespace already selects
// packets that carry Mark: the mode's rule would take that rule's
// packets, or it the mode's. Stale rules of the mode's are gone by now.
func (n *Net) checkMarkFree() error {
	for _, fam := range families(true) {
		rules, err := setup.ListRules(n.nl, fam)
		if fam == netlink.FAMILY_V6 && errors.Is(err, unix.EAFNOSUPPORT) {
			continue
		}
		if err != nil {
			return modeRealAddr.Failed("list the policy rules", err)
		}
		for _, r := range rules {
			mask := uint32(0xffffffff)
			if r.Mask != nil {
				mask = *r.Mask
			}
			if (r.Mark != 0 || r.Mask != nil && mask != 0) && (r.Mark^n.cfg.Mark)&mask == 0 {
				return fmt.Errorf("real-address mode: the firewall mark %#x is in use: %s selects it; pick another Mark", n.cfg.Mark, setup.DescribeRule(r))
			}
		}
	}
	return nil
}

// ipv6On reports whether lo, and so the local routes of IPv6, has IPv6 in
// the calling thread's namespace.
func ipv6On() bool {
	b, err := os.ReadFile("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
	return err == nil && strings.TrimSpace(string(b)) == "0"
}

// IPv6 reports whether Dial serves IPv6 clients: whether IPv6 was on when
// Setup ran.
func (n *Net) IPv6() bool { return n.v6 }

// Close closes the sockets that Dial returned and that are still open
// (their reads return net.ErrClosed; their release functions then only
// return nil), and removes the table, the rules and the routes, in that
// order. Nothing else was changed, so nothing else is restored. It is
// idempotent, and works from any thread.
func (n *Net) Close() error {
	if n.closed.Swap(true) {
		return nil
	}
	err := n.teardown()
	if err != nil {
		n.log.Error("real-address mode: clean-up incomplete (run the clean-up command to finish it)", "table", n.cfg.Table, "nftables", n.table.Name, "err", err)
	} else {
		n.log.Info("real-address mode: removed its table, rules and routes", "table", n.cfg.Table, "nftables", n.table.Name)
	}
	return err
}

// teardown closes the sockets and removes, once, whatever setup recorded:
// the table, the rules, then the routes.
func (n *Net) teardown() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.nl == nil {
		return nil
	}
	var errs []error
	for s := range n.socks {
		s.conn.Close()
	}
	clear(n.socks)
	clear(n.claims)
	if n.tableUp {
		n.nft.DelTable(n.table)
		if err := n.nft.Flush(); err != nil && !setup.Gone(err) {
			errs = append(errs, modeRealAddr.Failed("remove nftables table "+n.table.Name, err))
		}
	}
	for k := len(n.rules) - 1; k >= 0; k-- {
		if err := n.nl.RuleDel(&n.rules[k]); err != nil && !setup.Gone(err) {
			errs = append(errs, modeRealAddr.Failed("remove "+setup.DescribeRule(n.rules[k]), err))
		}
	}
	for k := len(n.routes) - 1; k >= 0; k-- {
		if err := n.nl.RouteDel(&n.routes[k]); err != nil && !setup.Gone(err) {
			errs = append(errs, modeRealAddr.Failed("remove "+setup.DescribeRoute(n.routes[k], ""), err))
		}
	}
	n.tableUp, n.rules, n.routes = false, nil, nil
	n.nft.CloseLasting()
	n.nl.Close()
	n.nl = nil
	return errors.Join(errs...)
}

// Cleanup removes what a crashed run left for cfg's Table and Name in the
// calling thread's network namespace: the first step of Setup, on its own.
// Only Table, Name and Logger matter. Without CAP_NET_ADMIN the error wraps
// nat.ErrNeedsNetAdmin.
func Cleanup(cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	return modeRealAddr.Run(func() error {
		h, nft, err := handles()
		if err != nil {
			return err
		}
		defer h.Close()
		defer nft.CloseLasting()
		return removeStale(h, nft, cfg)
	})
}

// removeStale removes the nftables table of cfg's Name, the rules that
// lead to cfg.Table, and the routes in it. The sockets of a crashed run
// went with its process.
func removeStale(h *netlink.Handle, nft *nftables.Conn, cfg Config) error {
	log := cfg.Logger
	var errs []error
	tables, err := nft.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return modeRealAddr.Failed("list the nftables tables", err)
	}
	for _, t := range tables {
		if t.Name != cfg.tableName() {
			continue
		}
		nft.DelTable(t)
		if err := nft.Flush(); err != nil && !setup.Gone(err) {
			errs = append(errs, modeRealAddr.Failed("remove stale nftables table "+t.Name, err))
			continue
		}
		log.Warn("real-address mode: removed an nftables table that an earlier run left", "nftables", t.Name)
	}
	for _, fam := range families(true) {
		rules, err := setup.ListRules(h, fam)
		if fam == netlink.FAMILY_V6 && errors.Is(err, unix.EAFNOSUPPORT) {
			continue // IPv6 is off: nothing can be there
		}
		if err != nil {
			errs = append(errs, modeRealAddr.Failed("list the policy rules", err))
			continue
		}
		for _, r := range rules {
			if r.Table != cfg.Table {
				continue
			}
			if err := h.RuleDel(&r); err != nil && !setup.Gone(err) {
				errs = append(errs, modeRealAddr.Failed("remove stale "+setup.DescribeRule(r), err))
				continue
			}
			log.Warn("real-address mode: removed a policy rule that an earlier run left", "rule", setup.DescribeRule(r))
		}
		routes, err := setup.ListRoutes(h, fam, cfg.Table)
		if err != nil {
			errs = append(errs, modeRealAddr.Failed(fmt.Sprintf("list the routes in table %d", cfg.Table), err))
			continue
		}
		for _, r := range routes {
			if err := h.RouteDel(&r); err != nil && !setup.Gone(err) {
				errs = append(errs, modeRealAddr.Failed("remove stale "+setup.DescribeRoute(r, ""), err))
				continue
			}
			log.Warn("real-address mode: removed a route that an earlier run left", "route", setup.DescribeRoute(r, ""))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("real-address mode: removing what an earlier run left: %w", err)
	}
	return nil
}

// localRoute is the route of family fam that delivers everything in
// table locally, through lo.
func localRoute(fam, lo, table int) netlink.Route {
	r := netlink.Route{Family: fam, Type: unix.RTN_LOCAL, LinkIndex: lo, Table: table}
	if fam == netlink.FAMILY_V4 {
		r.Dst = &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		r.Scope = netlink.SCOPE_HOST
	} else {
		r.Dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return r
}

// markRule is the rule of family fam that sends packets marked cfg.Mark
// to cfg.Table.
func markRule(fam int, cfg *Config) netlink.Rule {
	r := netlink.NewRule()
	r.Family = fam
	r.Priority = cfg.Priority
	r.Mark = cfg.Mark
	r.Table = cfg.Table
	return *r
}

func families(v6 bool) []int {
	if v6 {
		return []int{netlink.FAMILY_V4, netlink.FAMILY_V6}
	}
	return []int{netlink.FAMILY_V4}
}

// nsID identifies a network namespace.
type nsID struct{ dev, ino uint64 }

// threadNetns is the calling thread's network namespace, or the zero nsID
// if it cannot be told.
func threadNetns() nsID {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return nsID{}
	}
	return nsID{st.Dev, st.Ino}
}
