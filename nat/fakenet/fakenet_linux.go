package fakenet

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
	"github.com/iketcp/iketcp/nat/tun"
)

// tablePrefix begins the name of each fake-TCP mode's nftables table
// (family inet); the device's name ends it.
const tablePrefix = "iketcp_faketcp_"

// addrsIn are the kernel's and the endpoint's addresses in p.
func addrsIn(p netip.Prefix) (kernel, endpoint netip.Addr) {
	if !p.IsValid() {
		return netip.Addr{}, netip.Addr{}
	}
	kernel = p.Addr().Next()
	return kernel, kernel.Next()
}

// instancesMu serializes, within the process, what Setup, Close and
// Cleanup decide together from the fake-TCP tables in a namespace and its
// forwarding sysctls: who turned forwarding on, and who turns it off. Lock
// order: a Net's mu, then instancesMu.
var instancesMu sync.Mutex

var _ tun.OffloadDevice = (*Net)(nil)

// Net is fake-TCP mode's plumbing, running: the TUN device between the
// userspace TCP endpoint and the kernel, forwarding, and the nftables
// table that masquerades (client) or redirects (server) the endpoint's
// connections. Read and Write move the endpoint's IP packets; Close
// removes all of it.
type Net struct {
	// Set by Setup, read-only afterwards.
	cfg              Config
	log              *slog.Logger
	kernel4, kernel6 netip.Addr // the kernel's side of the device
	ep4, ep6         netip.Addr // the endpoint's
	table            *nftables.Table
	dev              *tun.TUN // set by setup before Setup returns
	// closed is set first thing in Close.
	closed atomic.Bool

	// mu guards what was installed, which teardown removes once. The
	// handles (netlink, nftables, the sysctl files) are bound to the
	// network namespace Setup ran in, so Close works from any thread; nl
	// is nil once torn down.
	mu      sync.Mutex
	nl      *netlink.Handle
	nft     *nftables.Conn
	sysctls *sysctlFiles
	tableUp bool          // the table is installed
	adopted bool          // Adopt found the table running (another process's until it took over)
	record  []sysctlValue // what the table says to restore, as installed
}

// Setup starts fake-TCP mode's plumbing in the calling thread's
// network namespace (the process's, unless the caller moved its thread).
// It removes what a crashed run left for the same Name (its TUN device and
// its nftables table, restoring the forwarding that run changed), checks
// that no address of the host lies in Net4 or Net6, creates the TUN device
// (MTU 65535, no link-local address, rp_filter 0, forwarding on) with the
// kernel's side at the first address of Net4 (and Net6) and the endpoint
// as its point-to-point peer, installs the table "iketcp_faketcp_"+Name
// (family inet):
//
//	client:  postrouting (nat, srcnat):  ip saddr ENDPOINT oifname != NAME masquerade
//	server:  prerouting (nat, dstnat):   iifname != NAME fib daddr type local
//	                                     tcp dport PORT dnat to ENDPOINT:PORT
//	both:    forward (filter):           iifname NAME ct state invalid drop
//	                                     iifname NAME ip saddr ENDPOINT accept
//	                                     oifname NAME ip daddr ENDPOINT accept
//	Net6:    output (filter):            oifname NAME MLD reports drop
//	Mark:    prerouting (filter, mangle): iifname NAME meta mark set MARK
//	restore: no hook; one comment per sysctl value to put back
//
// (the address rules also with ip6 for Net6), and turns on forwarding
// (net.ipv4.ip_forward, and net.ipv6.conf.all.forwarding with Net6) where
// it is off. On failure it undoes what it did. Without CAP_NET_ADMIN the
// error wraps nat.ErrNeedsNetAdmin.
//
// The table's forward chain accepts the endpoint's traffic only within
// this table: a drop in another table's forward chain (or iptables'
// FORWARD policy, as Docker sets it) still drops it, and must let it pass.
// One Name serves one Net at a time; instances with different Names and
// subnets share forwarding (see Close).
func Setup(cfg Config) (*Net, error) {
	cfg, err := cfg.withDefaults(true)
	if err != nil {
		return nil, err
	}
	n := newNet(cfg)
	if err := modeFakeTCP.Run(n.start); err != nil {
		return nil, err
	}
	args := []any{"role", cfg.Role, "device", cfg.Name, "table", n.table.Name, "endpoint", n.ep4}
	if n.ep6.IsValid() {
		args = append(args, "endpoint6", n.ep6)
	}
	if cfg.Role == Server {
		args = append(args, "port", cfg.Port)
	}
	if cfg.Mark != 0 {
		args = append(args, "mark", fmt.Sprintf("%#x", cfg.Mark))
	}
	n.log.Info("fake-TCP mode: the endpoint's network is up", args...)
	return n, nil
}

