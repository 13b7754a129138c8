package realaddr

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat"
	"github.com/iketcp/iketcp/nat/internal/setup"
	"github.com/iketcp/iketcp/nat/nattest"
)

// The tests build everything in anonymous network namespaces: they never
// appear in `ip netns list`, and they vanish with their last thread,
// socket or descriptor, even if the test binary dies.
//
// The lab: the test's own namespace is the hub, where the IKE daemon (a
// UDP socket) and real-address mode run; a veth pair joins it to the
// client's namespace, which alone has the clients' addresses.
var (
	hubV4    = netip.MustParseAddr("100.64.0.1")
	clientV4 = netip.MustParseAddr("100.64.0.2")
	hubV6    = netip.MustParseAddr("2001:db8:1::1")
	clientV6 = netip.MustParseAddr("2001:db8:1::2")
)

// The veth pair's ends.
const (
	hubVeth    = "hub0"
	clientVeth = "cli0"
)

// lab is the hub's namespace (the test's own) wired to the client's.
type lab struct {
	client *nattest.NS
}

// newLab moves the test into a new namespace (nattest.Enter) and wires it
// to a client namespace that owns clientV4 and clientV6.
func newLab(t *testing.T) *lab {
	t.Helper()
	requireNft(t)
	nattest.Enter(t)
	// IPv6 addresses usable at once on both sides, and no routes that
	// come later.
	if err := nattest.NoDAD(); err != nil {
		t.Fatal(err)
	}
	l := &lab{client: nattest.New(t)}
	if err := l.client.Do(nattest.NoDAD); err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hubVeth},
		PeerName:      clientVeth,
		PeerNamespace: netlink.NsFd(l.client.Fd()),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	// Up first: IPv6 addresses added to a link that is down answer
	// neighbour solicitations only a second or two later.
	up := func(name string, v4, v6 netip.Addr) error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return errors.Join(netlink.LinkSetUp(link), nattest.AddAddr(link, v4, 24), nattest.AddAddr(link, v6, 64))
	}
	if err := up(hubVeth, hubV4, hubV6); err != nil {
		t.Fatal(err)
	}
	if err := l.client.Do(func() error { return up(clientVeth, clientV4, clientV6) }); err != nil {
		t.Fatal(err)
	}
	// Traffic before the carrier is on is lost.
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		link, err := netlink.LinkByName(hubVeth)
		if err != nil {
			t.Fatal(err)
		}
		if link.Attrs().OperState == netlink.OperUp {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%s stays %s", hubVeth, link.Attrs().OperState)
		}
	}
	return l
}

// requireNft skips (or under CI=true fails) a test that reads the ruleset
// with nft, where it is missing.
func requireNft(t *testing.T) {
	t.Helper()
	nattest.RequireTUN(t)
	if _, err := exec.LookPath("nft"); err != nil {
		msg := "needs the nft command (Debian package nftables) to read the ruleset"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg + "; CI=true, so this is a failure, not a skip")
		}
		t.Skip(msg)
	}
}

// snapshot is what Close must leave exactly as it found it: the rules,
// the routes of every table and the nftables ruleset.
func snapshot(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"rule"}, {"-6", "rule"},
		{"route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"},
	} {
		fmt.Fprintf(&b, "== ip %s\n%s", strings.Join(args, " "), nattest.IP(t, args...))
	}
	fmt.Fprintf(&b, "== nft list ruleset\n%s", nft(t, "list", "ruleset"))
	return b.String()
}

// stableSnapshot waits until two snapshots in a row agree.
func stableSnapshot(t *testing.T) string {
	t.Helper()
	return nattest.Settled(t, func() string { return snapshot(t) })
}

// nft runs the nft command in the calling thread's namespace.
func nft(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("nft", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("nft %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// sameSnapshot fails the test if after differs from before.
func sameSnapshot(t *testing.T, what, before, after string) {
	t.Helper()
	if before == after {
		return
	}
	b, a := strings.Split(before, "\n"), strings.Split(after, "\n")
	var diff []string
	for _, l := range b {
		if !slices.Contains(a, l) {
			diff = append(diff, "- "+l)
		}
	}
	for _, l := range a {
		if !slices.Contains(b, l) {
			diff = append(diff, "+ "+l)
		}
	}
	t.Fatalf("%s left the namespace changed:\n%s\n--- before\n%s\n--- after\n%s", what, strings.Join(diff, "\n"), before, after)
}

// mustContain fails the test for each of want that s lacks.
func mustContain(t *testing.T, s string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(s, w) {
			t.Errorf("missing %q in:\n%s", w, s)
		}
	}
}

// start runs Setup in the calling thread's namespace and closes the Net
// at the test's end.
func start(t *testing.T, cfg Config) *Net {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = nattest.Logger(t)
	}
	n, err := Setup(cfg)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return n
}

// dial opens a session's socket and releases it at the test's end; it
// returns the socket, its address and its release.
func dial(t *testing.T, n *Net, client netip.Addr, backend netip.AddrPort) (*net.UDPConn, netip.AddrPort, func() error) {
	t.Helper()
	c, release, err := n.Dial(client, backend)
	if err != nil {
		t.Fatalf("Dial(%s, %s): %v", client, backend, err)
	}
	t.Cleanup(func() {
		if err := release(); err != nil {
			t.Errorf("release: %v", err)
		}
	})
	return c, c.LocalAddr().(*net.UDPAddr).AddrPort(), release
}

// rawDial opens a session's socket as Dial does, without its checks of
// the backend's address.
func rawDial(t *testing.T, n *Net, client netip.Addr, backend netip.AddrPort) (*net.UDPConn, netip.AddrPort, func() error) {
	t.Helper()
	c, err := n.dialTransparent(client, backend)
	if err != nil {
		t.Fatal(err)
	}
	at := c.LocalAddr().(*net.UDPAddr).AddrPort()
	s := &socket{conn: c, set: n.set4, key: elementKey(at, backend)}
	if client.Is6() {
		s.set = n.set6
	}
	if err := n.add(s); err != nil {
		c.Close()
		t.Fatal(err)
	}
	release := sync.OnceValue(func() error { return n.release(s) })
	t.Cleanup(func() { release() })
	return c, at, release
}

// listen opens a UDP socket in the calling thread's namespace.
func listen(t *testing.T, at netip.AddrPort) *net.UDPConn {
	t.Helper()
	network := "udp6"
	if at.Addr().Is4() {
		network = "udp4"
	}
	c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(at))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// listenClient opens a UDP socket in the client's namespace.
func (l *lab) listenClient(t *testing.T, at netip.AddrPort) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := l.client.Do(func() error { c = listen(t, at); return nil }); err != nil {
		t.Fatal(err)
	}
	return c
}

