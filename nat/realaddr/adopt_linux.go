package realaddr

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
)

// A planned restart or upgrade of the server hands real-address mode to
// the process that replaces it, with no moment when the daemon's answers
// to a session would leave the host: the old process hands the sessions'
// sockets over (as the server hands any backend socket over); the new one
// adopts the running routes, rules and table (Adopt) and each session's
// socket with its element (AdoptSocket); the old one then lets go without
// removing anything (Release).

// Adopt takes over the real-address mode of cfg's Table and Name that
// another process runs in the calling thread's network namespace, instead
// of removing it as stale as Setup would: it keeps the routes, the rules
// and the table that are in, and installs those that are missing (each
// missing one said in the log). Hand it the sessions' sockets with
// AdoptSocket. Close then removes it all, as after Setup. Without
// CAP_NET_ADMIN the error wraps nat.ErrNeedsNetAdmin.
func Adopt(cfg Config) (*Net, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	n := newNet(cfg)
	if err := modeRealAddr.Run(n.adopt); err != nil {
		return nil, err
	}
	n.log.Info("real-address mode: took over the running routes, rules and table",
		"table", cfg.Table, "priority", cfg.Priority, "mark", fmt.Sprintf("%#x", cfg.Mark),
		"nftables", n.table.Name, "ipv6", n.v6)
	return n, nil
}

// adopt is Adopt's work, on one thread. A failure leaves what it found in
// place (the other process's), and removes what it installed itself.
func (n *Net) adopt() error {
	n.ns = threadNetns()
	h, nft, err := handles()
	if err != nil {
		return err
	}
	n.nl, n.nft = h, nft
	if err := n.adoptAll(); err != nil {
		n.closed.Store(true)
		return setup.Undo(err, n.teardown)
	}
	return nil
}

// adoptAll records the routes, rules and table that are in, as setup
// would have, and installs the missing ones.
func (n *Net) adoptAll() error {
	cfg := &n.cfg
	n.v6 = ipv6On()
	lo, err := n.nl.LinkByName("lo")
	if err != nil {
		return modeRealAddr.Failed("find the loopback device lo", err)
	}
	// What is missing is installed, and only that is removed should the
	// adoption fail: teardown removes what n records.
	var found []netlink.Route
	var foundRules []netlink.Rule
	for _, fam := range families(n.v6) {
		want := localRoute(fam, lo.Attrs().Index, cfg.Table)
		routes, err := setup.ListRoutes(n.nl, fam, cfg.Table)
		if err != nil {
			return modeRealAddr.Failed(fmt.Sprintf("list the routes in table %d", cfg.Table), err)
		}
		have := false
		for _, r := range routes {
			if r.Type == unix.RTN_LOCAL && r.LinkIndex == want.LinkIndex && r.Dst != nil && isDefault(r.Dst) {
				have = true
			}
		}
		if have {
			found = append(found, want)
			continue
		}
		n.log.Warn("real-address mode: a route of the running mode is missing; adding it", "route", setup.DescribeRoute(want, ""))
		if err := n.nl.RouteAdd(&want); err != nil {
			return modeRealAddr.Failed("add "+setup.DescribeRoute(want, ""), err)
		}
		n.routes = append(n.routes, want)
	}
	for _, fam := range families(n.v6) {
		want := markRule(fam, cfg)
		rules, err := setup.ListRules(n.nl, fam)
		if err != nil {
			return modeRealAddr.Failed("list the policy rules", err)
		}
		have := false
		for _, r := range rules {
			if r.Table == cfg.Table && r.Priority == cfg.Priority && r.Mark == cfg.Mark {
				have = true
			}
		}
		if have {
			foundRules = append(foundRules, want)
			continue
		}
		n.log.Warn("real-address mode: a policy rule of the running mode is missing; adding it", "rule", setup.DescribeRule(want))
		if err := n.nl.RuleAdd(&want); err != nil {
			return modeRealAddr.Failed("add "+setup.DescribeRule(want), err)
		}
		n.rules = append(n.rules, want)
	}
	if err := n.adoptTable(); err != nil {
		return err
	}
	// From here all of it is this Net's: Close removes it.
	n.routes = append(found, n.routes...)
	n.rules = append(foundRules, n.rules...)
	n.tableUp = true
	return nil
}

