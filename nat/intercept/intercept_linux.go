package intercept

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
	"github.com/iketcp/iketcp/nat/tun"
)

// The ports whose UDP traffic to a peer is intercepted: IKE, and IKE with
// NAT traversal (which also carries UDP-encapsulated ESP).
var interceptedPorts = [...]uint16{500, 4500}

// Interceptor is a running interception: the TUN device, the routes
// through it and the rules that select the traffic. Read and Write move
// packets; Close removes all of it.
type Interceptor struct {
	// Set by Open, read-only afterwards.
	cfg Config
	log *slog.Logger
	dev *tun.TUN // set by setup before Open returns
	// closed is set first thing in Close.
	closed atomic.Bool

	// mu guards what was installed, which teardown removes once. The
	// netlink handle is bound to the network namespace Open ran in, so
	// Close works from any thread; it is nil once torn down.
	mu     sync.Mutex
	nl     *netlink.Handle
	routes []netlink.Route
	rules  []netlink.Rule
}

// Open starts transparent mode in the calling thread's network namespace
// (the process's, unless the caller moved its thread). It removes what a
// crashed run left for the same Name and Table, creates the TUN device
// (MTU set, up, no address, rp_filter 0), routes IPv4 (and IPv6 if a peer
// is IPv6) by default through it in Table, and adds the rules
//
//	Priority:   fwmark Mark lookup main
//	Priority+1: to PEER ipproto udp dport 500 lookup Table
//	Priority+1: to PEER ipproto udp dport 4500 lookup Table
//	Priority+1: to PEER ipproto esp lookup Table
//
// for each peer. On failure it undoes what it did. Without CAP_NET_ADMIN
// the error wraps nat.ErrNeedsNetAdmin. One Name and Table serve one
// Interceptor at a time: a second Open with the same ones removes the
// first one's rules and routes as stale.
func Open(cfg Config) (*Interceptor, error) {
	cfg, err := cfg.withDefaults(true)
	if err != nil {
		return nil, err
	}
	i := &Interceptor{cfg: cfg, log: cfg.Logger}
	if err := modeTransparent.Run(i.start); err != nil {
		return nil, err
	}
	i.log.Info("transparent mode: intercepting IKE and ESP to the peers",
		"device", cfg.Name, "table", cfg.Table, "priority", cfg.Priority,
		"mark", fmt.Sprintf("%#x", cfg.Mark), "peers", cfg.Peers)
	return i, nil
}

// start is Open's work, on one thread: it removes what a crashed run
// left, then sets up, and undoes a setup that fails.
func (i *Interceptor) start() error {
	h, err := newHandle()
	if err != nil {
		return err
	}
	if err := removeStale(h, i.cfg); err != nil {
		h.Close()
		return err
	}
	i.nl = h
	if err := i.setup(); err != nil {
		i.closed.Store(true)
		return setup.Undo(err, i.teardown)
	}
	return nil
}

// newHandle opens the netlink socket of a setup or a clean-up in the
// calling thread's namespace.
func newHandle() (*netlink.Handle, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("transparent mode: open a netlink socket: %w", err)
	}
	return h, nil
}

// setup creates the device, its routes and the rules, recording each as
// it goes so that teardown can undo a partial setup.
func (i *Interceptor) setup() error {
	cfg := &i.cfg
	v4, v6 := hasFamily(cfg.Peers, false), hasFamily(cfg.Peers, true)
	dev, err := tun.Create(i.nl, modeTransparent, cfg.Name, v6, tun.Options{})
	if err != nil {
		return err
	}
	i.dev = dev
	// Replies written into the device come from the peers, whose routes
	// lead back into it, so they pass even a strict reverse-path filter
	// (the interception rules match the reverse lookup's protocol and
	// ports). Turning the device's filter off is belt and braces; where
	// /proc/sys is read-only, as in many containers, it is not needed.
	if err := dev.DisableRPFilter(); err != nil {
		i.log.Warn("transparent mode: could not turn off the TUN device's reverse-path filter; replies from the peers still pass it",
			"device", cfg.Name, "err", err)
	}
	if v6 && !dev.IPv6On() {
		return fmt.Errorf("transparent mode: a peer is IPv6, but IPv6 is off on this host (net.ipv6.conf.all and default.disable_ipv6, or ipv6.disable=1): turn it on or give IPv4 peers only")
	}
	if err := dev.Up(); err != nil {
		return err
	}
	if err := setup.Installed("device " + cfg.Name); err != nil {
		return err
	}

	for _, fam := range families(v4, v6) {
		r := defaultRoute(fam, i.dev.Link().Attrs().Index, cfg.Table)
		if err := i.nl.RouteAdd(&r); err != nil {
			return modeTransparent.Failed(fmt.Sprintf("add %s", setup.DescribeRoute(r, cfg.Name)), err)
		}
		i.routes = append(i.routes, r)
		if err := setup.Installed(setup.DescribeRoute(r, cfg.Name)); err != nil {
			return err
		}
	}
	for _, r := range wantedRules(cfg, v4, v6) {
		if err := i.nl.RuleAdd(&r); err != nil {
			return modeTransparent.Failed(fmt.Sprintf("add %s", setup.DescribeRule(r)), err)
		}
		i.rules = append(i.rules, r)
		if err := setup.Installed(setup.DescribeRule(r)); err != nil {
			return err
		}
	}
	return i.checkSelectors()
}