// write sends payload on a connected socket.
func write(t *testing.T, c *net.UDPConn, payload []byte) {
	t.Helper()
	if _, err := c.Write(payload); err != nil {
		t.Fatalf("%s: write: %v", c.LocalAddr(), err)
	}
}

// sendTo sends payload from c to to.
func sendTo(t *testing.T, c *net.UDPConn, to netip.AddrPort, payload []byte) {
	t.Helper()
	if _, err := c.WriteToUDPAddrPort(payload, to); err != nil {
		t.Fatalf("%s: send to %s: %v", c.LocalAddr(), to, err)
	}
}

// expectNothing checks that c receives nothing within wait.
func expectNothing(t *testing.T, c *net.UDPConn, wait time.Duration) {
	t.Helper()
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(wait))
	defer c.SetReadDeadline(time.Time{})
	if n, from, err := c.ReadFromUDPAddrPort(buf); err == nil {
		t.Fatalf("%s received %q from %s, want nothing", c.LocalAddr(), buf[:n], from)
	} else if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("%s: %v", c.LocalAddr(), err)
	}
}

// udpPacket is a UDP datagram that a capture saw.
type udpPacket struct{ src, dst netip.AddrPort }

func (p udpPacket) String() string { return fmt.Sprintf("UDP %s -> %s", p.src, p.dst) }

// capture records every packet through a device, both ways, with an
// AF_PACKET socket; udp reads what it holds without blocking, so that no
// goroutine is needed.
type capture struct {
	fd   int
	name string
}

// startCapture opens a capture of the device name in the calling thread's
// namespace; it is closed at the test's end.
func startCapture(t *testing.T, name string) *capture {
	t.Helper()
	link, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	// Protocol 0 until bound, so that nothing from another device gets in.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("AF_PACKET socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	all := uint16(unix.ETH_P_ALL)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: all<<8 | all>>8, Ifindex: link.Attrs().Index}); err != nil {
		t.Fatalf("bind AF_PACKET socket to %s: %v", name, err)
	}
	return &capture{fd: fd, name: name}
}

// udp returns the UDP datagrams captured since the last call.
func (c *capture) udp(t *testing.T) []udpPacket {
	t.Helper()
	var pkts []udpPacket
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) {
			return pkts
		}
		if err != nil {
			t.Fatalf("capture on %s: %v", c.name, err)
		}
		if n < 14 {
			continue
		}
		ip := buf[14:n]
		var src, dst netip.Addr
		var rest []byte
		switch typ := binary.BigEndian.Uint16(buf[12:]); {
		case typ == unix.ETH_P_IP && len(ip) >= 20 && ip[9] == unix.IPPROTO_UDP:
			src, dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
			rest = ip[int(ip[0]&0xf)*4:]
		case typ == unix.ETH_P_IPV6 && len(ip) >= 40 && ip[6] == unix.IPPROTO_UDP:
			src, dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
			rest = ip[40:]
		default:
			continue
		}
		if len(rest) < 8 {
			continue
		}
		pkts = append(pkts, udpPacket{
			netip.AddrPortFrom(src, binary.BigEndian.Uint16(rest[0:])),
			netip.AddrPortFrom(dst, binary.BigEndian.Uint16(rest[2:])),
		})
	}
}

// element is how nft lists a session socket's element.
func element(at, backend netip.AddrPort) string {
	return fmt.Sprintf("%s . %d . %s . %d", at.Addr(), at.Port(), backend.Addr(), backend.Port())
}

func TestRealAddrIPv4(t *testing.T) { checkRealAddr(t, false) }

func TestRealAddrIPv6(t *testing.T) { checkRealAddr(t, true) }