// newNet is a Net of cfg (with defaults), nothing set up yet.
func newNet(cfg Config) *Net {
	n := &Net{
		cfg:   cfg,
		log:   cfg.Logger,
		table: &nftables.Table{Name: tablePrefix + cfg.Name, Family: nftables.TableFamilyINet},
	}
	n.kernel4, n.ep4 = addrsIn(cfg.Net4)
	n.kernel6, n.ep6 = addrsIn(cfg.Net6)
	return n
}

// start is Setup's work, on one thread: it removes what a crashed run
// left, then sets up, and undoes a setup that fails.
func (n *Net) start() error {
	return n.withHandles(func() error {
		if err := removeStale(n.nl, n.nft, n.sysctls, n.cfg); err != nil {
			return err
		}
		return n.setup()
	}, n.teardownLocked)
}

// withHandles opens n's netlink sockets and runs work with the instances
// locked; when work fails, n is closed and undo takes back what it did.
func (n *Net) withHandles(work func() error, undo func() error) error {
	h, nft, err := handles()
	if err != nil {
		return err
	}
	n.nl, n.nft, n.sysctls = h, nft, newSysctlFiles()
	instancesMu.Lock()
	defer instancesMu.Unlock()
	if err := work(); err != nil {
		n.closed.Store(true)
		return setup.Undo(err, undo)
	}
	return nil
}

// handles opens the netlink sockets of a setup or a clean-up in the
// calling thread's namespace.
func handles() (*netlink.Handle, *nftables.Conn, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, nil, fmt.Errorf("fake-TCP mode: open a netlink socket: %w", err)
	}
	// Lasting: the socket, made now, stays in this namespace for Close.
	nft, err := nftables.New(nftables.AsLasting())
	if err != nil {
		h.Close()
		return nil, nil, modeFakeTCP.Failed("open an nftables netlink socket (is nf_tables available?)", err)
	}
	return h, nft, nil
}

// setup creates the device, the table and turns forwarding on, recording
// each as it goes so that teardown can undo a partial setup.
func (n *Net) setup() error {
	cfg := &n.cfg
	v6 := cfg.Net6.IsValid()
	if err := n.checkSubnetsFree(); err != nil {
		return err
	}
	n.checkSourcesLocal()
	dev, err := tun.Create(n.nl, modeFakeTCP, cfg.Name, v6, tun.Options{Offload: !cfg.NoOffload})
	if err != nil {
		return err
	}
	n.dev = dev
	switch err := dev.Offload(); {
	case err == nil:
		n.log.Info("fake-TCP mode: the TUN device moves runs of segments in one system call (TCP segmentation and checksum offload)", "device", cfg.Name)
	case cfg.NoOffload:
		n.log.Info("fake-TCP mode: TUN offloads turned off; each segment takes a system call", "device", cfg.Name)
	default:
		n.log.Warn("fake-TCP mode: "+err.Error(), "device", cfg.Name)
	}
	// The endpoint's address is the device's peer, so even a strict
	// reverse-path filter passes what it writes; the device's own 0 leaves
	// it to net.ipv4.conf.all.rp_filter (the higher of the two counts).
	// Its forwarding is on, whatever net.ipv4.conf.default says, so that
	// the kernel forwards what the endpoint writes. Both go with the
	// device.
	if err := dev.DisableRPFilter(); err != nil {
		n.log.Warn("fake-TCP mode: could not turn off the TUN device's reverse-path filter; the endpoint's packets still pass it",
			"device", cfg.Name, "err", err)
	}
	devForwarding := "net/ipv4/conf/" + cfg.Name + "/forwarding"
	if on, err := os.ReadFile("/proc/sys/" + devForwarding); err != nil || strings.TrimSpace(string(on)) == "0" {
		if err := setup.WriteSysctl(devForwarding, "1"); err != nil {
			return sysctlError("turn on forwarding from the TUN device", sysctlName(devForwarding), err)
		}
	}
	if v6 && !dev.IPv6On() {
		return fmt.Errorf("fake-TCP mode: Net6 is set, but IPv6 is off on this host (net.ipv6.conf.all and default.disable_ipv6, or ipv6.disable=1): turn it on or leave Net6 empty")
	}
	if err := dev.Up(); err != nil {
		return err
	}
	// Up first: an IPv6 address added while the device is down gets its
	// peer route only later.
	for _, a := range []struct{ kernel, ep netip.Addr }{{n.kernel4, n.ep4}, {n.kernel6, n.ep6}} {
		if !a.kernel.IsValid() {
			continue
		}
		addr := &netlink.Addr{IPNet: hostNet(a.kernel), Peer: hostNet(a.ep), Flags: unix.IFA_F_NODAD}
		if err := n.nl.AddrAdd(dev.Link(), addr); err != nil {
			return modeFakeTCP.Failed(fmt.Sprintf("give %s the address %s peer %s", cfg.Name, a.kernel, a.ep), err)
		}
	}
	for _, ep := range []netip.Addr{n.ep4, n.ep6} {
		if err := n.waitRoute(ep); err != nil {
			return err
		}
	}
	if err := setup.Installed("device " + cfg.Name); err != nil {
		return err
	}
	return n.setupTable(v6)
}