// checkSelectors makes sure that the kernel kept the rules' protocol
// selectors: a kernel older than Linux 4.17 ignores them and would send
// all traffic to the peers into the device.
func (i *Interceptor) checkSelectors() error {
	for _, fam := range families(true, true) {
		rules, err := setup.ListRules(i.nl, fam)
		if err != nil {
			if fam == netlink.FAMILY_V6 && errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			return fmt.Errorf("transparent mode: list the policy rules: %w", err)
		}
		for _, r := range rules {
			if r.Table == i.cfg.Table && r.IPProto == 0 {
				return fmt.Errorf("transparent mode: this kernel ignores the protocol and port selectors of policy rules (they need Linux 4.17 or later), so it would send all traffic to the peers into the TUN device")
			}
		}
	}
	return nil
}

// Name is the TUN device's name.
func (i *Interceptor) Name() string { return i.cfg.Name }

// Mark is the firewall mark that takes a socket past the interception:
// give it to every socket of iketcp's own that talks to a peer (SetMark).
func (i *Interceptor) Mark() uint32 { return i.cfg.Mark }

// MTU is the TUN device's MTU (tun.MTU, the largest IP packet, so that
// the kernel never fragments what the daemon sends on its way into the
// device): the room after the offset that a Read buffer needs to hold any
// packet whole.
func (i *Interceptor) MTU() int { return tun.MTU }

// BatchSize is the number of buffers a Read should be given.
func (i *Interceptor) BatchSize() int { return i.dev.BatchSize() }

// Read reads up to len(bufs) packets, each into bufs[k][offset:], and
// their sizes into sizes[k]. It blocks until a packet is there, then takes
// as many as are queued without blocking again. A packet longer than its
// buffer is cut to the buffer's length, silently, as the device does: a
// size equal to the room in the buffer, with an IP length field beyond
// it, tells; buffers of MTU bytes after the offset never cut one. The n
// packets are valid even when err is not nil. After Close it returns
// net.ErrClosed. Calls are serialized; none allocates.
func (i *Interceptor) Read(bufs [][]byte, sizes []int, offset int) (n int, err error) {
	return i.dev.Read(bufs, sizes, offset)
}

// Write writes each bufs[k][offset:] as one IPv4 or IPv6 packet, which the
// kernel then receives as if from the wire. It stops at the first error,
// returning how many packets were written. Safe for concurrent use; it
// does not allocate.
func (i *Interceptor) Write(bufs [][]byte, offset int) (n int, err error) {
	return i.dev.Write(bufs, offset)
}

// Close removes the rules, the routes and the device, in that order;
// blocked Reads return net.ErrClosed. Nothing else was changed, so
// nothing else is restored. It is idempotent.
func (i *Interceptor) Close() error {
	if i.closed.Swap(true) {
		return nil
	}
	err := i.teardown()
	if err != nil {
		i.log.Error("transparent mode: clean-up incomplete (run the clean-up command to finish it)", "device", i.cfg.Name, "err", err)
	} else {
		i.log.Info("transparent mode: removed its rules, routes and device", "device", i.cfg.Name)
	}
	return err
}

