package intercept

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat"
	"github.com/iketcp/iketcp/nat/internal/setup"
	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/iketcp/iketcp/nat/tun"
	"github.com/iketcp/iketcp/nat/tun/tuntest"
)

// TestInterceptIPv4 checks what goes into the TUN device and what does not,
// and that packets written into it reach local sockets, with and without a
// strict reverse-path filter.
func TestInterceptIPv4(t *testing.T) {
	l := newLab(t)
	checkInterception(t, l, peerV4, otherV4, siteV4)
}

// TestInterceptIPv6 is TestInterceptIPv4 with an IPv6 peer.
func TestInterceptIPv6(t *testing.T) {
	l := newLab(t)
	checkInterception(t, l, peerV6, otherV6, siteV6)
}

func checkInterception(t *testing.T, l *lab, peer, other, site netip.Addr) {
	network, raw := "udp4", "ip4:esp"
	if peer.Is6() {
		network, raw = "udp6", "ip6:esp"
	}
	// The real peer's sockets, which must get only what is not intercepted.
	at4500 := l.listenUDP(t, netip.AddrPortFrom(peer, 4500))
	at4501 := l.listenUDP(t, netip.AddrPortFrom(peer, 4501))
	otherAt4500 := l.listenUDP(t, netip.AddrPortFrom(other, 4500))
	tcp := l.listenTCP(t, netip.AddrPortFrom(peer, 4500))

	i := open(t, Config{Peers: []netip.Addr{peer}})
	packets := pump(t, i)

	// A daemon's socket: bound to the wildcard address, no mark.
	daemon, err := net.ListenUDP(network, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer daemon.Close()
	for _, port := range []uint16{500, 4500} {
		payload := fmt.Appendf(nil, "IKE to port %d", port)
		if _, err := daemon.WriteToUDPAddrPort(payload, netip.AddrPortFrom(peer, port)); err != nil {
			t.Fatal(err)
		}
		p := next(t, packets)
		if p.version != map[bool]int{true: 6, false: 4}[peer.Is6()] || p.proto != unix.IPPROTO_UDP ||
			p.dst != peer || p.dport != port || !bytes.Equal(p.payload, payload) {
			t.Fatalf("read %v, want UDP to %s:%d", p, peer, port)
		}
		if !p.checksumOK {
			t.Fatalf("read %v with a wrong UDP checksum: the kernel left it to an offload", p)
		}
		t.Logf("intercepted %v (source chosen by the kernel: %s)", p, p.src)
	}

	// Raw ESP (IP protocol 50), as the kernel's XFRM sends it without NAT
	// traversal.
	esp, err := net.ListenPacket(raw, "")
	if err != nil {
		t.Fatal(err)
	}
	defer esp.Close()
	spi := []byte{0, 0, 0x12, 0x34, 0, 0, 0, 1, 'e', 's', 'p'}
	if _, err := esp.WriteTo(spi, &net.IPAddr{IP: peer.AsSlice()}); err != nil {
		t.Fatal(err)
	}
	if p := next(t, packets); p.proto != unix.IPPROTO_ESP || p.dst != peer || !bytes.Equal(p.payload, spi) {
		t.Fatalf("read %v, want ESP to %s", p, peer)
	}

	// Not intercepted: TCP to the peer, iketcp's own marked socket, another
	// address, another port. Each reaches the real peer.
	conn, err := nattest.DialTCP(netip.AddrPortFrom(peer, 4500))
	if err != nil {
		t.Fatalf("TCP to the peer: %v", err)
	}
	conn.Close()
	tcp.SetDeadline(time.Now().Add(5 * time.Second))
	if c, err := tcp.Accept(); err != nil {
		t.Fatalf("the peer did not accept TCP: %v", err)
	} else {
		c.Close()
	}
	marked, err := (&net.ListenConfig{Control: SetMark(i.Mark())}).ListenPacket(t.Context(), network, "")
	if err != nil {
		t.Fatal(err)
	}
	defer marked.Close()
	if _, err := marked.WriteTo([]byte("marked"), net.UDPAddrFromAddrPort(netip.AddrPortFrom(peer, 4500))); err != nil {
		t.Fatal(err)
	}
	nattest.ExpectUDP(t, at4500, []byte("marked"))
	for _, c := range []struct {
		to  netip.AddrPort
		got *net.UDPConn
	}{{netip.AddrPortFrom(other, 4500), otherAt4500}, {netip.AddrPortFrom(peer, 4501), at4501}} {
		if _, err := daemon.WriteToUDPAddrPort([]byte("not IKE"), c.to); err != nil {
			t.Fatal(err)
		}
		nattest.ExpectUDP(t, c.got, []byte("not IKE"))
	}
	// The device's queue is in order: had any of them gone in, it would
	// come before this one.
	if _, err := daemon.WriteToUDPAddrPort([]byte("sentinel"), netip.AddrPortFrom(peer, 500)); err != nil {
		t.Fatal(err)
	}
	if p := next(t, packets); string(p.payload) != "sentinel" {
		t.Fatalf("read %v, want only the sentinel", p)
	}

	// Write: a reply from the peer reaches the local socket, through every
	// reverse-path filter setting, even with the device's own at strict.
	local, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(site, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	from := netip.AddrPortFrom(peer, 4500)
	to := netip.AddrPortFrom(site, local.LocalAddr().(*net.UDPAddr).AddrPort().Port())
	for _, rp := range []struct{ all, dev string }{{"0", "0"}, {"1", "0"}, {"2", "0"}, {"1", "1"}} {
		nattest.SetSysctl(t, "net/ipv4/conf/all/rp_filter", rp.all)
		nattest.SetSysctl(t, "net/ipv4/conf/"+i.Name()+"/rp_filter", rp.dev)
		payload := fmt.Appendf(nil, "reply with rp_filter all=%s dev=%s", rp.all, rp.dev)
		pkt := nattest.UDPPacket(from, to, payload)
		if n, err := i.Write([][]byte{append(make([]byte, 16), pkt...)}, 16); n != 1 || err != nil {
			t.Fatalf("Write: %d, %v", n, err)
		}
		if got := nattest.ExpectUDP(t, local, payload); got != from {
			t.Fatalf("reply came from %s, want %s", got, from)
		}
	}

	// Nothing else came through: no router solicitations, no listener
	// reports, no stray packet.
	select {
	case b := <-packets:
		p, _ := parsePacket(b)
		t.Fatalf("unexpected packet %v", p)
	case <-time.After(100 * time.Millisecond):
	}
}

// TestCloseRestoresEverything compares the namespace's rules, routes and
// links before Open and after Close, with IPv4 and IPv6 peers.
func TestCloseRestoresEverything(t *testing.T) {
	newLab(t)
	before := stableSnapshot(t)
	i := open(t, Config{Peers: []netip.Addr{peerV4, peerV6}})
	during := snapshot(t)
	t.Logf("while intercepting:\n%s", during)
	for _, want := range []string{
		"100:	from all fwmark 0x4500 lookup main",
		"101:	from all to 203.0.113.2 ipproto udp dport 500 lookup 4500",
		"101:	from all to 203.0.113.2 ipproto udp dport 4500 lookup 4500",
		"101:	from all to 203.0.113.2 ipproto esp lookup 4500",
		"101:	from all to 2001:db8:2::2 ipproto udp dport 4500 lookup 4500",
		"101:	from all to 2001:db8:2::2 ipproto esp lookup 4500",
		"default dev iketcp0 table 4500 scope link",
		"default dev iketcp0 table 4500 metric 1024",
		"iketcp0: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 65535",
	} {
		if !strings.Contains(during, want) {
			t.Errorf("missing %q", want)
		}
	}
	if addrs := nattest.IP(t, "addr", "show", "dev", "iketcp0"); strings.Contains(addrs, "inet") {
		t.Errorf("the TUN device has an address:\n%s", addrs)
	}

	// Close wakes a blocked Read.
	tuntest.CheckCloseWakesRead(t, i, i.MTU(), i.Close)
	if after := snapshot(t); after != before {
		t.Fatalf("Close left the namespace changed:\n--- before\n%s\n--- after\n%s", before, after)
	}
	tuntest.CheckClosed(t, i, tun.MTU, nattest.UDPPacket(netip.AddrPortFrom(peerV4, 1), netip.AddrPortFrom(siteV4, 1), nil))
}

// TestStaleStateIsRemoved leaves behind what crashed runs leave, and
// checks that Open and Cleanup remove it all.
func TestStaleStateIsRemoved(t *testing.T) {
	newLab(t)
	before := stableSnapshot(t)
	cfg := Config{Peers: []netip.Addr{peerV4, peerV6}, Logger: nattest.Logger(t)}

	// A crash: the process dies, so its descriptors close and the TUN
	// device goes with them, while the rules stay. Routes in the table that
	// led elsewhere stay too.
	crash := func() {
		t.Helper()
		i, err := Open(cfg)
		if err != nil {
			t.Fatal(err)
		}
		i.dev.File().Close()
		i.nl.Close()
		nattest.IP(t, "route", "add", "198.51.100.0/24", "via", hopV4.String(), "table", "4500")
		nattest.IP(t, "-6", "route", "add", "2001:db8:3::/64", "via", hopV6.String(), "table", "4500")
		if !strings.Contains(nattest.IP(t, "rule"), "lookup 4500") {
			t.Fatal("the crash left no rule behind: nothing to test")
		}
	}

	crash()
	i, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open over a crashed run's state: %v", err)
	}
	if err := i.Close(); err != nil {
		t.Fatal(err)
	}
	if after := snapshot(t); after != before {
		t.Fatalf("after a crash, Open and Close:\n--- before\n%s\n--- after\n%s", before, after)
	}

	// A persistent device of the same name, as a run from an older version
	// or a hand-made one would leave.
	crash()
	if err := netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: DefaultName}, Mode: netlink.TUNTAP_MODE_TUN}); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup(Config{Logger: nattest.Logger(t)}); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	if after := snapshot(t); after != before {
		t.Fatalf("after a crash and Cleanup:\n--- before\n%s\n--- after\n%s", before, after)
	}

	// A device of the name that is not a TUN device is not iketcp's: it
	// stays, and so does everything else.
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: DefaultName}, PeerName: "stray0"}); err != nil {
		t.Fatal(err)
	}
	withVeth := snapshot(t)
	if _, err := Open(cfg); err == nil || !strings.Contains(err.Error(), "not iketcp's") {
		t.Fatalf("Open over a veth device: %v, want a refusal", err)
	}
	if after := snapshot(t); after != withVeth {
		t.Fatalf("a refused Open changed the namespace:\n--- before\n%s\n--- after\n%s", withVeth, after)
	}
}