// setupTable installs the table, with its record, and turns forwarding
// on where it is off, recording each as it goes.
func (n *Net) setupTable(v6 bool) error {
	// The table first, with what to restore in it, then forwarding: a
	// crash between the two leaves a record of values not yet changed,
	// which a clean-up puts back harmlessly.
	plan, err := n.planForwarding(v6)
	if err != nil {
		return err
	}
	if err := n.installTable(); err != nil {
		return err
	}
	if err := setup.Installed("nftables table " + n.table.Name); err != nil {
		return err
	}
	for _, key := range plan {
		if err := n.sysctls.write(key, "1"); err != nil {
			what := "turn on IPv4 forwarding"
			if strings.HasPrefix(key, "net/ipv6/") {
				what = "turn on IPv6 forwarding"
			}
			return sysctlError(what, sysctlName(key), err)
		}
		n.log.Info("fake-TCP mode: turned on forwarding; Close turns it off again", "sysctl", sysctlName(key))
		if err := setup.Installed(key + "=1"); err != nil {
			return err
		}
	}
	return nil
}

// checkSubnetsFree fails if an address of the host lies in Net4 or Net6:
// each instance needs subnets of its own, or the kernel would route the
// endpoint's replies elsewhere.
func (n *Net) checkSubnetsFree() error {
	addrs, err := n.nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return modeFakeTCP.Failed("list the host's addresses", err)
	}
	for _, a := range addrs {
		addr, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		addr = addr.Unmap()
		for _, p := range []struct {
			field string
			net   netip.Prefix
		}{{"Net4", n.cfg.Net4}, {"Net6", n.cfg.Net6}} {
			if p.net.IsValid() && p.net.Contains(addr) {
				dev := fmt.Sprintf("#%d", a.LinkIndex)
				if link, err := n.nl.LinkByIndex(a.LinkIndex); err == nil {
					dev = link.Attrs().Name
				}
				return fmt.Errorf("fake-TCP mode: %s %s is in use: %s has the address %s; give each fake-TCP device a subnet of its own", p.field, p.net, dev, addr)
			}
		}
	}
	return nil
}

// checkSourcesLocal warns of each source address that is not the host's
// (yet: an uplink's address may come later): the replies to what leaves
// with it would not come back here.
func (n *Net) checkSourcesLocal() {
	if len(n.cfg.Sources) == 0 {
		return
	}
	addrs, err := n.nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		n.log.Warn("fake-TCP mode: could not list the host's addresses to check the source addresses", "err", err)
		return
	}
	for _, src := range n.cfg.Sources {
		if !slices.ContainsFunc(addrs, func(a netlink.Addr) bool {
			ip, ok := netip.AddrFromSlice(a.IP)
			return ok && ip.Unmap() == src.Addr
		}) {
			n.log.Warn("fake-TCP mode: a source address is not this host's: the replies to its connections will not come back until it is",
				"source", src.String())
		}
	}
}