// teardown removes, once, whatever setup recorded: rules, routes, then the
// device.
func (i *Interceptor) teardown() error {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.nl == nil {
		return nil
	}
	var errs []error
	for k := len(i.rules) - 1; k >= 0; k-- {
		if err := i.nl.RuleDel(&i.rules[k]); err != nil && !setup.Gone(err) {
			errs = append(errs, modeTransparent.Failed(fmt.Sprintf("remove %s", setup.DescribeRule(i.rules[k])), err))
		}
	}
	for k := len(i.routes) - 1; k >= 0; k-- {
		if err := i.nl.RouteDel(&i.routes[k]); err != nil && !setup.Gone(err) {
			errs = append(errs, modeTransparent.Failed(fmt.Sprintf("remove %s", setup.DescribeRoute(i.routes[k], i.cfg.Name)), err))
		}
	}
	if i.dev != nil {
		if err := i.dev.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	i.rules, i.routes = nil, nil
	i.nl.Close()
	i.nl = nil
	return errors.Join(errs...)
}

// Cleanup removes what a crashed run left for cfg's Name and Table in the
// calling thread's network namespace: the first step of Open, on its own;
// Peers do not matter. Without CAP_NET_ADMIN the error wraps
// nat.ErrNeedsNetAdmin.
func Cleanup(cfg Config) error {
	cfg, err := cfg.withDefaults(false)
	if err != nil {
		return err
	}
	return modeTransparent.Run(func() error {
		h, err := newHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		return removeStale(h, cfg)
	})
}

// removeStale removes the rules that lead to cfg.Table (and the bypass
// rule at cfg.Priority), the routes in cfg.Table and a TUN device named
// cfg.Name. A device of that name that is not a TUN device is not iketcp's:
// it stays, and removeStale fails before touching anything.
func removeStale(h *netlink.Handle, cfg Config) error {
	log := cfg.Logger
	stale, err := tun.FindStale(h, modeTransparent, cfg.Name)
	if err != nil {
		return err
	}

	var errs []error
	for _, fam := range families(true, true) {
		rules, err := setup.ListRules(h, fam)
		if fam == netlink.FAMILY_V6 && errors.Is(err, unix.EAFNOSUPPORT) {
			continue // IPv6 is off: nothing can be there
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("list the policy rules: %w", err))
			continue
		}
		for _, r := range rules {
			if !staleRule(r, cfg) {
				continue
			}
			if err := h.RuleDel(&r); err != nil && !setup.Gone(err) {
				errs = append(errs, modeTransparent.Failed(fmt.Sprintf("remove stale %s", setup.DescribeRule(r)), err))
				continue
			}
			log.Warn("transparent mode: removed a policy rule that an earlier run left", "rule", setup.DescribeRule(r))
		}
		routes, err := setup.ListRoutes(h, fam, cfg.Table)
		if err != nil {
			errs = append(errs, fmt.Errorf("list the routes in table %d: %w", cfg.Table, err))
			continue
		}
		for _, r := range routes {
			if err := h.RouteDel(&r); err != nil && !setup.Gone(err) {
				errs = append(errs, modeTransparent.Failed(fmt.Sprintf("remove stale %s", setup.DescribeRoute(r, "")), err))
				continue
			}
			log.Warn("transparent mode: removed a route that an earlier run left", "route", setup.DescribeRoute(r, ""))
		}
	}
	if err := stale.Remove(log); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("transparent mode: removing what an earlier run left: %w", err)
	}
	return nil
}

// staleRule reports whether r is one that Open with cfg installs:
// any rule that leads to cfg.Table, and the bypass rule.
func staleRule(r netlink.Rule, cfg Config) bool {
	if r.Table == cfg.Table {
		return true
	}
	return r.Table == unix.RT_TABLE_MAIN && r.Priority == cfg.Priority && r.Mark == cfg.Mark &&
		(r.Mask == nil || *r.Mask == 0xffffffff) && r.Src == nil && r.Dst == nil &&
		r.IPProto == 0 && r.IifName == "" && r.OifName == ""
}

// wantedRules lists Open's rules: the bypass rule for each family in
// use, then the interception rules for each peer.
func wantedRules(cfg *Config, v4, v6 bool) []netlink.Rule {
	var rules []netlink.Rule
	for _, fam := range families(v4, v6) {
		r := netlink.NewRule()
		r.Family = fam
		r.Priority = cfg.Priority
		r.Mark = cfg.Mark
		r.Table = unix.RT_TABLE_MAIN
		rules = append(rules, *r)
	}
	for _, p := range cfg.Peers {
		fam := netlink.FAMILY_V4
		if p.Is6() {
			fam = netlink.FAMILY_V6
		}
		to := &net.IPNet{IP: p.AsSlice(), Mask: net.CIDRMask(p.BitLen(), p.BitLen())}
		rule := func(proto int, port uint16) netlink.Rule {
			r := netlink.NewRule()
			r.Family = fam
			r.Priority = cfg.Priority + 1
			r.Dst = to
			r.IPProto = proto
			if port != 0 {
				r.Dport = netlink.NewRulePortRange(port, port)
			}
			r.Table = cfg.Table
			return *r
		}
		for _, port := range interceptedPorts {
			rules = append(rules, rule(unix.IPPROTO_UDP, port))
		}
		rules = append(rules, rule(unix.IPPROTO_ESP, 0))
	}
	return rules
}

// defaultRoute is the default route of family fam through the device in
// table.
func defaultRoute(fam, ifindex, table int) netlink.Route {
	r := netlink.Route{LinkIndex: ifindex, Table: table, Family: fam}
	if fam == netlink.FAMILY_V4 {
		r.Dst = &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		r.Scope = netlink.SCOPE_LINK
	} else {
		r.Dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return r
}

func families(v4, v6 bool) []int {
	var f []int
	if v4 {
		f = append(f, netlink.FAMILY_V4)
	}
	if v6 {
		f = append(f, netlink.FAMILY_V6)
	}
	return f
}

// SetMark returns a Control function for net.Dialer and net.ListenConfig
// that sets SO_MARK to mark on the socket, so that its traffic bypasses
// the interception. Setting a mark needs CAP_NET_ADMIN (or, since Linux
// 5.17, CAP_NET_RAW).
func SetMark(mark uint32) func(network, address string, c syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		}); err != nil {
			return err
		}
		if serr != nil {
			return modeTransparent.Failed(fmt.Sprintf("set the bypass mark %#x on a socket", mark), serr)
		}
		return nil
	}
}

// hasFamily reports whether peers hold an IPv4 (v6 false) or IPv6 address.
func hasFamily(peers []netip.Addr, v6 bool) bool {
	for _, p := range peers {
		if p.Is6() == v6 {
			return true
		}
	}
	return false
}
