package fakenet

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
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat"
	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/iketcp/iketcp/nat/tun"
	"github.com/iketcp/iketcp/nat/tun/tuntest"
)

// The fake-TCP lab: the test's own namespace is the client's, joined by a
// veth pair to the server's. Each side runs a Net; no TCP stack is
// involved: the tests write the endpoints' segments by hand.
var (
	ftClientV4   = netip.MustParseAddr("198.51.100.2")
	ftServerV4   = netip.MustParseAddr("198.51.100.1")
	ftClientV6   = netip.MustParseAddr("2001:db8:1::2")
	ftServerV6   = netip.MustParseAddr("2001:db8:1::1")
	ftClientNet4 = netip.MustParsePrefix("100.64.200.0/30")
	ftServerNet4 = netip.MustParsePrefix("100.64.201.0/30")
	ftClientNet6 = netip.MustParsePrefix("2001:db8:200::/126")
	ftServerNet6 = netip.MustParsePrefix("2001:db8:201::/126")
)

// The veth pair's ends.
const (
	ftClientVeth = "ftc0"
	ftServerVeth = "fts0"
)

// ftLab is the client's namespace (the test's own) wired to the server's.
type ftLab struct {
	server *nattest.NS
}

// newFakeTCPLab moves the test into a new namespace (nattest.Enter) and
// wires it to a server namespace.
func newFakeTCPLab(t *testing.T) *ftLab {
	t.Helper()
	requireNft(t)
	nattest.Enter(t)
	if err := nattest.NoDAD(); err != nil {
		t.Fatal(err)
	}
	l := &ftLab{server: nattest.New(t)}
	if err := l.server.Do(nattest.NoDAD); err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: ftClientVeth},
		PeerName:      ftServerVeth,
		PeerNamespace: netlink.NsFd(l.server.Fd()),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	up := func(name string, v4, v6 netip.Addr) error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return errors.Join(netlink.LinkSetUp(link), nattest.AddAddr(link, v4, 24), nattest.AddAddr(link, v6, 64))
	}
	if err := up(ftClientVeth, ftClientV4, ftClientV6); err != nil {
		t.Fatal(err)
	}
	if err := l.server.Do(func() error { return up(ftServerVeth, ftServerV4, ftServerV6) }); err != nil {
		t.Fatal(err)
	}
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		link, err := netlink.LinkByName(ftClientVeth)
		if err != nil {
			t.Fatal(err)
		}
		if link.Attrs().OperState == netlink.OperUp {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%s stays %s", ftClientVeth, link.Attrs().OperState)
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

// start runs Setup in the calling thread's namespace and closes the Net
// at the test's end.
func start(t *testing.T, cfg Config) *Net {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = nattest.Logger(t)
	}
	n, err := Setup(cfg)
	if err != nil {
		t.Fatalf("Setup(%s): %v", cfg.Role, err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return n
}

// startIn is start in ns. Close, from the test's goroutine, is then in
// another namespace.
func startIn(t *testing.T, ns *nattest.NS, cfg Config) *Net {
	t.Helper()
	var n *Net
	if err := ns.Do(func() error {
		n = start(t, cfg)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return n
}

// rawPump reads a Net's packets in a goroutine of its own until Close,
// which the test's clean-up does before waiting for it.
func rawPump(t *testing.T, n *Net) <-chan []byte {
	t.Helper()
	return tuntest.Pump(t, n, n.MTU())
}

// TCP flags.
const (
	tcpFIN = 1 << iota
	tcpSYN
	tcpRST
	tcpPSH
	tcpACK
)

// ipPacket is an IP packet parsed by hand: TCP in full, ICMP's type and
// code.
type ipPacket struct {
	version       int
	proto         int
	src, dst      netip.AddrPort // ports for TCP only
	seq, ack      uint32
	flags         uint8
	window        uint16
	payload       []byte
	icmpType      uint8
	icmpCode      uint8
	df            bool
	size          int
	checksumOK    bool // IPv4 header's and TCP's
	checksumError string
}

func (p ipPacket) String() string {
	if p.proto != unix.IPPROTO_TCP {
		return fmt.Sprintf("IPv%d proto %d %s -> %s type %d code %d, %d bytes", p.version, p.proto, p.src.Addr(), p.dst.Addr(), p.icmpType, p.icmpCode, p.size)
	}
	var f []string
	for k, name := range []string{"FIN", "SYN", "RST", "PSH", "ACK"} {
		if p.flags&(1<<k) != 0 {
			f = append(f, name)
		}
	}
	return fmt.Sprintf("TCP %s -> %s [%s] seq %d ack %d win %d, %d bytes of data (%d in all)", p.src, p.dst, strings.Join(f, ","), p.seq, p.ack, p.window, len(p.payload), p.size)
}

// parseIP parses an IPv4 or IPv6 packet without extension headers.
func parseIP(b []byte) (ipPacket, error) {
	p := ipPacket{size: len(b)}
	if len(b) < 1 {
		return p, errors.New("empty packet")
	}
	p.version = int(b[0] >> 4)
	var rest, pseudo []byte
	var src, dst netip.Addr
	switch p.version {
	case 4:
		ihl := int(b[0]&0xf) * 4
		if len(b) < 20 || ihl < 20 || len(b) < ihl {
			return p, fmt.Errorf("short IPv4 packet: %x", b)
		}
		if total := int(binary.BigEndian.Uint16(b[2:])); total != len(b) {
			return p, fmt.Errorf("IPv4 length %d in a packet of %d bytes", total, len(b))
		}
		p.proto = int(b[9])
		p.df = binary.BigEndian.Uint16(b[6:])&0x4000 != 0
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		rest = b[ihl:]
		if nattest.Checksum(b[:ihl]) != 0 {
			p.checksumError = "IPv4 header"
		}
		pseudo = append(append(src.AsSlice(), dst.AsSlice()...), 0, byte(p.proto), byte(len(rest)>>8), byte(len(rest)))
	case 6:
		if len(b) < 40 {
			return p, fmt.Errorf("short IPv6 packet: %x", b)
		}
		if plen := int(binary.BigEndian.Uint16(b[4:])); plen+40 != len(b) {
			return p, fmt.Errorf("IPv6 payload length %d in a packet of %d bytes", plen, len(b))
		}
		p.proto = int(b[6])
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		rest = b[40:]
		pseudo = append(append(src.AsSlice(), dst.AsSlice()...), 0, 0, byte(len(rest)>>8), byte(len(rest)), 0, 0, 0, byte(p.proto))
	default:
		return p, fmt.Errorf("IP version %d: %x", p.version, b)
	}
	p.src, p.dst = netip.AddrPortFrom(src, 0), netip.AddrPortFrom(dst, 0)
	switch p.proto {
	case unix.IPPROTO_TCP:
		if len(rest) < 20 || int(rest[12]>>4)*4 < 20 || len(rest) < int(rest[12]>>4)*4 {
			return p, fmt.Errorf("short TCP header: %x", b)
		}
		p.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(rest[0:]))
		p.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(rest[2:]))
		p.seq = binary.BigEndian.Uint32(rest[4:])
		p.ack = binary.BigEndian.Uint32(rest[8:])
		p.flags = rest[13]
		p.window = binary.BigEndian.Uint16(rest[14:])
		p.payload = rest[int(rest[12]>>4)*4:]
		if nattest.Checksum(append(pseudo, rest...)) != 0 {
			p.checksumError = strings.TrimPrefix(p.checksumError+", TCP", ", ")
		}
	case unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6:
		if len(rest) < 8 {
			return p, fmt.Errorf("short ICMP message: %x", b)
		}
		p.icmpType, p.icmpCode = rest[0], rest[1]
		p.payload = rest[8:]
	default:
		p.payload = rest
	}
	p.checksumOK = p.checksumError == ""
	return p, nil
}

// tcpPacket builds an IPv4 (with DF) or IPv6 packet carrying a TCP segment
// with a window of 65535 and no options, checksums correct.
func tcpPacket(src, dst netip.AddrPort, seq, ack uint32, flags uint8, payload []byte) []byte {
	tcp := make([]byte, 20+len(payload))
	nattest.Put16(tcp[0:], src.Port())
	nattest.Put16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], ack)
	tcp[12] = 5 << 4
	tcp[13] = flags
	nattest.Put16(tcp[14:], 65535)
	copy(tcp[20:], payload)
	s, d := src.Addr().AsSlice(), dst.Addr().AsSlice()
	pseudo := append(append([]byte{}, s...), d...)
	var hdr []byte
	if src.Addr().Is4() {
		pseudo = append(pseudo, 0, unix.IPPROTO_TCP, byte(len(tcp)>>8), byte(len(tcp)))
		hdr = make([]byte, 20)
		hdr[0] = 0x45
		nattest.Put16(hdr[2:], uint16(20+len(tcp)))
		nattest.Put16(hdr[4:], uint16(seq))
		nattest.Put16(hdr[6:], 0x4000) // don't fragment
		hdr[8] = 64
		hdr[9] = unix.IPPROTO_TCP
		copy(hdr[12:], s)
		copy(hdr[16:], d)
		nattest.Put16(hdr[10:], nattest.Checksum(hdr))
	} else {
		pseudo = append(pseudo, 0, 0, byte(len(tcp)>>8), byte(len(tcp)), 0, 0, 0, unix.IPPROTO_TCP)
		hdr = make([]byte, 40)
		hdr[0] = 0x60
		nattest.Put16(hdr[4:], uint16(len(tcp)))
		hdr[6] = unix.IPPROTO_TCP
		hdr[7] = 64
		copy(hdr[8:], s)
		copy(hdr[24:], d)
	}
	nattest.Put16(tcp[16:], nattest.Checksum(append(pseudo, tcp...)))
	return append(hdr, tcp...)
}