// checkRealAddr runs two sessions of one client address to the daemon on
// the hub: the daemon sees the client's address, a port for each; its
// answers come back to each session's socket and none leaves the host;
// a released socket's answers leave the host again, and after Close all
// do, and the hub is as it was.
func checkRealAddr(t *testing.T, v6 bool) {
	l := newLab(t)
	hub, client := hubV4, clientV4
	// The daemon listens on all addresses, as strongSwan does, and answers
	// from the one the route to the client gives: the backend's.
	daemonAt := netip.AddrPortFrom(netip.IPv4Unspecified(), 4500)
	if v6 {
		// On IPv6 it listens on the backend's address alone.
		hub, client = hubV6, clientV6
		daemonAt = netip.AddrPortFrom(hub, 4500)
	}
	backend := netip.AddrPortFrom(hub, 4500)
	daemon := listen(t, daemonAt)
	before := stableSnapshot(t)
	wire := startCapture(t, hubVeth)
	n := start(t, Config{})
	if !n.IPv6() {
		t.Fatal("IPv6 is on, but the Net says it is off")
	}

	c1, at1, release1 := dial(t, n, client, backend)
	c2, at2, release2 := dial(t, n, client, backend)
	t.Logf("two sessions of %s: %s and %s", client, at1, at2)
	if at1.Addr() != client || at2.Addr() != client || at1.Port() == at2.Port() {
		t.Fatalf("the sockets are at %s and %s, want %s at two ports", at1, at2, client)
	}
	if c1.RemoteAddr().(*net.UDPAddr).AddrPort() != backend {
		t.Fatalf("the socket is connected to %s, want %s", c1.RemoteAddr(), backend)
	}

	// The daemon sees the client's address, and each session's port.
	write(t, c1, []byte("from one"))
	if from := nattest.ExpectUDP(t, daemon, []byte("from one")); from != at1 {
		t.Fatalf("the daemon got the first session's datagram from %s, want %s", from, at1)
	}
	write(t, c2, []byte("from two"))
	if from := nattest.ExpectUDP(t, daemon, []byte("from two")); from != at2 {
		t.Fatalf("the daemon got the second session's datagram from %s, want %s", from, at2)
	}

	// Its answers come back to each session's socket, one bigger than
	// the veth's MTU too; and nothing reaches the client's namespace, where
	// sockets wait at the sessions' addresses.
	away1, away2 := l.listenClient(t, at1), l.listenClient(t, at2)
	big := bytes.Repeat([]byte("big answer "), 165)
	sendTo(t, daemon, at2, []byte("to two"))
	sendTo(t, daemon, at1, []byte("to one"))
	sendTo(t, daemon, at1, big)
	nattest.ExpectUDP(t, c2, []byte("to two"))
	nattest.ExpectUDP(t, c1, []byte("to one"))
	nattest.ExpectUDP(t, c1, big)
	expectNothing(t, away1, 100*time.Millisecond)
	expectNothing(t, away2, 10*time.Millisecond)
	if pkts := wire.udp(t); len(pkts) != 0 {
		t.Fatalf("%s carried %v: the daemon's answers left the host", hubVeth, pkts)
	}
	table := nft(t, "list", "table", "inet", "iketcp_realaddr")
	t.Logf("with two sessions:\n%s", table)
	mustContain(t, table, element(at1, backend), element(at2, backend))

	// Released, the first socket is closed and its element gone: the
	// daemon's next datagram to it leaves the host. The second session is
	// as it was.
	if err := release1(); err != nil {
		t.Fatal(err)
	}
	if err := release1(); err != nil {
		t.Fatalf("a second release: %v", err)
	}
	if _, err := c1.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("a released socket writes: %v", err)
	}
	if table := nft(t, "list", "table", "inet", "iketcp_realaddr"); strings.Contains(table, element(at1, backend)) || !strings.Contains(table, element(at2, backend)) {
		t.Fatalf("after the first release:\n%s", table)
	}
	sendTo(t, daemon, at1, []byte("after the release"))
	nattest.ExpectUDP(t, away1, []byte("after the release"))
	sendTo(t, daemon, at2, []byte("still to two"))
	nattest.ExpectUDP(t, c2, []byte("still to two"))
	expectNothing(t, away2, 50*time.Millisecond)
	if pkts := wire.udp(t); len(pkts) != 1 || pkts[0] != (udpPacket{backend, at1}) {
		t.Fatalf("%s carried %v, want only the datagram to the released socket", hubVeth, pkts)
	}

	// Close closes the second socket, and puts the hub back as it was:
	// the daemon's datagrams to the second session leave the host too.
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Read(make([]byte, 10)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("after Close, a socket that was not released reads: %v", err)
	}
	if err := release2(); err != nil {
		t.Fatalf("a release after Close: %v", err)
	}
	sameSnapshot(t, "Close", before, snapshot(t))
	sendTo(t, daemon, at2, []byte("after Close"))
	nattest.ExpectUDP(t, away2, []byte("after Close"))
	if n.sockets() != 0 {
		t.Errorf("%d sockets left after Close", n.sockets())
	}
}