// routeWait bounds how long setup waits for the route to the endpoint.
const routeWait = 5 * time.Second

// waitRoute waits until the kernel routes ep (if valid) through the
// device. The IPv6 peer route comes from the address's duplicate address
// detection, which runs later in a kernel worker even when it has nothing
// to detect; until then the kernel drops what it would forward to the
// endpoint.
func (n *Net) waitRoute(ep netip.Addr) error {
	if !ep.IsValid() {
		return nil
	}
	var err error
	for start := time.Now(); time.Since(start) < routeWait; time.Sleep(5 * time.Millisecond) {
		var routes []netlink.Route
		routes, err = n.nl.RouteGet(ep.AsSlice())
		if err == nil && len(routes) > 0 && routes[0].LinkIndex == n.dev.Link().Attrs().Index {
			if waited := time.Since(start); waited > 5*time.Millisecond {
				n.log.Debug("fake-TCP mode: waited for the route to the endpoint", "endpoint", ep, "waited", waited)
			}
			return nil
		}
	}
	return fmt.Errorf("fake-TCP mode: the kernel did not route the endpoint's address %s through %s within %v (last lookup: %v)", ep, n.cfg.Name, routeWait, err)
}

// hostNet is a as a host route's network.
func hostNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

// Name is the TUN device's name.
func (n *Net) Name() string { return n.cfg.Name }

// Endpoint4 is the userspace endpoint's IPv4 address: the TCP stack's own
// address, the source of what it writes (the kernel's side is the one
// before it).
func (n *Net) Endpoint4() netip.Addr { return n.ep4 }

// Endpoint6 is the endpoint's IPv6 address, or the zero Addr without Net6.
func (n *Net) Endpoint6() netip.Addr { return n.ep6 }

// MTU is the TUN device's MTU (tun.MTU), the size of Read buffers that
// never cut a packet. It is not the path's: see the package documentation.
func (n *Net) MTU() int { return tun.MTU }

// BatchSize is the number of buffers a Read should be given.
func (n *Net) BatchSize() int { return n.dev.BatchSize() }

// Read reads up to len(bufs) packets that the kernel forwards to the
// endpoint, each into bufs[k][offset:], and their sizes into sizes[k]. It
// blocks until a packet is there, then takes as many as are queued
// without blocking again. A packet longer than its buffer is cut to the
// buffer's length, silently, as the device does: a size equal to the room
// in the buffer, with an IP length field beyond it, tells; buffers of MTU
// bytes after the offset never cut one. The n packets are valid even when
// err is not nil. After Close it returns net.ErrClosed. Calls are
// serialized; none allocates.
func (n *Net) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return n.dev.Read(bufs, sizes, offset)
}

// Write writes each bufs[k][offset:] as one IPv4 or IPv6 packet from the
// endpoint, which the kernel then forwards (source Endpoint4 or Endpoint6).
// It stops at the first error, returning how many packets were written.
// Safe for concurrent use; it does not allocate.
func (n *Net) Write(bufs [][]byte, offset int) (int, error) {
	return n.dev.Write(bufs, offset)
}

// Offload is nil when the device hands TCP segmentation and checksums to
// the kernel (see tun.OffloadDevice), and otherwise says why not.
func (n *Net) Offload() error { return n.dev.Offload() }

// ReadOffload is Read with the kernel's super-segments and virtio-net
// headers: see tun.OffloadDevice.
func (n *Net) ReadOffload(bufs [][]byte, sizes []int, offset int) (int, error) {
	return n.dev.ReadOffload(bufs, sizes, offset)
}

// WriteOffload writes the endpoint's packets with their virtio-net
// headers, super-segments among them: see tun.OffloadDevice.
func (n *Net) WriteOffload(pkts []tun.OffloadPacket) (int, error) {
	return n.dev.WriteOffload(pkts)
}