// adoptTable checks that the running table has the sets and the chain
// that installTable makes, or installs the table if it is gone. A table
// without them is another version's: Adopt refuses it rather than replace
// it under the sessions' elements.
func (n *Net) adoptTable() error {
	tables, err := n.nft.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return modeRealAddr.Failed("list the nftables tables", err)
	}
	found := false
	for _, t := range tables {
		found = found || t.Name == n.table.Name
	}
	if !found {
		n.log.Warn("real-address mode: the running mode's nftables table is gone; installing it again", "nftables", n.table.Name)
		if err := n.installTable(); err != nil {
			return err
		}
		n.tableUp = true
		return nil
	}
	for _, s := range []*nftables.Set{n.set4, n.set6} {
		if _, err := n.nft.GetSetByName(n.table, s.Name); err != nil {
			return fmt.Errorf("real-address mode: the running nftables table %s has no set %s (%v): it is not this version's; stop the old server and start this one (the sessions come back from --state)", n.table.Name, s.Name, err)
		}
	}
	rules, err := n.nft.GetRules(n.table, &nftables.Chain{Name: "output", Table: n.table})
	if err != nil || len(rules) != 2 {
		return fmt.Errorf("real-address mode: the running nftables table %s has not the output chain's two rules (%d, %v): it is not this version's; stop the old server and start this one (the sessions come back from --state)", n.table.Name, len(rules), err)
	}
	return nil
}

// isDefault reports whether dst is the default route of its family.
func isDefault(dst *net.IPNet) bool {
	ones, _ := dst.Mask.Size()
	return ones == 0 && dst.IP.IsUnspecified()
}

// AdoptSocket takes over a session's socket that Dial made in the process
// that ran the mode before (handed over as a file): its element, which
// AdoptSocket adds should it be missing, and its release, as Dial returns
// it. The socket must be a connected UDP socket from a client's address.
func (n *Net) AdoptSocket(conn *net.UDPConn) (release func() error, err error) {
	local, ok1 := conn.LocalAddr().(*net.UDPAddr)
	remote, ok2 := conn.RemoteAddr().(*net.UDPAddr)
	if !ok1 || !ok2 {
		return nil, errors.New("real-address mode: the socket handed over is not a connected UDP socket")
	}
	lap, rap := local.AddrPort(), remote.AddrPort()
	lap = netip.AddrPortFrom(lap.Addr().Unmap(), lap.Port())
	rap = netip.AddrPortFrom(rap.Addr().Unmap(), rap.Port())
	s := &socket{conn: conn, set: n.set4, key: elementKey(lap, rap)}
	if lap.Addr().Is6() {
		s.set = n.set6
	}
	if err := n.add(s); err != nil {
		return nil, err
	}
	return sync.OnceValue(func() error { return n.release(s) }), nil
}

// Release lets go of the mode without removing anything: another process
// adopted it (Adopt, AdoptSocket) and owns it now. The sockets Dial
// returned close here (the other process holds its own descriptors of
// them) without their elements being removed; release functions then only
// close, and Close does nothing more. It works from any thread.
func (n *Net) Release() {
	if n.closed.Swap(true) {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.nl == nil {
		return
	}
	for s := range n.socks {
		s.conn.Close()
	}
	clear(n.socks)
	clear(n.claims)
	n.tableUp, n.rules, n.routes = false, nil, nil
	n.nft.CloseLasting()
	n.nl.Close()
	n.nl = nil
	n.log.Info("real-address mode: left its routes, rules and table to the process that took over", "table", n.cfg.Table, "nftables", n.table.Name)
}