// TestFailedOpenUndoes fails Open after each thing it installs in turn,
// and checks that it leaves nothing behind.
func TestFailedOpenUndoes(t *testing.T) {
	newLab(t)
	before := stableSnapshot(t)
	cfg := Config{Peers: []netip.Addr{peerV4, peerV6}, Logger: nattest.Logger(t)}
	nattest.CheckUndo(t, func() (io.Closer, error) { return Open(cfg) }, func(step string) {
		if after := snapshot(t); after != before {
			t.Fatalf("a failure after %s left the namespace changed:\n--- before\n%s\n--- after\n%s", step, before, after)
		}
	})
}

// TestIPv6Off checks the error for an IPv6 peer on a host without IPv6.
func TestIPv6Off(t *testing.T) {
	nattest.Enter(t)
	nattest.SetSysctl(t, "net/ipv6/conf/default/disable_ipv6", "1")
	before := snapshot(t)
	_, err := Open(Config{Peers: []netip.Addr{peerV6}, Logger: nattest.Logger(t)})
	if err == nil || !strings.Contains(err.Error(), "IPv6 is off") {
		t.Fatalf("Open with an IPv6 peer and IPv6 off: %v", err)
	}
	if after := snapshot(t); after != before {
		t.Fatalf("the failed Open changed the namespace:\n--- before\n%s\n--- after\n%s", before, after)
	}
	// IPv4 peers do not care.
	i := open(t, Config{Peers: []netip.Addr{peerV4}})
	if err := i.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestNeedsNetAdmin drops CAP_NET_ADMIN from a thread of its own and
// checks that every way in names the capability.
func TestNeedsNetAdmin(t *testing.T) {
	nattest.RequireTUN(t)
	var errs []error
	err := nattest.WithoutNetAdmin(func() error {
		_, err := Open(Config{Peers: []netip.Addr{peerV4}})
		errs = append(errs, err, Cleanup(Config{}))
		// The kernel's own refusal, past the up-front check.
		errs = append(errs, nattest.CreateTUN(modeTransparent, "iketcp9"))
		return errors.Join(errs...)
	})
	if err == nil {
		t.Fatal("no errors without CAP_NET_ADMIN")
	}
	for k, e := range append(errs, err) {
		if e == nil || !errors.Is(e, nat.ErrNeedsNetAdmin) || !strings.Contains(e.Error(), "CAP_NET_ADMIN") {
			t.Errorf("error %d: %v, want one that names CAP_NET_ADMIN", k, e)
		}
	}
	t.Logf("without CAP_NET_ADMIN: %v", err)
}

// TestReadWriteDoNotAllocate counts allocations of Read and Write.
func TestReadWriteDoNotAllocate(t *testing.T) {
	if nattest.RaceEnabled {
		t.Skip("the race detector allocates on its own; make test runs this check without -race")
	}
	newLab(t)
	i := open(t, Config{Peers: []netip.Addr{peerV4}})
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(siteV4, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	to := netip.AddrPortFrom(peerV4, 500)
	send := func() {
		if _, err := c.WriteToUDPAddrPort([]byte("ike"), to); err != nil {
			t.Fatal(err)
		}
	}
	reply := nattest.UDPPacket(to, c.LocalAddr().(*net.UDPAddr).AddrPort(), []byte("reply"))
	tuntest.CheckNoAllocs(t, i, i.MTU(), send, reply)
}

// TestSourceAddress records which source address the kernel gives a
// wildcard-bound socket's packets to the peer, when the route is the
// TUN device's, which has no address.
func TestSourceAddress(t *testing.T) {
	newLab(t)
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	// An address on lo, the first device, beside the one on the way out.
	extra := netip.MustParseAddr("192.0.2.1")
	if err := nattest.AddAddr(lo, extra, 32); err != nil {
		t.Fatal(err)
	}
	i := open(t, Config{Peers: []netip.Addr{peerV4, peerV6}})
	packets := pump(t, i)
	t.Logf("main table: %s", strings.TrimSpace(nattest.IP(t, "route", "get", peerV4.String())))
	t.Logf("intercepted: %s", strings.TrimSpace(nattest.IP(t, "route", "get", peerV4.String(), "ipproto", "udp", "dport", "500")))
	for _, c := range []struct {
		network string
		peer    netip.Addr
	}{{"udp4", peerV4}, {"udp6", peerV6}} {
		s, err := net.ListenUDP(c.network, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if _, err := s.WriteToUDPAddrPort([]byte("ike"), netip.AddrPortFrom(c.peer, 500)); err != nil {
			t.Fatal(err)
		}
		p := next(t, packets)
		t.Logf("a wildcard-bound %s socket's packet to %s leaves with source %s", c.network, c.peer, p.src)
		if !p.src.IsValid() || p.src.IsUnspecified() {
			t.Errorf("no source address: %v", p)
		}
	}
}

// TestNotInRootNamespace, last, makes sure that the tests never touched
// the host's routing: nothing of theirs is in the namespace the test binary
// started in.
func TestNotInRootNamespace(t *testing.T) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, fam := range families(true, true) {
		rules, err := setup.ListRules(h, fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			if r.Table == DefaultTable || r.Mark == DefaultMark {
				t.Errorf("a rule of the tests' in the root namespace: %s", setup.DescribeRule(r))
			}
		}
	}
	if _, err := h.LinkByName(DefaultName); err == nil {
		t.Errorf("a %s device in the root namespace", DefaultName)
	}
}