// Close removes the table and the device, and turns forwarding back to
// what it was, unless another fake-TCP table's device still runs in the
// namespace (that one's Close does it then); blocked Reads return
// net.ErrClosed. It is idempotent, and works from any thread.
func (n *Net) Close() error {
	if n.closed.Swap(true) {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	instancesMu.Lock()
	defer instancesMu.Unlock()
	err := n.teardownLocked()
	if err != nil {
		n.log.Error("fake-TCP mode: clean-up incomplete (run the clean-up command to finish it)", "device", n.cfg.Name, "err", err)
	} else {
		n.log.Info("fake-TCP mode: removed its table and device", "device", n.cfg.Name, "table", n.table.Name)
	}
	return err
}

// teardownLocked removes, once, whatever setup recorded: the table, the
// device, then forwarding. The caller holds instancesMu, and n.mu unless n
// was never returned.
func (n *Net) teardownLocked() error {
	if n.nl == nil {
		return nil
	}
	var errs []error
	record := n.record
	if n.tableUp {
		// Another instance may have handed its record over since.
		if r, err := readRecord(n.nft, n.table); err == nil {
			record = r
		} else {
			n.log.Warn("fake-TCP mode: could not read back what to restore from the table; using what it was given", "table", n.table.Name, "err", err)
		}
		n.nft.DelTable(n.table)
		if err := n.nft.Flush(); err != nil && !setup.Gone(err) {
			errs = append(errs, modeFakeTCP.Failed("remove nftables table "+n.table.Name, err))
		}
	}
	if n.dev != nil {
		if err := n.dev.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if n.tableUp {
		if err := settleRecord(n.nl, n.nft, n.sysctls, n.cfg.Name, record, n.log); err != nil {
			errs = append(errs, err)
		}
	}
	n.tableUp, n.record = false, nil
	n.sysctls.close()
	n.nft.CloseLasting()
	n.nl.Close()
	n.nl = nil
	return errors.Join(errs...)
}

// Cleanup removes what a crashed run left for cfg's Name in the
// calling thread's network namespace: the TUN device, the nftables table,
// and forwarding turned on, which it turns back to what the table says it
// was unless another fake-TCP table's device still runs. It is the first
// step of Setup, on its own; only Name and Logger matter. Without
// CAP_NET_ADMIN the error wraps nat.ErrNeedsNetAdmin.
func Cleanup(cfg Config) error {
	cfg, err := cfg.withDefaults(false)
	if err != nil {
		return err
	}
	return modeFakeTCP.Run(func() error {
		h, nft, err := handles()
		if err != nil {
			return err
		}
		defer h.Close()
		defer nft.CloseLasting()
		files := newSysctlFiles()
		defer files.close()
		instancesMu.Lock()
		defer instancesMu.Unlock()
		return removeStale(h, nft, files, cfg)
	})
}

// removeStale removes the table and the TUN device of cfg.Name, and
// settles what the table says to restore. A device of that name that is
// not a TUN device is not iketcp's: it stays, and removeStale fails before
// touching anything.
func removeStale(h *netlink.Handle, nft *nftables.Conn, files *sysctlFiles, cfg Config) error {
	log := cfg.Logger
	stale, err := tun.FindStale(h, modeFakeTCP, cfg.Name)
	if err != nil {
		return err
	}
	tables, err := listTables(nft)
	if err != nil {
		return err
	}
	var errs []error
	name := tablePrefix + cfg.Name
	for _, t := range tables {
		if t.Name != name {
			continue
		}
		record, err := readRecord(nft, t)
		if err != nil {
			log.Warn("fake-TCP mode: an earlier run's table has no readable record of the forwarding it changed; check net.ipv4.ip_forward and net.ipv6.conf.all.forwarding by hand",
				"table", t.Name, "err", err)
		}
		nft.DelTable(t)
		if err := nft.Flush(); err != nil && !setup.Gone(err) {
			errs = append(errs, modeFakeTCP.Failed("remove stale nftables table "+t.Name, err))
			continue
		}
		log.Warn("fake-TCP mode: removed an nftables table that an earlier run left", "table", t.Name)
		if err := settleRecord(h, nft, files, cfg.Name, record, log); err != nil {
			errs = append(errs, err)
		}
	}
	if err := stale.Remove(log); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("fake-TCP mode: removing what an earlier run left: %w", err)
	}
	return nil
}