// writeAll writes packets into a device as one batch.
func writeAll(t *testing.T, d *Net, pkts ...[]byte) {
	t.Helper()
	if n, err := d.Write(pkts, 0); n != len(pkts) || err != nil {
		t.Fatalf("Write into %s: %d of %d, %v", d.Name(), n, len(pkts), err)
	}
}

// nextIP returns the next packet a pump read, parsed.
func nextIP(t *testing.T, from string, packets <-chan []byte) ipPacket {
	t.Helper()
	select {
	case b, ok := <-packets:
		if !ok {
			t.Fatalf("%s was closed", from)
		}
		p, err := parseIP(b)
		if err != nil {
			t.Fatalf("unparsable packet from %s: %v", from, err)
		}
		return p
	case <-time.After(5 * time.Second):
		t.Fatalf("no packet came out of %s", from)
	}
	return ipPacket{}
}

// expectTCP reads the next packet from a device and checks it against
// want's addresses, flags, sequence numbers and payload; a zero port in
// want.src matches any (a masqueraded one).
func expectTCP(t *testing.T, from string, packets <-chan []byte, want ipPacket) ipPacket {
	t.Helper()
	p := nextIP(t, from, packets)
	ok := p.proto == unix.IPPROTO_TCP && p.src.Addr() == want.src.Addr() && p.dst == want.dst &&
		(want.src.Port() == 0 || p.src.Port() == want.src.Port()) &&
		p.flags == want.flags && p.seq == want.seq && p.ack == want.ack && bytes.Equal(p.payload, want.payload)
	if !ok {
		t.Fatalf("%s delivered %v,\nwant %v", from, p, want)
	}
	if !p.checksumOK {
		t.Fatalf("%s delivered %v with a wrong %s checksum", from, p, p.checksumError)
	}
	t.Logf("%s delivered %v", from, p)
	return p
}

// noMore checks that a device has nothing more to deliver within wait.
func noMore(t *testing.T, from string, packets <-chan []byte, wait time.Duration) {
	t.Helper()
	select {
	case b := <-packets:
		p, _ := parseIP(b)
		t.Fatalf("%s delivered an unexpected %v", from, p)
	case <-time.After(wait):
	}
}

// capture records every packet through a device, both ways, with an
// AF_PACKET socket; drain reads what it holds without blocking, so that
// no goroutine is needed.
type capture struct {
	fd   int
	name string
}

// startCapture opens a capture of the device name in the calling
// thread's namespace; it is closed at the test's end.
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
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20); err != nil {
		t.Fatal(err)
	}
	all := uint16(unix.ETH_P_ALL)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: all<<8 | all>>8, Ifindex: link.Attrs().Index}); err != nil {
		t.Fatalf("bind AF_PACKET socket to %s: %v", name, err)
	}
	return &capture{fd: fd, name: name}
}

// drain returns the IP packets captured so far, parsed.
func (c *capture) drain(t *testing.T) []ipPacket {
	t.Helper()
	var pkts []ipPacket
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
		if typ := binary.BigEndian.Uint16(buf[12:]); typ != unix.ETH_P_IP && typ != unix.ETH_P_IPV6 {
			continue
		}
		p, err := parseIP(buf[14:n])
		if err != nil {
			t.Errorf("capture on %s: %v", c.name, err)
			continue
		}
		pkts = append(pkts, p)
	}
}

