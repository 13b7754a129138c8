package nat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The tests build everything in anonymous network namespaces: they never
// appear in `ip netns list`, and they vanish with their last thread,
// socket or descriptor, even if the test binary dies.

// requireNetns skips a test that needs root, TUN and iproute2 where they
// are missing, and fails it instead under CI=true.
func requireNetns(t *testing.T) {
	t.Helper()
	missing := nattest.Missing()
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		missing = append(missing, "/dev/net/tun (modprobe tun)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		missing = append(missing, "the ip command (Debian package iproute2)")
	}
	nattest.SkipOrFail(t, missing, "to build network namespaces with a TUN device")
}

// enterNetns moves the calling test goroutine, for the rest of its life,
// into a new network namespace with lo up. Its thread is never unlocked,
// so it ends with the test and never returns to the scheduler. Everything
// the test does afterwards (sockets, netlink, sysctls, exec of ip) happens
// inside the namespace. Call it from the test's own goroutine only, and
// use no subtests, which run on other goroutines.
func enterNetns(t *testing.T) {
	t.Helper()
	requireNetns(t)
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Fatalf("unshare(CLONE_NEWNET): %v", err)
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
}

// ip runs the ip command in the calling thread's namespace (the child
// inherits it from the locked thread that forks it).
func ip(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// setSysctlT writes a sysctl in the calling thread's namespace.
func setSysctlT(t *testing.T, key, value string) {
	t.Helper()
	if err := setSysctl(key, value); err != nil {
		t.Fatal(err)
	}
}

// snapshot is what Close must leave exactly as it found it.
func snapshot(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"rule"}, {"-6", "rule"},
		{"route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"},
		{"link"},
	} {
		fmt.Fprintf(&b, "== ip %s\n%s", strings.Join(args, " "), ip(t, args...))
	}
	return b.String()
}

// stableSnapshot waits until two snapshots in a row agree, so that the
// kernel's own delayed work (carrier, IPv6 link-local routes) is done.
func stableSnapshot(t *testing.T) string {
	t.Helper()
	prev := snapshot(t)
	for range 100 {
		time.Sleep(50 * time.Millisecond)
		cur := snapshot(t)
		if cur == prev {
			return cur
		}
		prev = cur
	}
	t.Fatalf("the namespace's routing does not settle:\n%s", prev)
	return ""
}

// Addresses of the lab. The site namespace (the test's own) reaches the
// peer namespace over a veth pair; the peers' addresses sit on the peer's
// lo, behind a route.
var (
	siteV4  = netip.MustParseAddr("100.64.0.2")
	hopV4   = netip.MustParseAddr("100.64.0.1")
	peerV4  = netip.MustParseAddr("203.0.113.2")
	otherV4 = netip.MustParseAddr("203.0.113.3")
	siteV6  = netip.MustParseAddr("2001:db8:1::2")
	hopV6   = netip.MustParseAddr("2001:db8:1::1")
	peerV6  = netip.MustParseAddr("2001:db8:2::2")
	otherV6 = netip.MustParseAddr("2001:db8:2::3")
)

// lab is the test's namespace wired to a peer namespace.
type lab struct {
	peer *nattest.NS
}

// newLab moves the test into a new namespace (enterNetns) and wires it to
// a peer namespace that owns peerV4/V6 and otherV4/V6.
func newLab(t *testing.T) *lab {
	t.Helper()
	enterNetns(t)
	// IPv6 addresses usable at once on both sides, and no routes that
	// come later.
	noDAD := func() error {
		return errors.Join(setSysctl("net/ipv6/conf/all/accept_dad", "0"), setSysctl("net/ipv6/conf/default/accept_dad", "0"))
	}
	if err := noDAD(); err != nil {
		t.Fatal(err)
	}
	l := &lab{peer: nattest.New(t)}
	if err := l.peer.Do(noDAD); err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "site0"},
		PeerName:      "peer0",
		PeerNamespace: netlink.NsFd(l.peer.Fd()),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	link, err := netlink.LinkByName("site0")
	must(err)
	// Up first: IPv6 addresses added to a link that is down answer
	// neighbour solicitations only a second or two later.
	must(netlink.LinkSetUp(link))
	must(addAddr(link, siteV4, 24))
	must(addAddr(link, siteV6, 64))
	must(netlink.RouteAdd(&netlink.Route{Dst: prefix(peerV4, 24), Gw: hopV4.AsSlice()}))
	must(netlink.RouteAdd(&netlink.Route{Dst: prefix(peerV6, 64), Gw: hopV6.AsSlice()}))
	must(l.peer.Do(func() error {
		link, err := netlink.LinkByName("peer0")
		if err != nil {
			return err
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return errors.Join(
			netlink.LinkSetUp(link), addAddr(link, hopV4, 24), addAddr(link, hopV6, 64),
			addAddr(lo, peerV4, 32), addAddr(lo, otherV4, 32),
			addAddr(lo, peerV6, 128), addAddr(lo, otherV6, 128),
		)
	}))
	// Traffic before the carrier is on is lost.
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		link, err := netlink.LinkByName("site0")
		must(err)
		if link.Attrs().OperState == netlink.OperUp {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("site0 stays %s", link.Attrs().OperState)
		}
	}
	return l
}

