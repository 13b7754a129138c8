package nat

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
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

	i := intercept(t, InterceptConfig{Peers: []netip.Addr{peer}})
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
	conn, err := dialTCP(netip.AddrPortFrom(peer, 4500))
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
	expectUDP(t, at4500, []byte("marked"))
	for _, c := range []struct {
		to  netip.AddrPort
		got *net.UDPConn
	}{{netip.AddrPortFrom(other, 4500), otherAt4500}, {netip.AddrPortFrom(peer, 4501), at4501}} {
		if _, err := daemon.WriteToUDPAddrPort([]byte("not IKE"), c.to); err != nil {
			t.Fatal(err)
		}
		expectUDP(t, c.got, []byte("not IKE"))
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
		setSysctlT(t, "net/ipv4/conf/all/rp_filter", rp.all)
		setSysctlT(t, "net/ipv4/conf/"+i.Name()+"/rp_filter", rp.dev)
		payload := fmt.Appendf(nil, "reply with rp_filter all=%s dev=%s", rp.all, rp.dev)
		pkt := udpPacket(from, to, payload)
		if n, err := i.Write([][]byte{append(make([]byte, 16), pkt...)}, 16); n != 1 || err != nil {
			t.Fatalf("Write: %d, %v", n, err)
		}
		if got := expectUDP(t, local, payload); got != from {
			t.Fatalf("reply came from %s, want %s", got, from)
		}
	}

	// Nothing else came through: no router solicitations, no listener
	// reports, no stray packet.
	select {
	case p := <-packets:
		t.Fatalf("unexpected packet %v", p)
	case <-time.After(100 * time.Millisecond):
	}
}

// TestCloseRestoresEverything compares the namespace's rules, routes and
// links before Intercept and after Close, with IPv4 and IPv6 peers.
func TestCloseRestoresEverything(t *testing.T) {
	newLab(t)
	before := stableSnapshot(t)
	i := intercept(t, InterceptConfig{Peers: []netip.Addr{peerV4, peerV6}})
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
	if addrs := ip(t, "addr", "show", "dev", "iketcp0"); strings.Contains(addrs, "inet") {
		t.Errorf("the TUN device has an address:\n%s", addrs)
	}

	// Close wakes a blocked Read.
	readErr := make(chan error, 1)
	go func() {
		buf := make([]byte, i.MTU())
		_, err := i.Read([][]byte{buf}, []int{0}, 0)
		readErr <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := i.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-readErr:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Read after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake a blocked Read")
	}
	if after := snapshot(t); after != before {
		t.Fatalf("Close left the namespace changed:\n--- before\n%s\n--- after\n%s", before, after)
	}
	if err := i.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := i.Write([][]byte{udpPacket(netip.AddrPortFrom(peerV4, 1), netip.AddrPortFrom(siteV4, 1), nil)}, 0); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after Close: %v, want net.ErrClosed", err)
	}
	if _, err := i.Read([][]byte{make([]byte, MTU)}, []int{0}, 0); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read after Close: %v, want net.ErrClosed", err)
	}
}

// TestStaleStateIsRemoved leaves behind what crashed runs leave, and
// checks that Intercept and Cleanup remove it all.
func TestStaleStateIsRemoved(t *testing.T) {
	newLab(t)
	before := stableSnapshot(t)
	cfg := InterceptConfig{Peers: []netip.Addr{peerV4, peerV6}, Logger: testLogger(t)}

	// A crash: the process dies, so its descriptors close and the TUN
	// device goes with them, while the rules stay. Routes in the table that
	// led elsewhere stay too.
	crash := func() {
		t.Helper()
		i, err := Intercept(cfg)
		if err != nil {
			t.Fatal(err)
		}
		i.file.Close()
		i.nl.Close()
		ip(t, "route", "add", "198.51.100.0/24", "via", hopV4.String(), "table", "4500")
		ip(t, "-6", "route", "add", "2001:db8:3::/64", "via", hopV6.String(), "table", "4500")
		if !strings.Contains(ip(t, "rule"), "lookup 4500") {
			t.Fatal("the crash left no rule behind: nothing to test")
		}
	}

	crash()
	i, err := Intercept(cfg)
	if err != nil {
		t.Fatalf("Intercept over a crashed run's state: %v", err)
	}
	if err := i.Close(); err != nil {
		t.Fatal(err)
	}
	if after := snapshot(t); after != before {
		t.Fatalf("after a crash, Intercept and Close:\n--- before\n%s\n--- after\n%s", before, after)
	}

	// A persistent device of the same name, as a run from an older version
	// or a hand-made one would leave.
	crash()
	if err := netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: DefaultName}, Mode: netlink.TUNTAP_MODE_TUN}); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup(InterceptConfig{Logger: testLogger(t)}); err != nil {
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
	if _, err := Intercept(cfg); err == nil || !strings.Contains(err.Error(), "not iketcp's") {
		t.Fatalf("Intercept over a veth device: %v, want a refusal", err)
	}
	if after := snapshot(t); after != withVeth {
		t.Fatalf("a refused Intercept changed the namespace:\n--- before\n%s\n--- after\n%s", withVeth, after)
	}
}