// checkWire checks what a capture saw: no RST from anyone, and none of the
// endpoints' addresses (which must never leave their host un-NATed).
func checkWire(t *testing.T, c *capture, pkts []ipPacket) {
	t.Helper()
	tcp := 0
	for _, p := range pkts {
		if p.proto == unix.IPPROTO_TCP {
			tcp++
			if p.flags&tcpRST != 0 {
				t.Errorf("%s carried a RST: %v", c.name, p)
			}
		}
		for _, a := range []netip.Addr{p.src.Addr(), p.dst.Addr()} {
			for _, net := range []netip.Prefix{ftClientNet4, ftServerNet4, ftClientNet6, ftServerNet6} {
				if net.Contains(a) {
					t.Errorf("%s carried an endpoint's address: %v", c.name, p)
				}
			}
		}
	}
	t.Logf("%s carried %d packets, %d of them TCP", c.name, len(pkts), tcp)
	if tcp == 0 {
		t.Errorf("%s captured no TCP at all: the capture is broken", c.name)
	}
}

// TestFakeTCPIPv4 carries a hand-made TCP connection between the two
// endpoints through both kernels' NAT, and checks that no kernel's TCP
// took part.
func TestFakeTCPIPv4(t *testing.T) { checkFakeTCP(t, false) }

// TestFakeTCPIPv6 is TestFakeTCPIPv4 over IPv6.
func TestFakeTCPIPv6(t *testing.T) { checkFakeTCP(t, true) }

func checkFakeTCP(t *testing.T, v6 bool) {
	l := newFakeTCPLab(t)
	ccfg := Config{Role: Client, Name: "ftcli", Net4: ftClientNet4}
	scfg := Config{Role: Server, Name: "ftsrv", Net4: ftServerNet4, Port: 4500}
	clientAddr, serverAddr := ftClientV4, ftServerV4
	if v6 {
		ccfg.Net6, scfg.Net6 = ftClientNet6, ftServerNet6
		clientAddr, serverAddr = ftClientV6, ftServerV6
	}
	// Strict reverse-path filters on both sides, as many hosts have.
	nattest.SetSysctl(t, "net/ipv4/conf/all/rp_filter", "1")
	capC := startCapture(t, ftClientVeth)
	var capS *capture
	if err := l.server.Do(func() error {
		capS = startCapture(t, ftServerVeth)
		return nattest.WriteSysctl("net/ipv4/conf/all/rp_filter", "1")
	}); err != nil {
		t.Fatal(err)
	}
	client := start(t, ccfg)
	server := startIn(t, l.server, scfg)
	cin, sin := rawPump(t, client), rawPump(t, server)
	cep, sep := client.Endpoint4(), server.Endpoint4()
	if v6 {
		cep, sep = client.Endpoint6(), server.Endpoint6()
	}
	t.Logf("client endpoint %s, server endpoint %s", cep, sep)

	// The handshake. The client's endpoint talks to the server's address;
	// the server's endpoint sees the client's address, masqueraded.
	cAt := netip.AddrPortFrom(cep, 40000)
	sAt := netip.AddrPortFrom(serverAddr, 4500)
	sepAt := netip.AddrPortFrom(sep, 4500)
	const cISN, sISN = 1_000_000, 7_000_000
	writeAll(t, client, tcpPacket(cAt, sAt, cISN, 0, tcpSYN, nil))
	syn := expectTCP(t, "the server's device", sin, ipPacket{src: netip.AddrPortFrom(clientAddr, 0), dst: sepAt, seq: cISN, flags: tcpSYN})
	cMapped := syn.src
	writeAll(t, server, tcpPacket(sepAt, cMapped, sISN, cISN+1, tcpSYN|tcpACK, nil))
	expectTCP(t, "the client's device", cin, ipPacket{src: sAt, dst: cAt, seq: sISN, ack: cISN + 1, flags: tcpSYN | tcpACK})
	writeAll(t, client, tcpPacket(cAt, sAt, cISN+1, sISN+1, tcpACK, nil))
	expectTCP(t, "the server's device", sin, ipPacket{src: cMapped, dst: sepAt, seq: cISN + 1, ack: sISN + 1, flags: tcpACK})

	// Data both ways, several segments in one Write.
	cSeq, sSeq := uint32(cISN+1), uint32(sISN+1)
	segments := func(from, to netip.AddrPort, seq, ack uint32, tag string) ([][]byte, []ipPacket, uint32) {
		var pkts [][]byte
		var want []ipPacket
		for k := range 3 {
			payload := fmt.Appendf(nil, "%s segment %d: %s", tag, k, strings.Repeat("x", 300))
			pkts = append(pkts, tcpPacket(from, to, seq, ack, tcpPSH|tcpACK, payload))
			want = append(want, ipPacket{seq: seq, ack: ack, flags: tcpPSH | tcpACK, payload: payload})
			seq += uint32(len(payload))
		}
		return pkts, want, seq
	}
	pkts, want, next := segments(cAt, sAt, cSeq, sSeq, "client")
	writeAll(t, client, pkts...)
	for _, w := range want {
		w.src, w.dst = cMapped, sepAt
		expectTCP(t, "the server's device", sin, w)
	}
	cSeq = next
	pkts, want, next = segments(sepAt, cMapped, sSeq, cSeq, "server")
	writeAll(t, server, pkts...)
	for _, w := range want {
		w.src, w.dst = sAt, cAt
		expectTCP(t, "the client's device", cin, w)
	}
	sSeq = next

	// A segment far outside the window conntrack follows is invalid: it
	// would leave without its NAT, so the table drops it. The server's
	// endpoint gets only the segment after it.
	writeAll(t, client,
		tcpPacket(cAt, sAt, cSeq+1<<30, sSeq, tcpPSH|tcpACK, []byte("out of the window")),
		tcpPacket(cAt, sAt, cSeq, sSeq, tcpPSH|tcpACK, []byte("in the window")))
	expectTCP(t, "the server's device", sin, ipPacket{src: cMapped, dst: sepAt, seq: cSeq, ack: sSeq, flags: tcpPSH | tcpACK, payload: []byte("in the window")})
	cSeq += uint32(len("in the window"))

	// A segment bigger than the path's MTU, with DF (IPv4) or at all
	// (IPv6): the client's kernel drops it and tells the endpoint.
	big := tcpPacket(cAt, sAt, cSeq, sSeq, tcpPSH|tcpACK, bytes.Repeat([]byte("b"), 3000))
	writeAll(t, client, big)
	icmp := nextIP(t, "the client's device", cin)
	t.Logf("a %d-byte segment from the endpoint came back as %v", len(big), icmp)
	if wantType := map[bool]uint8{false: 3, true: 2}[v6]; icmp.icmpType != wantType || icmp.dst.Addr() != cep {
		t.Fatalf("an oversized segment came back as %v, want ICMP type %d to the endpoint", icmp, wantType)
	}

	// The server ends it: FIN both ways.
	writeAll(t, server, tcpPacket(sepAt, cMapped, sSeq, cSeq, tcpFIN|tcpACK, nil))
	expectTCP(t, "the client's device", cin, ipPacket{src: sAt, dst: cAt, seq: sSeq, ack: cSeq, flags: tcpFIN | tcpACK})
	writeAll(t, client, tcpPacket(cAt, sAt, cSeq, sSeq+1, tcpFIN|tcpACK, nil))
	expectTCP(t, "the server's device", sin, ipPacket{src: cMapped, dst: sepAt, seq: cSeq, ack: sSeq + 1, flags: tcpFIN | tcpACK})
	writeAll(t, server, tcpPacket(sepAt, cMapped, sSeq+1, cSeq+1, tcpACK, nil))
	expectTCP(t, "the client's device", cin, ipPacket{src: sAt, dst: cAt, seq: sSeq + 1, ack: cSeq + 1, flags: tcpACK})

	// Nothing else came out, and no kernel answered anything with a RST.
	// With IPv6, nothing means no MLD report either, which the kernel
	// repeats for a second or two after the device got its address.
	wait := 100 * time.Millisecond
	if v6 {
		wait = 2 * time.Second
	}
	noMore(t, "the client's device", cin, wait)
	noMore(t, "the server's device", sin, 100*time.Millisecond)
	checkWire(t, capC, capC.drain(t))
	if err := l.server.Do(func() error { checkWire(t, capS, capS.drain(t)); return nil }); err != nil {
		t.Fatal(err)
	}
}