// TestWhatSetupInstalls checks, and logs, the rules, routes and table of
// two Nets, one with the defaults and one with a configuration of its
// own, and that their Close, from a thread in another namespace, puts
// everything back.
func TestWhatSetupInstalls(t *testing.T) {
	requireNft(t)
	nattest.Enter(t)
	before := stableSnapshot(t)
	other := nattest.New(t)
	var otherBefore string
	if err := other.Do(func() error { otherBefore = snapshot(t); return nil }); err != nil {
		t.Fatal(err)
	}
	a := start(t, Config{})
	b := start(t, Config{Mark: 0x77, Table: 77, Priority: 50, Name: "b"})
	rules4, rules6 := nattest.IP(t, "rule"), nattest.IP(t, "-6", "rule")
	routes4, routes6 := nattest.IP(t, "route", "show", "table", "4501"), nattest.IP(t, "-6", "route", "show", "table", "4501")
	table := nft(t, "list", "table", "inet", "iketcp_realaddr")
	t.Logf("ip rule:\n%sip -6 rule:\n%sip route show table 4501:\n%sip -6 route show table 4501:\n%snft list table inet iketcp_realaddr:\n%s",
		rules4, rules6, routes4, routes6, table)
	for _, rules := range []string{rules4, rules6} {
		mustContain(t, rules, "99:\tfrom all fwmark 0x4501 lookup 4501\n", "50:\tfrom all fwmark 0x77 lookup 77\n")
	}
	mustContain(t, routes4, "local default dev lo scope host \n")
	mustContain(t, routes6, "local default dev lo metric 1024 pref medium\n")
	mustContain(t, table,
		"table inet iketcp_realaddr {",
		"set sessions4 {\n\t\ttype ipv4_addr . inet_service . ipv4_addr . inet_service\n\t}",
		"set sessions6 {\n\t\ttype ipv6_addr . inet_service . ipv6_addr . inet_service\n\t}",
		"chain output {\n\t\ttype route hook output priority mangle; policy accept;\n",
		"\t\tip daddr . udp dport . ip saddr . udp sport @sessions4 meta mark set 0x00004501\n",
		"\t\tip6 daddr . udp dport . ip6 saddr . udp sport @sessions6 meta mark set 0x00004501\n",
	)
	mustContain(t, nft(t, "list", "table", "inet", "iketcp_realaddr_b"), "meta mark set 0x00000077")
	mustContain(t, nattest.IP(t, "route", "show", "table", "77"), "local default dev lo scope host")
	// What the marks do: any address is local in their tables.
	mustContain(t, nattest.IP(t, "route", "get", "198.51.100.7", "mark", "0x4501"), "local 198.51.100.7 dev lo table 4501")
	mustContain(t, nattest.IP(t, "-6", "route", "get", "2001:db8::7", "mark", "0x77"), "local 2001:db8::7 ", " dev lo table 77 ")

	for _, n := range []*Net{b, a} {
		if err := other.Do(n.Close); err != nil {
			t.Fatal(err)
		}
	}
	sameSnapshot(t, "Close", before, snapshot(t))
	if err := other.Do(func() error { sameSnapshot(t, "Close from this namespace", otherBefore, snapshot(t)); return nil }); err != nil {
		t.Fatal(err)
	}
}