// TestFailedInterceptUndoes fails Intercept after each thing it installs
// in turn, and checks that it leaves nothing behind.
func TestFailedInterceptUndoes(t *testing.T) {
	newLab(t)
	before := stableSnapshot(t)
	t.Cleanup(func() { testHookInstalled = nil })
	var steps []string
	testHookInstalled = func(what string) error {
		steps = append(steps, what)
		return nil
	}
	cfg := InterceptConfig{Peers: []netip.Addr{peerV4, peerV6}, Logger: testLogger(t)}
	i, err := Intercept(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := i.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Intercept installs %d things: %s", len(steps), strings.Join(steps, "; "))
	for fail := range steps {
		n := 0
		testHookInstalled = func(what string) error {
			if n++; n > fail {
				return fmt.Errorf("injected failure after %s", what)
			}
			return nil
		}
		if _, err := Intercept(cfg); err == nil || !strings.Contains(err.Error(), "injected failure") {
			t.Fatalf("failing after %s: %v", steps[fail], err)
		}
		if after := snapshot(t); after != before {
			t.Fatalf("a failure after %s left the namespace changed:\n--- before\n%s\n--- after\n%s", steps[fail], before, after)
		}
	}
}

// TestIPv6Off checks the error for an IPv6 peer on a host without IPv6.
func TestIPv6Off(t *testing.T) {
	enterNetns(t)
	setSysctlT(t, "net/ipv6/conf/default/disable_ipv6", "1")
	before := snapshot(t)
	_, err := Intercept(InterceptConfig{Peers: []netip.Addr{peerV6}, Logger: testLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "IPv6 is off") {
		t.Fatalf("Intercept with an IPv6 peer and IPv6 off: %v", err)
	}
	if after := snapshot(t); after != before {
		t.Fatalf("the failed Intercept changed the namespace:\n--- before\n%s\n--- after\n%s", before, after)
	}
	// IPv4 peers do not care.
	i := intercept(t, InterceptConfig{Peers: []netip.Addr{peerV4}})
	if err := i.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestNeedsNetAdmin drops CAP_NET_ADMIN from a thread of its own and
// checks that every way in names the capability.
func TestNeedsNetAdmin(t *testing.T) {
	requireNetns(t)
	var errs []error
	err := nattest.OnNewThread(func() error {
		// A namespace of its own first, while the thread may still make one.
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return err
		}
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			return err
		}
		data[0].Effective &^= 1 << unix.CAP_NET_ADMIN
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			return err
		}
		_, err := Intercept(InterceptConfig{Peers: []netip.Addr{peerV4}})
		errs = append(errs, err, Cleanup(InterceptConfig{}))
		// The kernel's own refusal, past the up-front check.
		f, err := openTUN(modeTransparent, "iketcp9")
		if err == nil {
			f.Close()
		}
		return errors.Join(append(errs, err)...)
	})
	if err == nil {
		t.Fatal("no errors without CAP_NET_ADMIN")
	}
	for k, e := range append(errs, err) {
		if e == nil || !errors.Is(e, ErrNeedsNetAdmin) || !strings.Contains(e.Error(), "CAP_NET_ADMIN") {
			t.Errorf("error %d: %v, want one that names CAP_NET_ADMIN", k, e)
		}
	}
	t.Logf("without CAP_NET_ADMIN: %v", err)
}