// setOffload turns an ethtool offload of the device name on or off (cmd:
// ETHTOOL_STSO, ETHTOOL_SGRO, ...), without the ethtool command.
func setOffload(name string, cmd uint32, on bool) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	val := struct{ cmd, data uint32 }{cmd, 0}
	if on {
		val.data = 1
	}
	var ifr struct {
		name [unix.IFNAMSIZ]byte
		data unsafe.Pointer
		_    [16]byte
	}
	copy(ifr.name[:], name)
	ifr.data = unsafe.Pointer(&val)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); e != 0 {
		return fmt.Errorf("ethtool command %#x on %s: %w", cmd, name, e)
	}
	return nil
}

// TestFakeTCPSuperPackets sends the client's endpoint a stream from a real
// TCP socket in the server's namespace, whose kernel hands the veth pair
// super-packets of many segments (TSO, as GRO would make them), and checks
// that the client's kernel forwards them into the device as the
// segments they stand for, each with its own correct checksum.
func TestFakeTCPSuperPackets(t *testing.T) {
	l := newFakeTCPLab(t)
	// GRO on the client's end too; the server's end keeps TSO on, so that
	// its TCP's super-packets cross the pair whole.
	if err := setOffload(ftClientVeth, unix.ETHTOOL_SGRO, true); err != nil {
		t.Fatal(err)
	}
	capC := startCapture(t, ftClientVeth)
	client := start(t, Config{Role: Client, Name: "ftcli", Net4: ftClientNet4})
	cin := rawPump(t, client)
	ep := netip.AddrPortFrom(client.Endpoint4(), 5000)
	if err := l.server.Do(func() error {
		return netlink.RouteAdd(&netlink.Route{Dst: nattest.Prefix(client.Endpoint4(), 30), Gw: ftClientV4.AsSlice()})
	}); err != nil {
		t.Fatal(err)
	}

	// The server's TCP dials the endpoint; the test answers for it.
	type dialed struct {
		c   net.Conn
		err error
	}
	dialDone := make(chan dialed, 1)
	go l.server.Do(func() error {
		c, err := nattest.DialTCP(ep)
		dialDone <- dialed{c, err}
		return nil
	})
	syn := nextIP(t, "the client's device", cin)
	if syn.flags != tcpSYN || syn.dst != ep {
		t.Fatalf("got %v, want a SYN to %s", syn, ep)
	}
	const mss = 1460
	synack := tcpPacket(ep, syn.src, 9_000_000, syn.seq+1, tcpSYN|tcpACK, nil)
	synack = withMSS(synack, mss)
	writeAll(t, client, synack)
	d := <-dialDone
	if d.err != nil {
		t.Fatalf("the server's TCP could not connect: %v", d.err)
	}
	defer d.c.Close()
	expectTCP(t, "the client's device", cin, ipPacket{src: syn.src, dst: ep, seq: syn.seq + 1, ack: 9_000_001, flags: tcpACK})

	data := bytes.Repeat([]byte("0123456789abcdef"), 3750) // 60000 bytes, within one window
	writeDone := make(chan error, 1)
	go func() {
		_, err := d.c.Write(data)
		writeDone <- err
	}()
	var got []byte
	segments := 0
	for len(got) < len(data) {
		p := nextIP(t, "the client's device", cin)
		if p.proto != unix.IPPROTO_TCP || p.src != syn.src || p.seq != syn.seq+1+uint32(len(got)) {
			t.Fatalf("got %v after %d bytes", p, len(got))
		}
		if p.size > 40+mss || !p.checksumOK {
			t.Fatalf("the device delivered %v: more than one segment of %d bytes, or a wrong %s checksum", p, mss, p.checksumError)
		}
		got = append(got, p.payload...)
		segments++
		// Acknowledge each, as a stack would, so that the sender goes on.
		writeAll(t, client, tcpPacket(ep, syn.src, 9_000_001, p.seq+uint32(len(p.payload)), tcpACK, nil))
	}
	if err := <-writeDone; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the stream arrived changed")
	}
	biggest, supers := 0, 0
	for _, p := range capC.drain(t) {
		if p.proto == unix.IPPROTO_TCP && p.dst == ep {
			biggest = max(biggest, p.size)
			if p.size > 40+mss {
				supers++
			}
		}
	}
	t.Logf("%d bytes arrived in %d segments of at most %d bytes; on the veth pair %d super-packets, the biggest %d bytes", len(got), segments, mss, supers, biggest)
	if supers == 0 {
		t.Fatal("no super-packet crossed the veth pair: the test proved nothing (does veth still pass TSO packets whole?)")
	}
}