func addAddr(link netlink.Link, a netip.Addr, bits int) error {
	ipnet := &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
	return netlink.AddrAdd(link, &netlink.Addr{IPNet: ipnet, Flags: unix.IFA_F_NODAD})
}

// prefix is the network of a with bits ones.
func prefix(a netip.Addr, bits int) *net.IPNet {
	p := netip.PrefixFrom(a, bits).Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
}

// listenUDP opens a UDP socket in the peer namespace.
func (l *lab) listenUDP(t *testing.T, at netip.AddrPort) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := l.peer.Do(func() (err error) {
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(at))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// listenTCP opens a TCP listener in the peer namespace.
func (l *lab) listenTCP(t *testing.T, at netip.AddrPort) *net.TCPListener {
	t.Helper()
	var ln *net.TCPListener
	err := l.peer.Do(func() (err error) {
		ln, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(at))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// expectUDP waits for one datagram with payload want on c.
func expectUDP(t *testing.T, c *net.UDPConn, want []byte) netip.AddrPort {
	t.Helper()
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("%s did not receive %q: %v", c.LocalAddr(), want, err)
	}
	if !bytes.Equal(buf[:n], want) {
		t.Fatalf("%s received %q, want %q", c.LocalAddr(), buf[:n], want)
	}
	return from
}

// testLogger sends an Interceptor's log lines to the test's log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// intercept starts an Interceptor in the test's namespace and closes it
// at the test's end.
func intercept(t *testing.T, cfg InterceptConfig) *Interceptor {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	i, err := Intercept(cfg)
	if err != nil {
		t.Fatalf("Intercept: %v", err)
	}
	t.Cleanup(func() {
		if err := i.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return i
}

// packet is a parsed IP packet read from the TUN device.
type packet struct {
	version      int
	proto        int
	src, dst     netip.Addr
	sport, dport uint16
	payload      []byte // after the UDP header, or after the IP header
	size         int
	checksumOK   bool // of the UDP header and payload
}

func (p packet) String() string {
	return fmt.Sprintf("IPv%d proto %d %s:%d -> %s:%d %q", p.version, p.proto, p.src, p.sport, p.dst, p.dport, p.payload)
}

// parsePacket reads the IP header (and the UDP header, if any) by hand.
func parsePacket(b []byte) (packet, error) {
	p := packet{size: len(b)}
	if len(b) < 1 {
		return p, errors.New("empty packet")
	}
	p.version = int(b[0] >> 4)
	var rest []byte
	switch p.version {
	case 4:
		ihl := int(b[0]&0xf) * 4
		if len(b) < 20 || ihl < 20 || len(b) < ihl {
			return p, fmt.Errorf("short IPv4 packet: %x", b)
		}
		p.proto = int(b[9])
		p.src = netip.AddrFrom4([4]byte(b[12:16]))
		p.dst = netip.AddrFrom4([4]byte(b[16:20]))
		rest = b[ihl:]
	case 6:
		if len(b) < 40 {
			return p, fmt.Errorf("short IPv6 packet: %x", b)
		}
		p.proto = int(b[6])
		p.src = netip.AddrFrom16([16]byte(b[8:24]))
		p.dst = netip.AddrFrom16([16]byte(b[24:40]))
		rest = b[40:]
	default:
		return p, fmt.Errorf("IP version %d: %x", p.version, b)
	}
	if p.proto == unix.IPPROTO_UDP {
		if len(rest) < 8 {
			return p, fmt.Errorf("short UDP header: %x", b)
		}
		pseudo := append(p.src.AsSlice(), p.dst.AsSlice()...)
		pseudo = append(pseudo, 0, 0, byte(len(rest)>>8), byte(len(rest)), 0, 0, 0, unix.IPPROTO_UDP)
		p.checksumOK = checksum(append(pseudo, rest...)) == 0
		p.sport = uint16(rest[0])<<8 | uint16(rest[1])
		p.dport = uint16(rest[2])<<8 | uint16(rest[3])
		rest = rest[8:]
	}
	p.payload = rest
	return p, nil
}

// udpPacket builds an IPv4 or IPv6 packet carrying a UDP datagram, with
// correct checksums.
func udpPacket(src, dst netip.AddrPort, payload []byte) []byte {
	udpLen := 8 + len(payload)
	udp := make([]byte, udpLen)
	put16(udp[0:], src.Port())
	put16(udp[2:], dst.Port())
	put16(udp[4:], uint16(udpLen))
	copy(udp[8:], payload)
	s, d := src.Addr().AsSlice(), dst.Addr().AsSlice()
	var pseudo []byte
	pseudo = append(pseudo, s...)
	pseudo = append(pseudo, d...)
	var hdr []byte
	if src.Addr().Is4() {
		pseudo = append(pseudo, 0, unix.IPPROTO_UDP, byte(udpLen>>8), byte(udpLen))
		hdr = make([]byte, 20)
		hdr[0] = 0x45
		put16(hdr[2:], uint16(20+udpLen))
		put16(hdr[4:], 0x1234)
		put16(hdr[6:], 0x4000) // don't fragment
		hdr[8] = 64
		hdr[9] = unix.IPPROTO_UDP
		copy(hdr[12:], s)
		copy(hdr[16:], d)
		put16(hdr[10:], checksum(hdr))
	} else {
		pseudo = append(pseudo, 0, 0, byte(udpLen>>8), byte(udpLen), 0, 0, 0, unix.IPPROTO_UDP)
		hdr = make([]byte, 40)
		hdr[0] = 0x60
		put16(hdr[4:], uint16(udpLen))
		hdr[6] = unix.IPPROTO_UDP
		hdr[7] = 64
		copy(hdr[8:], s)
		copy(hdr[24:], d)
	}
	sum := checksum(append(pseudo, udp...))
	if sum == 0 {
		sum = 0xffff
	}
	put16(udp[6:], sum)
	return append(hdr, udp...)
}

func put16(b []byte, v uint16) { b[0], b[1] = byte(v>>8), byte(v) }

// checksum is the Internet checksum of b.
func checksum(b []byte) uint16 {
	var sum uint32
	for ; len(b) >= 2; b = b[2:] {
		sum += uint32(b[0])<<8 | uint32(b[1])
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// pump reads the Interceptor's packets in a goroutine of its own until
// Close, which the test's clean-up does before waiting for it.
func pump(t *testing.T, i *Interceptor) <-chan packet {
	t.Helper()
	out := make(chan packet, 1024)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(out)
		bufs := make([][]byte, i.BatchSize())
		for k := range bufs {
			bufs[k] = make([]byte, i.MTU())
		}
		sizes := make([]int, len(bufs))
		for {
			n, err := i.Read(bufs, sizes, 0)
			for k := range n {
				p, perr := parsePacket(bytes.Clone(bufs[k][:sizes[k]]))
				if perr != nil {
					t.Errorf("unparsable packet from the TUN device: %v", perr)
					continue
				}
				out <- p
			}
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					t.Errorf("Read: %v", err)
				}
				return
			}
		}
	}()
	t.Cleanup(func() {
		i.Close()
		wg.Wait()
	})
	return out
}

// next returns the next packet the pump read.
func next(t *testing.T, packets <-chan packet) packet {
	t.Helper()
	select {
	case p, ok := <-packets:
		if !ok {
			t.Fatal("the TUN device was closed")
		}
		return p
	case <-time.After(5 * time.Second):
		t.Fatal("no packet came through the TUN device")
	}
	return packet{}
}

// dialTCP connects from the test's namespace, bounded in time.
func dialTCP(to netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var d net.Dialer
	return d.DialContext(ctx, "tcp", to.String())
}