// TestReadBatches sends a burst and checks that Read takes more than one
// packet per call.
func TestReadBatches(t *testing.T) {
	newLab(t)
	i := intercept(t, InterceptConfig{Peers: []netip.Addr{peerV4}})
	c, err := net.ListenUDP("udp4", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const burst = 50
	to := netip.AddrPortFrom(peerV4, 4500)
	for k := range burst {
		if _, err := c.WriteToUDPAddrPort(fmt.Appendf(nil, "%d", k), to); err != nil {
			t.Fatal(err)
		}
	}
	bufs := make([][]byte, i.BatchSize())
	for k := range bufs {
		bufs[k] = make([]byte, i.MTU()+8)
	}
	sizes := make([]int, len(bufs))
	// A buffer without room is refused before anything is read.
	if n, err := i.Read([][]byte{make([]byte, 8)}, sizes, 8); n != 0 || !errors.Is(err, errOffset) {
		t.Fatalf("Read into a buffer without room: %d, %v", n, err)
	}
	got, most, calls := 0, 0, 0
	for got < burst {
		n, err := i.Read(bufs, sizes, 8)
		if err != nil {
			t.Fatal(err)
		}
		for k := range n {
			p, err := parsePacket(bufs[k][8 : 8+sizes[k]])
			if err != nil || string(p.payload) != fmt.Sprint(got+k) {
				t.Fatalf("packet %d: %v %v", got+k, p, err)
			}
		}
		got += n
		most = max(most, n)
		calls++
	}
	t.Logf("%d packets in %d calls, at most %d per call", got, calls, most)
	if most < 2 {
		t.Fatal("Read never returned more than one packet")
	}

	// A packet longer than its buffer is cut to the buffer, and its IP
	// length field tells.
	if _, err := c.WriteToUDPAddrPort(make([]byte, 1000), to); err != nil {
		t.Fatal(err)
	}
	short := make([]byte, 200)
	if n, err := i.Read([][]byte{short}, sizes, 0); n != 1 || err != nil || sizes[0] != len(short) {
		t.Fatalf("Read into a short buffer: %d, %v, size %d", n, err, sizes[0])
	}
	if total := int(short[2])<<8 | int(short[3]); total != 20+8+1000 {
		t.Fatalf("cut packet's IP length field: %d", total)
	}
}

// TestReadWriteDoNotAllocate counts allocations of Read and Write.
func TestReadWriteDoNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates on its own; make test runs this check without -race")
	}
	newLab(t)
	i := intercept(t, InterceptConfig{Peers: []netip.Addr{peerV4}})
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(siteV4, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const runs = 100
	to := netip.AddrPortFrom(peerV4, 500)
	for range runs + 1 { // AllocsPerRun runs once more to warm up
		if _, err := c.WriteToUDPAddrPort([]byte("ike"), to); err != nil {
			t.Fatal(err)
		}
	}
	bufs := [][]byte{make([]byte, i.MTU())}
	sizes := []int{0}
	if a := testing.AllocsPerRun(runs, func() {
		if n, err := i.Read(bufs, sizes, 0); n != 1 || err != nil {
			t.Fatalf("Read: %d, %v", n, err)
		}
	}); a != 0 {
		t.Errorf("Read: %v allocations per call", a)
	}
	reply := [][]byte{udpPacket(to, c.LocalAddr().(*net.UDPAddr).AddrPort(), []byte("reply"))}
	if a := testing.AllocsPerRun(runs, func() {
		if n, err := i.Write(reply, 0); n != 1 || err != nil {
			t.Fatalf("Write: %d, %v", n, err)
		}
	}); a != 0 {
		t.Errorf("Write: %v allocations per call", a)
	}
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
	if err := addAddr(lo, extra, 32); err != nil {
		t.Fatal(err)
	}
	i := intercept(t, InterceptConfig{Peers: []netip.Addr{peerV4, peerV6}})
	packets := pump(t, i)
	t.Logf("main table: %s", strings.TrimSpace(ip(t, "route", "get", peerV4.String())))
	t.Logf("intercepted: %s", strings.TrimSpace(ip(t, "route", "get", peerV4.String(), "ipproto", "udp", "dport", "500")))
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
		rules, err := listRules(h, fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			if r.Table == DefaultTable || r.Mark == DefaultMark {
				t.Errorf("a rule of the tests' in the root namespace: %s", describeRule(r))
			}
		}
	}
	if _, err := h.LinkByName(DefaultName); err == nil {
		t.Errorf("a %s device in the root namespace", DefaultName)
	}
}