// withMSS adds an MSS option to a TCP segment that tcpPacket built (IPv4).
func withMSS(pkt []byte, mss uint16) []byte {
	p, _ := parseIP(pkt)
	tcp := append([]byte{}, pkt[20:40]...)
	tcp = append(tcp, 2, 4, byte(mss>>8), byte(mss))
	tcp[12] = 6 << 4
	tcp[16], tcp[17] = 0, 0
	s, d := p.src.Addr().AsSlice(), p.dst.Addr().AsSlice()
	pseudo := append(append(append([]byte{}, s...), d...), 0, unix.IPPROTO_TCP, 0, byte(len(tcp)))
	nattest.Put16(tcp[16:], nattest.Checksum(append(pseudo, tcp...)))
	hdr := append([]byte{}, pkt[:20]...)
	nattest.Put16(hdr[2:], uint16(20+len(tcp)))
	hdr[10], hdr[11] = 0, 0
	nattest.Put16(hdr[10:], nattest.Checksum(hdr))
	return append(hdr, tcp...)
}

// ftSnapshot is what Close must leave exactly as it found it: the
// ruleset, routes, rules, links, addresses and forwarding sysctls.
func ftSnapshot(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	out, err := exec.Command("nft", "list", "ruleset").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list ruleset: %v\n%s", err, out)
	}
	fmt.Fprintf(&b, "== nft list ruleset\n%s", out)
	for _, args := range [][]string{
		{"rule"}, {"-6", "rule"},
		{"route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"},
		{"-o", "link"}, {"-o", "addr"},
	} {
		fmt.Fprintf(&b, "== ip %s\n%s", strings.Join(args, " "), nattest.IP(t, args...))
	}
	fmt.Fprintf(&b, "== forwarding\n%s", forwardingSysctls(t))
	return b.String()
}

// forwardingSysctls lists every forwarding sysctl of the calling thread's
// namespace.
func forwardingSysctls(t *testing.T) string {
	t.Helper()
	files := []string{"/proc/sys/net/ipv4/ip_forward"}
	for _, pattern := range []string{"/proc/sys/net/ipv4/conf/*/forwarding", "/proc/sys/net/ipv6/conf/*/forwarding"} {
		m, err := filepath.Glob(pattern)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, m...)
	}
	var b strings.Builder
	for _, f := range files {
		v, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s=%s\n", strings.TrimPrefix(f, "/proc/sys/"), strings.TrimSpace(string(v)))
	}
	return b.String()
}

// stableFTSnapshot waits until two snapshots in a row agree.
func stableFTSnapshot(t *testing.T) string {
	t.Helper()
	return nattest.Settled(t, func() string { return ftSnapshot(t) })
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
			t.Errorf("missing %q", w)
		}
	}
}

// TestFakeTCPCloseRestoresEverything compares the namespace before
// Setup and after Close, which it calls from a thread in another
// namespace; a device's own forwarding, different from the global one,
// comes back too.
func TestFakeTCPCloseRestoresEverything(t *testing.T) {
	newFakeTCPLab(t)
	nattest.SetSysctl(t, "net/ipv4/conf/"+ftClientVeth+"/forwarding", "1")
	nattest.SetSysctl(t, "net/ipv6/conf/"+ftClientVeth+"/forwarding", "1")
	before := stableFTSnapshot(t)
	other := nattest.New(t)
	var otherBefore string
	if err := other.Do(func() error { otherBefore = ftSnapshot(t); return nil }); err != nil {
		t.Fatal(err)
	}

	n := start(t, Config{Role: Client, Name: "ftr0", Net4: ftClientNet4, Net6: ftClientNet6, Mark: 0x4501})
	during := ftSnapshot(t)
	t.Logf("while running:\n%s", during)
	mustContain(t, during,
		"table inet iketcp_faketcp_ftr0 {",
		`iifname "ftr0" ct state invalid drop`,
		`iifname "ftr0" ip saddr 100.64.200.2 accept`,
		`oifname "ftr0" ip daddr 100.64.200.2 accept`,
		`iifname "ftr0" ip6 saddr 2001:db8:200::2 accept`,
		`oifname "ftr0" ip6 daddr 2001:db8:200::2 accept`,
		"type nat hook postrouting priority srcnat; policy accept;",
		`ip saddr 100.64.200.2 oifname != "ftr0" masquerade`,
		`ip6 saddr 2001:db8:200::2 oifname != "ftr0" masquerade`,
		"type filter hook prerouting priority mangle; policy accept;",
		`iifname "ftr0" meta mark set 0x00004501`,
		`comment "net/ipv4/ip_forward=0"`,
		`comment "net/ipv6/conf/all/forwarding=0"`,
		`comment "net/ipv4/conf/`+ftClientVeth+`/forwarding=1"`,
		"ftr0: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 65535",
		"inet 100.64.200.1 peer 100.64.200.2/32",
		"inet6 2001:db8:200::1 peer 2001:db8:200::2/128",
		"net/ipv4/ip_forward=1",
		"net/ipv6/conf/all/forwarding=1",
	)
	if strings.Contains(during, "fe80::") && strings.Contains(nattest.IP(t, "-6", "addr", "show", "dev", "ftr0"), "fe80::") {
		t.Error("the device has a link-local address")
	}
	if n.Name() != "ftr0" || n.Endpoint4() != netip.MustParseAddr("100.64.200.2") || n.Endpoint6() != netip.MustParseAddr("2001:db8:200::2") {
		t.Errorf("Name %s, Endpoint4 %s, Endpoint6 %s", n.Name(), n.Endpoint4(), n.Endpoint6())
	}

	// Close, from elsewhere, wakes a blocked Read.
	tuntest.CheckCloseWakesRead(t, n, n.MTU(), func() error { return other.Do(n.Close) })
	sameSnapshot(t, "Close", before, ftSnapshot(t))
	if err := other.Do(func() error { sameSnapshot(t, "Close from this namespace", otherBefore, ftSnapshot(t)); return nil }); err != nil {
		t.Fatal(err)
	}
	tuntest.CheckClosed(t, n, tun.MTU, tcpPacket(netip.AddrPortFrom(n.Endpoint4(), 1), netip.AddrPortFrom(ftServerV4, 1), 0, 0, tcpSYN, nil))
}

