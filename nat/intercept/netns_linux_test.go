package intercept

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/iketcp/iketcp/nat/tun/tuntest"
)

// The tests build everything in anonymous network namespaces: they never
// appear in `ip netns list`, and they vanish with their last thread,
// socket or descriptor, even if the test binary dies.

// snapshot is what Close must leave exactly as it found it.
func snapshot(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"rule"}, {"-6", "rule"},
		{"route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"},
		{"link"},
	} {
		fmt.Fprintf(&b, "== ip %s\n%s", strings.Join(args, " "), nattest.IP(t, args...))
	}
	return b.String()
}

// stableSnapshot waits until two snapshots in a row agree, so that the
// kernel's own delayed work (carrier, IPv6 link-local routes) is done.
func stableSnapshot(t *testing.T) string {
	t.Helper()
	return nattest.Settled(t, func() string { return snapshot(t) })
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

// newLab moves the test into a new namespace (nattest.Enter) and wires
// it to a peer namespace that owns peerV4/V6 and otherV4/V6.
func newLab(t *testing.T) *lab {
	t.Helper()
	nattest.Enter(t)
	// IPv6 addresses usable at once on both sides, and no routes that
	// come later.
	if err := nattest.NoDAD(); err != nil {
		t.Fatal(err)
	}
	l := &lab{peer: nattest.New(t)}
	if err := l.peer.Do(nattest.NoDAD); err != nil {
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
	must(nattest.AddAddr(link, siteV4, 24))
	must(nattest.AddAddr(link, siteV6, 64))
	must(netlink.RouteAdd(&netlink.Route{Dst: nattest.Prefix(peerV4, 24), Gw: hopV4.AsSlice()}))
	must(netlink.RouteAdd(&netlink.Route{Dst: nattest.Prefix(peerV6, 64), Gw: hopV6.AsSlice()}))
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
			netlink.LinkSetUp(link), nattest.AddAddr(link, hopV4, 24), nattest.AddAddr(link, hopV6, 64),
			nattest.AddAddr(lo, peerV4, 32), nattest.AddAddr(lo, otherV4, 32),
			nattest.AddAddr(lo, peerV6, 128), nattest.AddAddr(lo, otherV6, 128),
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

// open starts an Interceptor in the test's namespace and closes it at the
// test's end.
func open(t *testing.T, cfg Config) *Interceptor {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = nattest.Logger(t)
	}
	i, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
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
		p.checksumOK = nattest.Checksum(append(pseudo, rest...)) == 0
		p.sport = uint16(rest[0])<<8 | uint16(rest[1])
		p.dport = uint16(rest[2])<<8 | uint16(rest[3])
		rest = rest[8:]
	}
	p.payload = rest
	return p, nil
}

// pump reads the Interceptor's packets in a goroutine of its own until
// Close, which the test's clean-up does before waiting for it.
func pump(t *testing.T, i *Interceptor) <-chan []byte {
	t.Helper()
	return tuntest.Pump(t, i, i.MTU())
}

// next returns the next packet the pump read, parsed.
func next(t *testing.T, packets <-chan []byte) packet {
	t.Helper()
	select {
	case b, ok := <-packets:
		if !ok {
			t.Fatal("the TUN device was closed")
		}
		p, err := parsePacket(b)
		if err != nil {
			t.Fatalf("unparsable packet from the TUN device: %v", err)
		}
		return p
	case <-time.After(5 * time.Second):
		t.Fatal("no packet came through the TUN device")
	}
	return packet{}
}