// TestSessionsConcurrently opens, uses and releases sessions of one
// client address from several goroutines at once (for the race detector
// too): each gets its own answers, and at the end the sets are empty.
// Half of the sockets are closed by their owner before their release, so
// that a new socket may take their port first.
func TestSessionsConcurrently(t *testing.T) {
	newLab(t)
	backend := netip.AddrPortFrom(hubV4, 4500)
	daemon := listen(t, backend)
	// The daemon echoes every datagram to where it came from.
	var echo sync.WaitGroup
	echo.Add(1)
	go func() {
		defer echo.Done()
		buf := make([]byte, 2048)
		for {
			n, from, err := daemon.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			daemon.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	t.Cleanup(func() { daemon.Close(); echo.Wait() })
	n := start(t, Config{})
	hub := netnsFd(t)

	const workers, sessions = 4, 25
	errs := make(chan error, workers)
	for w := range workers {
		go func() {
			errs <- inNetns(hub, func() error {
				buf := make([]byte, 100)
				for k := range sessions {
					c, release, err := n.Dial(clientV4, backend)
					if err != nil {
						return err
					}
					msg := fmt.Sprintf("worker %d session %d from %s", w, k, c.LocalAddr())
					c.SetDeadline(time.Now().Add(5 * time.Second))
					_, err = c.Write([]byte(msg))
					var got int
					if err == nil {
						got, err = c.Read(buf)
					}
					if err == nil && string(buf[:got]) != msg {
						err = fmt.Errorf("sent %q, got back %q", msg, buf[:got])
					}
					if k%2 == 0 {
						c.Close()
					}
					if rerr := release(); err != nil || rerr != nil {
						return errors.Join(err, rerr)
					}
				}
				return nil
			})
		}()
	}
	for range workers {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if k := n.sockets(); k != 0 {
		t.Errorf("%d sockets not released", k)
	}
	if table := nft(t, "list", "table", "inet", "iketcp_realaddr"); strings.Contains(table, "elements") {
		t.Errorf("elements left after every release:\n%s", table)
	}
}

// netnsFd opens the calling thread's network namespace; it is closed at
// the test's end.
func netnsFd(t *testing.T) int {
	t.Helper()
	fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// inNetns runs f on a fresh thread in the network namespace fd; the
// thread ends with f.
func inNetns(fd int, f func() error) error {
	return nattest.OnNewThread(func() error {
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("setns: %w", err)
		}
		return f()
	})
}

// TestDialRefuses checks Dial's refusals: a loopback backend, a backend
// that is not the host's, addresses of two families, a thread in another
// namespace, and a closed Net. None puts anything on the wire.
func TestDialRefuses(t *testing.T) {
	newLab(t)
	wire := startCapture(t, hubVeth)
	n := start(t, Config{})
	backend := netip.AddrPortFrom(hubV4, 4500)
	for _, c := range []struct {
		client  netip.Addr
		backend netip.AddrPort
		want    string
	}{
		{clientV4, netip.MustParseAddrPort("127.0.0.1:4500"), "backend 127.0.0.1:4500 is a loopback address"},
		{clientV6, netip.MustParseAddrPort("[::1]:4500"), "backend [::1]:4500 is a loopback address"},
		{clientV4, netip.AddrPortFrom(clientV4, 4500), "backend 100.64.0.2:4500 is not an address of this host"},
		{clientV4, netip.MustParseAddrPort("203.0.113.9:4500"), "backend 203.0.113.9:4500 is not an address of this host"},
		{clientV6, backend, "different IP families"},
	} {
		conn, _, err := n.Dial(c.client, c.backend)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			if conn != nil {
				conn.Close()
			}
			t.Errorf("got %v, want an error about %q", err, c.want)
			continue
		}
		t.Logf("refused: %v", err)
	}
	other := nattest.New(t)
	if err := other.Do(func() error {
		_, _, err := n.Dial(clientV4, backend)
		if err == nil || !strings.Contains(err.Error(), "another network namespace") {
			return fmt.Errorf("Dial from another namespace: %v", err)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if k := n.sockets(); k != 0 {
		t.Errorf("%d sockets after refusals", k)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := n.Dial(clientV4, backend); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Dial after Close: %v", err)
	}
	if pkts := wire.udp(t); len(pkts) != 0 {
		t.Errorf("%s carried %v", hubVeth, pkts)
	}
}

// TestLoopbackBackend shows why Dial refuses a loopback backend, with
// sockets that Dial's checks would have refused. IPv4: the daemon cannot
// answer from 127.0.0.1 to a client's address (EINVAL) unless
// route_localnet lets 127.0.0.0/8 sources off the host. IPv6: the daemon
// answers from ::1 and the mark brings the answer back, but once the
// socket is released the daemon's datagrams leave the host from ::1.
func TestLoopbackBackend(t *testing.T) {
	newLab(t)
	wire := startCapture(t, hubVeth)
	n := start(t, Config{})

	backend := netip.MustParseAddrPort("127.0.0.1:4500")
	daemon := listen(t, backend)
	c, at, _ := rawDial(t, n, clientV4, backend)
	write(t, c, []byte("hello"))
	if from := nattest.ExpectUDP(t, daemon, []byte("hello")); from != at {
		t.Fatalf("the daemon got the datagram from %s, want %s", from, at)
	}
	_, err := daemon.WriteToUDPAddrPort([]byte("answer"), at)
	t.Logf("the daemon at %s answering %s: %v", backend, at, err)
	if !errors.Is(err, unix.EINVAL) {
		t.Fatalf("the daemon's answer from 127.0.0.1: %v, want EINVAL", err)
	}
	nattest.SetSysctl(t, "net/ipv4/conf/all/route_localnet", "1")
	sendTo(t, daemon, at, []byte("answer"))
	nattest.ExpectUDP(t, c, []byte("answer"))
	t.Logf("with net.ipv4.conf.all.route_localnet=1, the answer from 127.0.0.1 came back to the socket")
	nattest.SetSysctl(t, "net/ipv4/conf/all/route_localnet", "0")

	backend6 := netip.MustParseAddrPort("[::1]:4500")
	daemon6 := listen(t, backend6)
	c6, at6, release6 := rawDial(t, n, clientV6, backend6)
	write(t, c6, []byte("hello"))
	nattest.ExpectUDP(t, daemon6, []byte("hello"))
	sendTo(t, daemon6, at6, []byte("answer"))
	nattest.ExpectUDP(t, c6, []byte("answer"))
	if pkts := wire.udp(t); len(pkts) != 0 {
		t.Fatalf("%s carried %v", hubVeth, pkts)
	}
	if err := release6(); err != nil {
		t.Fatal(err)
	}
	sendTo(t, daemon6, at6, []byte("leaks"))
	time.Sleep(50 * time.Millisecond)
	pkts := wire.udp(t)
	t.Logf("after the release, %s carried %v", hubVeth, pkts)
	if len(pkts) != 1 || pkts[0] != (udpPacket{backend6, at6}) {
		t.Fatalf("%s carried %v, want the daemon's datagram from ::1", hubVeth, pkts)
	}
}

// TestClientNeedsARoute shows that the daemon's answers to a client's
// address are routed once before they are marked: without a route to the
// client's address they fail; any route will do.
func TestClientNeedsARoute(t *testing.T) {
	newLab(t)
	wire := startCapture(t, hubVeth)
	n := start(t, Config{})
	backend := netip.AddrPortFrom(hubV4, 4500)
	daemon := listen(t, backend)
	far := netip.MustParseAddr("198.51.100.7") // the hub has no route to it
	c, at, _ := dial(t, n, far, backend)
	write(t, c, []byte("hello"))
	if from := nattest.ExpectUDP(t, daemon, []byte("hello")); from != at {
		t.Fatalf("the daemon got the datagram from %s, want %s", from, at)
	}
	_, err := daemon.WriteToUDPAddrPort([]byte("answer"), at)
	t.Logf("without a route to %s, the daemon's answer: %v", far, err)
	if !errors.Is(err, unix.ENETUNREACH) {
		t.Fatalf("the daemon's answer without a route: %v, want ENETUNREACH", err)
	}
	nattest.IP(t, "route", "add", "default", "via", clientV4.String())
	sendTo(t, daemon, at, []byte("answer"))
	nattest.ExpectUDP(t, c, []byte("answer"))
	if pkts := wire.udp(t); len(pkts) != 0 {
		t.Fatalf("%s carried %v", hubVeth, pkts)
	}
}

// TestBackendAddressGoes takes the backend's address from the host while
// a session's socket is open: the socket's mark routes its datagrams by
// the local table still, so none leaves the host with the client's
// address, where the main table would send them out.
func TestBackendAddressGoes(t *testing.T) {
	newLab(t)
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	hub := netip.MustParseAddr("192.0.2.1")
	if err := nattest.AddAddr(lo, hub, 32); err != nil {
		t.Fatal(err)
	}
	nattest.IP(t, "route", "add", "192.0.2.0/24", "via", clientV4.String())
	wire := startCapture(t, hubVeth)
	n := start(t, Config{})
	backend := netip.AddrPortFrom(hub, 4500)
	daemon := listen(t, backend)
	c, _, _ := dial(t, n, netip.MustParseAddr("198.51.100.7"), backend)
	write(t, c, []byte("hello"))
	nattest.ExpectUDP(t, daemon, []byte("hello"))
	nattest.IP(t, "addr", "del", hub.String()+"/32", "dev", "lo")
	t.Logf("with the backend's address gone: %s", strings.TrimSpace(nattest.IP(t, "route", "get", hub.String(), "mark", "0x4501")))
	for range 3 {
		c.Write([]byte("hello again")) // refused, at the second write, by the local delivery's ICMP error
	}
	time.Sleep(50 * time.Millisecond)
	if pkts := wire.udp(t); len(pkts) != 0 {
		t.Fatalf("%s carried %v: the socket sent the client's address on the wire", hubVeth, pkts)
	}
}

// TestStaleStateIsRemoved leaves behind what crashed runs leave, and what
// others put in the table of iketcp's, and checks that Setup and Cleanup
// remove it all.
func TestStaleStateIsRemoved(t *testing.T) {
	requireNft(t)
	nattest.Enter(t)
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	hub := netip.MustParseAddr("192.0.2.1")
	if err := nattest.AddAddr(lo, hub, 32); err != nil {
		t.Fatal(err)
	}
	before := stableSnapshot(t)
	cfg := Config{Logger: nattest.Logger(t)}

	// A crash: the process dies, so its sockets close, while the table,
	// the rules and the routes stay, an element in the set too.
	crash := func() {
		t.Helper()
		n, err := Setup(cfg)
		if err != nil {
			t.Fatal(err)
		}
		c, _, err := n.Dial(netip.MustParseAddr("198.51.100.7"), netip.AddrPortFrom(hub, 4500))
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		n.nft.CloseLasting()
		n.nl.Close()
		s := snapshot(t)
		if !strings.Contains(s, "table inet iketcp_realaddr") || !strings.Contains(s, "fwmark 0x4501 lookup 4501") || !strings.Contains(s, "198.51.100.7 . ") {
			t.Fatalf("the crash left nothing behind: nothing to test\n%s", s)
		}
		// What others put in table 4501, and a rule that leads to it.
		nattest.IP(t, "route", "add", "10.9.9.0/24", "dev", "lo", "table", "4501")
		nattest.IP(t, "rule", "add", "pref", "300", "from", "10.9.9.9", "lookup", "4501")
	}

	crash()
	n, err := Setup(cfg)
	if err != nil {
		t.Fatalf("Setup over a crashed run's state: %v", err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, "a crash, Setup and Close", before, snapshot(t))

	crash()
	if err := Cleanup(cfg); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	sameSnapshot(t, "a crash and Cleanup", before, snapshot(t))
	if err := Cleanup(cfg); err != nil {
		t.Fatalf("Cleanup with nothing to clean: %v", err)
	}
	sameSnapshot(t, "a second Cleanup", before, snapshot(t))
}

// TestMarkInUse checks that Setup refuses a Mark that another policy rule
// selects, and changes nothing then.
func TestMarkInUse(t *testing.T) {
	requireNft(t)
	nattest.Enter(t)
	for _, c := range []struct {
		rule []string
		want string
	}{
		{[]string{"rule", "add", "pref", "50", "fwmark", "0x4501", "lookup", "main"}, "the firewall mark 0x4501 is in use: rule 50: fwmark 0x4501 lookup main"},
		{[]string{"-6", "rule", "add", "pref", "51", "fwmark", "0x4500/0xff00", "lookup", "main"}, "the firewall mark 0x4501 is in use: IPv6 rule 51: fwmark 0x4500/0xff00 lookup main"},
	} {
		nattest.IP(t, c.rule...)
		before := snapshot(t)
		_, err := Setup(Config{Logger: nattest.Logger(t)})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("Setup with %s: %v, want an error about %q", strings.Join(c.rule, " "), err, c.want)
		}
		sameSnapshot(t, "a refused Setup", before, snapshot(t))
		c.rule[slices.Index(c.rule, "add")] = "del"
		nattest.IP(t, c.rule...)
	}
	// Transparent mode's bypass mark is another.
	nattest.IP(t, "rule", "add", "pref", "100", "fwmark", "0x4500", "lookup", "main")
	start(t, Config{})
}

// TestFailedSetupUndoes fails Setup after each thing it installs in turn,
// and checks that it leaves nothing behind.
func TestFailedSetupUndoes(t *testing.T) {
	requireNft(t)
	nattest.Enter(t)
	before := stableSnapshot(t)
	cfg := Config{Logger: nattest.Logger(t)}
	steps := nattest.CheckUndo(t, func() (io.Closer, error) { return Setup(cfg) }, func(step string) {
		sameSnapshot(t, "a failure after "+step, before, snapshot(t))
	})
	if len(steps) != 5 {
		t.Errorf("want 5 steps: two routes, two rules, the table")
	}
}

// TestIPv6Off checks that, with IPv6 off, Setup installs IPv4's route and
// rule alone, and Dial refuses IPv6 clients.
func TestIPv6Off(t *testing.T) {
	requireNft(t)
	nattest.Enter(t)
	nattest.SetSysctl(t, "net/ipv6/conf/all/disable_ipv6", "1")
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	hub := netip.MustParseAddr("192.0.2.1")
	if err := nattest.AddAddr(lo, hub, 32); err != nil {
		t.Fatal(err)
	}
	before := stableSnapshot(t)
	n := start(t, Config{})
	if n.IPv6() {
		t.Error("IPv6 is off, but the Net says it is on")
	}
	if rules := nattest.IP(t, "-6", "rule"); strings.Contains(rules, "4501") {
		t.Errorf("an IPv6 rule with IPv6 off:\n%s", rules)
	}
	mustContain(t, nattest.IP(t, "rule"), "fwmark 0x4501 lookup 4501")
	_, _, err = n.Dial(netip.MustParseAddr("2001:db8::7"), netip.MustParseAddrPort("[2001:db8::1]:4500"))
	if err == nil || !strings.Contains(err.Error(), "IPv6 was off") {
		t.Errorf("Dial of an IPv6 client with IPv6 off: %v", err)
	}
	dial(t, n, netip.MustParseAddr("198.51.100.7"), netip.AddrPortFrom(hub, 4500))
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, "Close", before, snapshot(t))
}

// TestNeedsNetAdmin drops CAP_NET_ADMIN from threads of their own and
// checks that every way in names the capability: Setup, Cleanup, the
// kernel's own refusal past the up-front check, and Dial, whose element
// needs CAP_NET_ADMIN and whose socket CAP_NET_ADMIN or CAP_NET_RAW.
func TestNeedsNetAdmin(t *testing.T) {
	requireNft(t)
	var errs []error
	err := nattest.WithoutNetAdmin(func() error {
		_, err := Setup(Config{})
		errs = append(errs, err, Cleanup(Config{}))
		nl, nft, err := handles()
		if err == nil {
			_, err = nft.ListTablesOfFamily(nftables.TableFamilyINet)
			if err != nil {
				err = modeRealAddr.Failed("list the nftables tables", err)
			}
			nft.CloseLasting()
			nl.Close()
		}
		return errors.Join(append(errs, err)...)
	})
	if err == nil {
		t.Fatal("no errors without CAP_NET_ADMIN")
	}
	t.Logf("without CAP_NET_ADMIN: %v", err)

	// Dial, on a thread that drops its capabilities after Setup.
	var noAdmin, noAdminNoRaw error
	derr := nattest.OnNewThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return err
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		hub := netip.MustParseAddr("192.0.2.1")
		if err := errors.Join(netlink.LinkSetUp(lo), nattest.AddAddr(lo, hub, 32)); err != nil {
			return err
		}
		n, err := Setup(Config{Logger: nattest.Logger(t)})
		if err != nil {
			return err
		}
		client, backend := netip.MustParseAddr("198.51.100.7"), netip.AddrPortFrom(hub, 4500)
		if err := setCaps(unix.CAP_NET_ADMIN); err != nil {
			return errors.Join(err, n.Close())
		}
		_, _, noAdmin = n.Dial(client, backend)
		if err := setCaps(unix.CAP_NET_ADMIN, unix.CAP_NET_RAW); err != nil {
			return errors.Join(err, n.Close())
		}
		_, _, noAdminNoRaw = n.Dial(client, backend)
		if err := setCaps(); err != nil {
			return err
		}
		if n.sockets() != 0 {
			return fmt.Errorf("%d sockets after the failed Dials", n.sockets())
		}
		_, release, err := n.Dial(client, backend)
		if err != nil {
			return errors.Join(fmt.Errorf("Dial with the capabilities back: %w", err), n.Close())
		}
		return errors.Join(release(), n.Close())
	})
	if derr != nil {
		t.Fatal(derr)
	}
	t.Logf("Dial without CAP_NET_ADMIN: %v", noAdmin)
	t.Logf("Dial without CAP_NET_ADMIN and CAP_NET_RAW: %v", noAdminNoRaw)
	if noAdminNoRaw == nil || !strings.Contains(noAdminNoRaw.Error(), "IP_TRANSPARENT, which CAP_NET_RAW allows too") {
		t.Errorf("Dial without CAP_NET_ADMIN and CAP_NET_RAW: %v, want one about IP_TRANSPARENT", noAdminNoRaw)
	}
	for k, e := range append(errs, err, noAdmin, noAdminNoRaw) {
		if e == nil || !errors.Is(e, nat.ErrNeedsNetAdmin) || !strings.Contains(e.Error(), "real-address mode needs CAP_NET_ADMIN") {
			t.Errorf("error %d: %v, want one of real-address mode that names CAP_NET_ADMIN", k, e)
		}
	}
}

// setCaps takes caps out of the calling thread's effective set, and puts
// back every other permitted one.
func setCaps(drop ...int) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return err
	}
	for k := range data {
		data[k].Effective = data[k].Permitted
	}
	for _, c := range drop {
		data[c/32].Effective &^= 1 << (c % 32)
	}
	return unix.Capset(&hdr, &data[0])
}