// TestFakeTCPInstances runs a client and a server in one namespace: the
// first to close leaves forwarding on for the other, handing over what
// it recorded, and the last restores everything.
func TestFakeTCPInstances(t *testing.T) {
	newFakeTCPLab(t)
	before := stableFTSnapshot(t)
	a := start(t, Config{Role: Client, Name: "fta", Net4: netip.MustParsePrefix("100.64.202.0/30")})
	b := start(t, Config{Role: Server, Name: "ftb", Port: 4500,
		Net4: netip.MustParsePrefix("100.64.203.0/30"), Net6: netip.MustParsePrefix("2001:db8:203::/126")})
	during := ftSnapshot(t)
	mustContain(t, during,
		"table inet iketcp_faketcp_fta {",
		"table inet iketcp_faketcp_ftb {",
		"type nat hook prerouting priority dstnat; policy accept;",
		`iifname != "ftb" fib daddr type local tcp dport 4500 dnat ip to 100.64.203.2:4500`,
		`iifname != "ftb" fib daddr type local tcp dport 4500 dnat ip6 to [2001:db8:203::2]:4500`,
		`oifname "ftb" icmpv6 type mld2-listener-report drop`,
		"net/ipv4/ip_forward=1",
		"net/ipv6/conf/all/forwarding=1",
	)
	if t.Failed() {
		t.Logf("while running:\n%s", during)
	}
	// A third with a's subnet is refused, and changes nothing.
	_, err := Setup(Config{Name: "ftc", Net4: netip.MustParsePrefix("100.64.202.0/30"), Logger: nattest.Logger(t)})
	if err == nil || !strings.Contains(err.Error(), "Net4 100.64.202.0/30 is in use: fta has the address 100.64.202.1") {
		t.Errorf("Setup with a subnet in use: %v", err)
	}
	sameSnapshot(t, "a refused Setup", during, ftSnapshot(t))
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	fwd := forwardingSysctls(t)
	mustContain(t, fwd, "net/ipv4/ip_forward=1", "net/ipv6/conf/all/forwarding=1")
	// a, IPv4 only, recorded only IPv4's forwarding; b's IPv6 is its now.
	out, err := exec.Command("nft", "list", "table", "inet", "iketcp_faketcp_fta").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	mustContain(t, string(out), `comment "net/ipv4/ip_forward=0"`, `comment "net/ipv6/conf/all/forwarding=0"`)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, "closing both", before, ftSnapshot(t))
}

// TestFakeTCPStaleStateIsRemoved leaves behind what crashed runs leave,
// and checks that Setup and Cleanup remove it all, and put
// forwarding back as it was before the crashed run.
func TestFakeTCPStaleStateIsRemoved(t *testing.T) {
	requireNft(t)
	nattest.Enter(t)
	before := stableFTSnapshot(t)
	cfg := Config{Role: Server, Name: "ftx", Port: 4500, Net4: ftServerNet4, Net6: ftServerNet6, Logger: nattest.Logger(t)}

	// A crash: the process dies, so its descriptors close and the TUN
	// device goes with them, while the table and forwarding stay.
	crash := func() {
		t.Helper()
		n, err := Setup(cfg)
		if err != nil {
			t.Fatal(err)
		}
		n.dev.File().Close()
		n.nft.CloseLasting()
		n.nl.Close()
		n.sysctls.close()
		s := ftSnapshot(t)
		if !strings.Contains(s, "table inet iketcp_faketcp_ftx") || !strings.Contains(s, "net/ipv4/ip_forward=1") {
			t.Fatalf("the crash left no table or forwarding behind: nothing to test\n%s", s)
		}
	}

	crash()
	n, err := Setup(cfg)
	if err != nil {
		t.Fatalf("Setup over a crashed run's state: %v", err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, "a crash, Setup and Close", before, ftSnapshot(t))

	// A persistent device of the same name, as a hand-made one would be.
	crash()
	if err := netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "ftx"}, Mode: netlink.TUNTAP_MODE_TUN}); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup(Config{Name: "ftx", Logger: nattest.Logger(t)}); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	sameSnapshot(t, "a crash and Cleanup", before, ftSnapshot(t))
	if err := Cleanup(Config{Name: "ftx", Logger: nattest.Logger(t)}); err != nil {
		t.Fatalf("Cleanup with nothing to clean: %v", err)
	}

	// A device of the name that is not a TUN device is not iketcp's: it
	// stays, and so does everything else.
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ftx"}, PeerName: "ftstray"}); err != nil {
		t.Fatal(err)
	}
	withVeth := ftSnapshot(t)
	if _, err := Setup(cfg); err == nil || !strings.Contains(err.Error(), "not iketcp's") {
		t.Fatalf("Setup over a veth device: %v, want a refusal", err)
	}
	sameSnapshot(t, "a refused Setup", withVeth, ftSnapshot(t))
}

// TestFakeTCPFailedSetupUndoes fails Setup after each thing it installs
// in turn, and checks that it leaves nothing behind.
func TestFakeTCPFailedSetupUndoes(t *testing.T) {
	requireNft(t)
	nattest.Enter(t)
	before := stableFTSnapshot(t)
	cfg := Config{Role: Server, Name: "ftu", Port: 4500, Net4: ftServerNet4, Net6: ftServerNet6, Mark: 7, Logger: nattest.Logger(t)}
	steps := nattest.CheckUndo(t, func() (io.Closer, error) { return Setup(cfg) }, func(step string) {
		sameSnapshot(t, "a failure after "+step, before, ftSnapshot(t))
	})
	if len(steps) != 4 {
		t.Errorf("want 4 steps: device, table, IPv4 and IPv6 forwarding")
	}
}

// TestFakeTCPIPv6Off checks the error for Net6 on a host without IPv6.
func TestFakeTCPIPv6Off(t *testing.T) {
	requireNft(t)
	nattest.Enter(t)
	nattest.SetSysctl(t, "net/ipv6/conf/default/disable_ipv6", "1")
	before := ftSnapshot(t)
	_, err := Setup(Config{Net6: ftClientNet6, Logger: nattest.Logger(t)})
	if err == nil || !strings.Contains(err.Error(), "IPv6 is off") {
		t.Fatalf("Setup with Net6 and IPv6 off: %v", err)
	}
	sameSnapshot(t, "the failed Setup", before, ftSnapshot(t))
	// IPv4 alone does not care.
	n := start(t, Config{})
	if n.Name() != DefaultName || n.Endpoint4() != netip.MustParseAddr("100.127.255.254") || n.Endpoint6().IsValid() {
		t.Errorf("defaults: Name %s, Endpoint4 %s, Endpoint6 %s", n.Name(), n.Endpoint4(), n.Endpoint6())
	}
}

// TestFakeTCPNeedsNetAdmin drops CAP_NET_ADMIN from a thread of its own
// and checks that every way in names the capability.
func TestFakeTCPNeedsNetAdmin(t *testing.T) {
	nattest.RequireTUN(t)
	var errs []error
	err := nattest.WithoutNetAdmin(func() error {
		_, err := Setup(Config{})
		errs = append(errs, err, Cleanup(Config{}))
		// The kernel's own refusals, past the up-front check.
		errs = append(errs, nattest.CreateTUN(modeFakeTCP, "ftcap"))
		nl, nft, err := handles()
		if err == nil {
			_, err = listTables(nft)
			nft.CloseLasting()
			nl.Close()
		}
		return errors.Join(append(errs, err)...)
	})
	if err == nil {
		t.Fatal("no errors without CAP_NET_ADMIN")
	}
	for k, e := range append(errs, err) {
		if e == nil || !errors.Is(e, nat.ErrNeedsNetAdmin) || !strings.Contains(e.Error(), "CAP_NET_ADMIN") || !strings.Contains(e.Error(), "fake-TCP mode") {
			t.Errorf("error %d: %v, want one of fake-TCP mode that names CAP_NET_ADMIN", k, e)
		}
	}
	t.Logf("without CAP_NET_ADMIN: %v", err)
}

// TestFakeTCPMark checks that what the kernel forwards from the endpoint
// carries Mark before it is routed: a policy rule that sends the server's
// address nowhere lets the marked traffic through to main, as
// transparent mode's bypass rule does.
func TestFakeTCPMark(t *testing.T) {
	l := newFakeTCPLab(t)
	const mark = 0x4501
	nattest.IP(t, "rule", "add", "pref", "10", "fwmark", fmt.Sprint(mark), "lookup", "main")
	nattest.IP(t, "rule", "add", "pref", "11", "to", ftServerV4.String(), "unreachable")
	// Unmarked, the kernel's own traffic to the server goes nowhere.
	if c, err := net.Dial("udp4", netip.AddrPortFrom(ftServerV4, 9).String()); err == nil {
		_, err = c.Write([]byte("x"))
		c.Close()
		if err == nil {
			t.Fatal("an unmarked packet to the server was sent: the rule does not work")
		}
	}
	client := start(t, Config{Role: Client, Name: "ftcli", Net4: ftClientNet4, Mark: mark})
	server := startIn(t, l.server, Config{Role: Server, Name: "ftsrv", Net4: ftServerNet4, Port: 4500})
	sin := rawPump(t, server)
	writeAll(t, client, tcpPacket(netip.AddrPortFrom(client.Endpoint4(), 40000), netip.AddrPortFrom(ftServerV4, 4500), 1, 0, tcpSYN, nil))
	expectTCP(t, "the server's device", sin, ipPacket{src: netip.AddrPortFrom(ftClientV4, 0), dst: netip.AddrPortFrom(server.Endpoint4(), 4500), seq: 1, flags: tcpSYN})
}

// TestFakeTCPSources: a client's connections from a source's block of
// ports leave with the source's address, where the masquerade would give
// them the outgoing device's primary one; ports outside every block are
// masqueraded; the replies come back to the endpoint; Close removes the
// rules with the table.
func TestFakeTCPSources(t *testing.T) {
	l := newFakeTCPLab(t)
	// A second address on the uplink: the masquerade never picks it.
	second := netip.MustParseAddr("198.51.100.3")
	link, err := netlink.LinkByName(ftClientVeth)
	if err != nil {
		t.Fatal(err)
	}
	if err := nattest.AddAddr(link, second, 24); err != nil {
		t.Fatal(err)
	}
	before := stableFTSnapshot(t)
	cfg := Config{Role: Client, Name: "ftcli", Net4: ftClientNet4, Logger: nattest.Logger(t), Sources: []Source{
		{Addr: second, FirstPort: 41000, LastPort: 41009},
		{Addr: ftClientV4, FirstPort: 41010, LastPort: 41010},
	}}
	client, err := Setup(cfg)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			client.Close()
		}
	})
	mustContain(t, ftSnapshot(t),
		`ip saddr 100.64.200.2 oifname != "ftcli" tcp sport 41000-41009 snat ip to 198.51.100.3`,
		`ip saddr 100.64.200.2 oifname != "ftcli" tcp sport 41010 snat ip to 198.51.100.2`,
		`ip saddr 100.64.200.2 oifname != "ftcli" masquerade`,
	)
	server := startIn(t, l.server, Config{Role: Server, Name: "ftsrv", Net4: ftServerNet4, Port: 4500})
	cin, sin := rawPump(t, client), rawPump(t, server)
	sAt, sepAt := netip.AddrPortFrom(ftServerV4, 4500), netip.AddrPortFrom(server.Endpoint4(), 4500)
	for _, c := range []struct {
		port uint16
		want netip.Addr
	}{{41000, second}, {41009, second}, {41010, ftClientV4}, {40999, ftClientV4}, {41011, ftClientV4}} {
		cAt := netip.AddrPortFrom(client.Endpoint4(), c.port)
		writeAll(t, client, tcpPacket(cAt, sAt, 1000, 0, tcpSYN, nil))
		syn := expectTCP(t, "the server's device", sin, ipPacket{src: netip.AddrPortFrom(c.want, c.port), dst: sepAt, seq: 1000, flags: tcpSYN})
		writeAll(t, server, tcpPacket(sepAt, syn.src, 5000, 1001, tcpSYN|tcpACK, nil))
		expectTCP(t, "the client's device", cin, ipPacket{src: sAt, dst: cAt, seq: 5000, ack: 1001, flags: tcpSYN | tcpACK})
	}
	closed = true
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, "Close", before, stableFTSnapshot(t))
}