// TestNotInRootNamespace, last, makes sure that the tests never touched
// the namespace the test binary started in.
func TestNotInRootNamespace(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, fam := range families(true) {
		rules, err := setup.ListRules(h, fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			if r.Table == DefaultTable || r.Mark == DefaultMark || r.Table == 77 {
				t.Errorf("a rule of the tests' in the root namespace: %s", setup.DescribeRule(r))
			}
		}
	}
	if os.Geteuid() == 0 {
		c, err := nftables.New()
		if err != nil {
			t.Fatal(err)
		}
		tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
		if err != nil {
			t.Fatal(err)
		}
		for _, tb := range tables {
			if strings.HasPrefix(tb.Name, tablePrefix) {
				t.Errorf("a table of the tests' in the root namespace: %s", tb.Name)
			}
		}
	}
}

// TestAdoptHandsOver hands real-address mode over as an upgrade does: a
// second Net adopts the routes, rules and table of the first and the
// session's socket (a duplicate, as SCM_RIGHTS gives it), and the first
// lets go. The host is the same before and after the hand-over, the
// daemon's answers reach the socket all along and none leaves the host;
// the adopted release removes the element, and the adopter's Close puts
// the hub back as it was before the first Setup.
func TestAdoptHandsOver(t *testing.T) {
	l := newLab(t)
	backend := netip.AddrPortFrom(hubV4, 4500)
	daemon := listen(t, netip.AddrPortFrom(netip.IPv4Unspecified(), 4500))
	before := stableSnapshot(t)
	wire := startCapture(t, hubVeth)
	old := start(t, Config{})
	c, at, _ := dial(t, old, clientV4, backend)
	away := l.listenClient(t, at)
	during := stableSnapshot(t)
	mustContain(t, during, element(at, backend))

	f, err := c.File()
	if err != nil {
		t.Fatal(err)
	}
	n, err := Adopt(Config{Logger: nattest.Logger(t)})
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	t.Cleanup(func() { n.Close() })
	pc, err := net.FilePacketConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	adopted := pc.(*net.UDPConn)
	release, err := n.AdoptSocket(adopted)
	if err != nil {
		t.Fatalf("AdoptSocket: %v", err)
	}
	sendTo(t, daemon, at, []byte("between the two"))
	nattest.ExpectUDP(t, adopted, []byte("between the two"))
	old.Release()
	if err := old.Close(); err != nil {
		t.Fatalf("Close after Release: %v", err)
	}
	sameSnapshot(t, "the hand-over", during, stableSnapshot(t))
	sendTo(t, daemon, at, []byte("after the hand-over"))
	nattest.ExpectUDP(t, adopted, []byte("after the hand-over"))
	write(t, adopted, []byte("from the adopted socket"))
	if from := nattest.ExpectUDP(t, daemon, []byte("from the adopted socket")); from != at {
		t.Fatalf("the daemon got the adopted socket's datagram from %s, want %s", from, at)
	}
	expectNothing(t, away, 50*time.Millisecond)
	if pkts := wire.udp(t); len(pkts) != 0 {
		t.Fatalf("%s carried %v: the daemon's answers left the host", hubVeth, pkts)
	}

	// The adopted socket's release removes its element; a new session
	// dials as after Setup; Close puts everything back.
	if err := release(); err != nil {
		t.Fatal(err)
	}
	if table := nft(t, "list", "table", "inet", "iketcp_realaddr"); strings.Contains(table, element(at, backend)) {
		t.Fatalf("after the adopted socket's release:\n%s", table)
	}
	c2, _, _ := dial(t, n, clientV4, backend)
	write(t, c2, []byte("new session"))
	nattest.ExpectUDP(t, daemon, []byte("new session"))
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, "the adopter's Close", before, snapshot(t))
}

// TestAdoptInstallsWhatIsMissing: with nothing running, Adopt installs
// everything, as Setup would, and Close removes it.
func TestAdoptInstallsWhatIsMissing(t *testing.T) {
	newLab(t)
	before := stableSnapshot(t)
	n, err := Adopt(Config{Logger: nattest.Logger(t)})
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	mustContain(t, snapshot(t), "fwmark 0x4501 lookup 4501", "local default dev lo table 4501", "table inet iketcp_realaddr")
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, "Close", before, snapshot(t))
}