// TestFakeTCPReadWriteDoNotAllocate counts allocations of Read and Write.
func TestFakeTCPReadWriteDoNotAllocate(t *testing.T) {
	if nattest.RaceEnabled {
		t.Skip("the race detector allocates on its own; make test runs this check without -race")
	}
	requireNft(t)
	nattest.Enter(t)
	n := start(t, Config{Net4: ftClientNet4})
	kernel := netip.MustParseAddr("100.64.200.1")
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(kernel, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	to := netip.AddrPortFrom(n.Endpoint4(), 4500)
	send := func() {
		if _, err := c.WriteToUDPAddrPort([]byte("to the endpoint"), to); err != nil {
			t.Fatal(err)
		}
	}
	reply := nattest.UDPPacket(to, c.LocalAddr().(*net.UDPAddr).AddrPort(), []byte("from the endpoint"))
	tuntest.CheckNoAllocs(t, n, n.MTU(), send, reply)
	// The endpoint's packets reached the socket: Write really wrote.
	nattest.ExpectUDP(t, c, []byte("from the endpoint"))
}

func TestFakeTCPRecordKeys(t *testing.T) {
	for key, want := range map[string]bool{
		"net/ipv4/ip_forward":                 true,
		"net/ipv6/conf/all/forwarding":        true,
		"net/ipv4/conf/eth0.100/forwarding":   true,
		"net/ipv6/conf/default/forwarding":    true,
		"net/ipv4/conf/eth0/rp_filter":        false,
		"net/ipv4/conf/../../../forwarding":   false,
		"net/ipv4/conf/a/b/forwarding":        false,
		"kernel/core_pattern":                 false,
		"net/ipv4/conf//forwarding":           false,
		"net/ipv6/conf/all/forwarding/../foo": false,
	} {
		if got := forwardingKey(key); got != want {
			t.Errorf("forwardingKey(%q) = %v", key, got)
		}
	}
	if got := sysctlName("net/ipv4/conf/eth0.100/forwarding"); got != "net.ipv4.conf.eth0/100.forwarding" {
		t.Errorf("sysctlName: %s", got)
	}
	err := sysctlError("turn on IPv4 forwarding", "net.ipv4.ip_forward", &os.PathError{Op: "write", Path: "/proc/sys/net/ipv4/ip_forward", Err: unix.EROFS})
	if !strings.Contains(err.Error(), "read-only") || !strings.Contains(err.Error(), "--sysctl net.ipv4.ip_forward=1") {
		t.Errorf("read-only /proc/sys: %v", err)
	}
	err = sysctlError("turn on IPv4 forwarding", "net.ipv4.ip_forward", unix.EPERM)
	if !errors.Is(err, nat.ErrNeedsNetAdmin) || !strings.Contains(err.Error(), "CAP_NET_ADMIN") {
		t.Errorf("EPERM: %v", err)
	}
}

// TestFakeTCPOutOfWindowFromPeer pins down the pitfall the package
// documentation warns of: a segment from the peer far outside the window
// the client's conntrack follows is not NATed to the endpoint; the
// client's kernel answers it with a RST, which reaches the server's
// endpoint as if the client had sent it.
func TestFakeTCPOutOfWindowFromPeer(t *testing.T) {
	l := newFakeTCPLab(t)
	capC := startCapture(t, ftClientVeth)
	client := start(t, Config{Role: Client, Name: "ftcli", Net4: ftClientNet4})
	server := startIn(t, l.server, Config{Role: Server, Name: "ftsrv", Net4: ftServerNet4, Port: 4500})
	cin, sin := rawPump(t, client), rawPump(t, server)
	cAt := netip.AddrPortFrom(client.Endpoint4(), 40000)
	sAt := netip.AddrPortFrom(ftServerV4, 4500)
	sepAt := netip.AddrPortFrom(server.Endpoint4(), 4500)
	writeAll(t, client, tcpPacket(cAt, sAt, 100, 0, tcpSYN, nil))
	syn := expectTCP(t, "the server's device", sin, ipPacket{src: netip.AddrPortFrom(ftClientV4, 0), dst: sepAt, seq: 100, flags: tcpSYN})
	writeAll(t, server, tcpPacket(sepAt, syn.src, 500, 101, tcpSYN|tcpACK, nil))
	expectTCP(t, "the client's device", cin, ipPacket{src: sAt, dst: cAt, seq: 500, ack: 101, flags: tcpSYN | tcpACK})
	writeAll(t, client, tcpPacket(cAt, sAt, 101, 501, tcpACK, nil))
	expectTCP(t, "the server's device", sin, ipPacket{src: syn.src, dst: sepAt, seq: 101, ack: 501, flags: tcpACK})
	capC.drain(t)

	// The server's address and port, but past the server's own netfilter
	// (an AF_PACKET socket on its end of the pair), far out of the window.
	cl, err := netlink.LinkByName(ftClientVeth)
	if err != nil {
		t.Fatal(err)
	}
	err = l.server.Do(func() error {
		sl, err := netlink.LinkByName(ftServerVeth)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		frame := slices.Concat(cl.Attrs().HardwareAddr, sl.Attrs().HardwareAddr, []byte{0x08, 0x00},
			tcpPacket(sAt, syn.src, 501+1<<30, 101, tcpPSH|tcpACK, []byte("out of the window")))
		to := &unix.SockaddrLinklayer{Ifindex: sl.Attrs().Index, Halen: 6}
		copy(to.Addr[:], cl.Attrs().HardwareAddr)
		return unix.Sendto(fd, frame, 0, to)
	})
	if err != nil {
		t.Fatal(err)
	}
	rst := expectTCP(t, "the server's device", sin, ipPacket{src: syn.src, dst: sepAt, seq: 101, flags: tcpRST})
	noMore(t, "the client's device", cin, 100*time.Millisecond)
	sawRST := false
	for _, p := range capC.drain(t) {
		t.Logf("%s carried %v", ftClientVeth, p)
		sawRST = sawRST || p.flags&tcpRST != 0 && p.src == syn.src
	}
	if !sawRST {
		t.Errorf("the RST the server's endpoint got, %v, was not the client's kernel's", rst)
	}
}

// The namespace the test binary started in, and its forwarding, read
// before any test ran.
var (
	rootNetns      = threadNetns()
	rootForwarding = func() string {
		b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		return string(b)
	}()
)

// TestFakeTCPNotInRootNamespace, last of this file, makes sure that the
// tests never touched the namespace the test binary started in.
func TestFakeTCPNotInRootNamespace(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if rootNetns == (nsID{}) || threadNetns() != rootNetns {
		t.Fatal("this test's thread is not in the namespace the process started in")
	}
	if b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); string(b) != rootForwarding {
		t.Errorf("net.ipv4.ip_forward changed from %q to %q", rootForwarding, b)
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, "ft") || strings.HasPrefix(l.Attrs().Name, "iketcp") {
			t.Errorf("a device of the tests' in the root namespace: %s", l.Attrs().Name)
		}
	}
	if os.Geteuid() == 0 {
		_, nft, err := handles()
		if err != nil {
			t.Fatal(err)
		}
		defer nft.CloseLasting()
		tables, err := listTables(nft)
		if err != nil {
			t.Fatal(err)
		}
		for _, tb := range tables {
			t.Errorf("a table of the tests' in the root namespace: %s", tb.Name)
		}
	}
}
