package packet

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// These tests cross-check the package with the Linux network stack over
// the loopback interface: Parse reads packets the kernel built, and the
// kernel accepts packets PutUDP and PutESP built, which it only does when
// their checksums are right. They need CAP_NET_RAW for packet sockets and
// skip without it.

const (
	ethPAll  = 0x0003 // ETH_P_ALL: every protocol
	ethPIPv4 = 0x0800 // ETH_P_IP
	ethPIPv6 = 0x86dd // ETH_P_IPV6
)

// htons converts a 16-bit value to network byte order, as packet sockets
// take protocol numbers.
func htons(v uint16) uint16 { return v<<8 | v>>8 }

// loopback returns the loopback interface, skipping t without one.
func loopback(t *testing.T) *net.Interface {
	t.Helper()
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Skipf("listing interfaces: %v", err)
	}
	for i := range ifaces {
		if ifaces[i].Flags&net.FlagLoopback != 0 {
			return &ifaces[i]
		}
	}
	t.Skip("no loopback interface")
	return nil
}

// packetSocket opens an AF_PACKET socket of type SOCK_DGRAM (IP packets
// without the link-layer header) bound to lo for protocol, or, with
// protocol 0, one that only sends. It skips t when the process lacks
// CAP_NET_RAW.
func packetSocket(t *testing.T, lo *net.Interface, protocol uint16) int {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, int(htons(protocol)))
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
		t.Skipf("packet sockets need CAP_NET_RAW (run as root): %v", err)
	}
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if protocol != 0 {
		// Loopback carries whatever else runs here; room for a burst of
		// it keeps the packet a test waits for from being dropped.
		_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, 8<<20)
		if err := syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: htons(protocol), Ifindex: lo.Index}); err != nil {
			t.Fatalf("binding packet socket to %s: %v", lo.Name, err)
		}
	}
	setReceiveTimeout(t, fd, 200*time.Millisecond)
	return fd
}

// rawSocket opens a raw IP socket for protocol, skipping t without
// CAP_NET_RAW.
func rawSocket(t *testing.T, family, protocol int) int {
	t.Helper()
	fd, err := syscall.Socket(family, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, protocol)
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
		t.Skipf("raw sockets need CAP_NET_RAW (run as root): %v", err)
	}
	if err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	setReceiveTimeout(t, fd, 200*time.Millisecond)
	return fd
}

func setReceiveTimeout(t *testing.T, fd int, d time.Duration) {
	t.Helper()
	tv := syscall.NsecToTimeval(d.Nanoseconds())
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		t.Fatalf("SO_RCVTIMEO: %v", err)
	}
}

// listenLoopbackUDP opens a UDP socket on the loopback address of the
// family of addr, skipping t when that family is unavailable.
func listenLoopbackUDP(t *testing.T, addr netip.Addr) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		t.Skipf("no UDP on %v: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// setSocketOption sets a socket option given as bytes on c.
func setSocketOption(t *testing.T, c syscall.Conn, level, name int, value []byte) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = syscall.SetsockoptString(int(fd), level, name, string(value)) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Skipf("setting socket option %d/%d: %v", level, name, serr)
	}
}

// capture reads packets from the packet socket fd until match accepts one
// that Parse parsed, and returns it. Loopback carries whatever else runs on
// this host too, so packets Parse rejects or match declines are skipped.
func capture(t *testing.T, fd int, match func(pkt []byte, info *Info) bool) ([]byte, Info) {
	t.Helper()
	buf := make([]byte, 1<<16)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		n, _, err := syscall.Recvfrom(fd, buf, 0)
		if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			t.Fatalf("capturing: %v", err)
		}
		var info Info
		if Parse(buf[:n], &info) == nil && match(buf[:n], &info) {
			return buf[:n], info
		}
	}
	t.Fatal("the packet never showed up on loopback")
	return nil, Info{}
}

// TestParseKernelPackets sends UDP datagrams and ESP packets from ordinary
// sockets over loopback, with and without IPv4 options and IPv6 extension
// headers, captures what the kernel put on the wire and parses it.
func TestParseKernelPackets(t *testing.T) {
	lo := loopback(t)
	tap := packetSocket(t, lo, ethPAll)
	hopByHop := append([]byte{0, 0}, padN(1)...)    // next header filled in by the kernel
	destOptions := append([]byte{0, 1}, padN(2)...) // 16 bytes
	ipv4Options := []byte{1, 1, 1, 1, 1, 1, 1, 0}   // NOPs and End of Options: 8 bytes
	localhost4, localhost6 := netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()

	udpCases := []struct {
		name      string
		addr      netip.Addr
		configure func(t *testing.T, c *net.UDPConn)
		headerLen int
	}{
		{"IPv4", localhost4, nil, IPv4HeaderLen},
		{"IPv4 with options", localhost4, func(t *testing.T, c *net.UDPConn) {
			setSocketOption(t, c, syscall.IPPROTO_IP, syscall.IP_OPTIONS, ipv4Options)
		}, IPv4HeaderLen + len(ipv4Options)},
		{"IPv6", localhost6, nil, IPv6HeaderLen},
		{"IPv6 with hop-by-hop and destination options", localhost6, func(t *testing.T, c *net.UDPConn) {
			setSocketOption(t, c, syscall.IPPROTO_IPV6, syscall.IPV6_HOPOPTS, hopByHop)
			setSocketOption(t, c, syscall.IPPROTO_IPV6, syscall.IPV6_DSTOPTS, destOptions)
		}, IPv6HeaderLen + len(hopByHop) + len(destOptions)},
	}
	for i, tc := range udpCases {
		t.Run("UDP "+tc.name, func(t *testing.T) {
			receiver := listenLoopbackUDP(t, tc.addr)
			sender := listenLoopbackUDP(t, tc.addr)
			if tc.configure != nil {
				tc.configure(t, sender)
			}
			from, to := sender.LocalAddr().(*net.UDPAddr).AddrPort(), receiver.LocalAddr().(*net.UDPAddr).AddrPort()
			payload := filler(1000+i, uint64(time.Now().UnixNano()))
			if _, err := sender.WriteToUDPAddrPort(payload, to); err != nil {
				t.Fatal(err)
			}
			pkt, info := capture(t, tap, func(pkt []byte, info *Info) bool {
				return info.Proto == ProtoUDP && info.Source() == from && info.Destination() == to && bytes.Equal(info.Payload(pkt), payload)
			})
			want := Info{
				Version: 4, Src: tc.addr, Dst: tc.addr, Proto: ProtoUDP, SrcPort: from.Port(), DstPort: to.Port(),
				PayloadOffset: tc.headerLen + UDPHeaderLen, PayloadLen: len(payload),
			}
			if tc.addr.Is6() {
				want.Version = 6
			}
			if info != want {
				t.Fatalf("Parse = %+v, want %+v", info, want)
			}
			// The kernel may leave the UDP checksum to a checksum offload
			// that loopback never performs; that is why Parse does not
			// check it.
			udp := pkt[info.PayloadOffset-UDPHeaderLen:]
			if referenceChecksum(pseudoHeader(info.Src, info.Dst, ProtoUDP, len(udp)), udp) != 0 {
				t.Logf("captured UDP checksum %#04x is partial, as the kernel leaves it for offload", uint16(udp[6])<<8|uint16(udp[7]))
			}
		})
	}

	for i, addr := range []netip.Addr{localhost4, localhost6} {
		t.Run("ESP "+map[bool]string{true: "IPv4", false: "IPv6"}[addr.Is4()], func(t *testing.T) {
			var family int
			var sa syscall.Sockaddr
			if addr.Is4() {
				family, sa = syscall.AF_INET, &syscall.SockaddrInet4{Addr: addr.As4()}
			} else {
				listenLoopbackUDP(t, addr) // skips without IPv6
				family, sa = syscall.AF_INET6, &syscall.SockaddrInet6{Addr: addr.As16()}
			}
			fd := rawSocket(t, family, ProtoESP)
			esp := filler(200+i, uint64(time.Now().UnixNano()))
			if err := syscall.Sendto(fd, esp, 0, sa); err != nil {
				t.Fatal(err)
			}
			_, info := capture(t, tap, func(pkt []byte, info *Info) bool {
				return info.Proto == ProtoESP && bytes.Equal(info.Payload(pkt), esp)
			})
			want := Info{Version: 4, Src: addr, Dst: addr, Proto: ProtoESP, PayloadOffset: IPv4HeaderLen, PayloadLen: len(esp)}
			if addr.Is6() {
				want.Version, want.PayloadOffset = 6, IPv6HeaderLen
			}
			if info != want {
				t.Fatalf("Parse = %+v, want %+v", info, want)
			}
		})
	}
}

// deliverer hands IP packets built here to the kernel's receive path on
// loopback, as a TUN write does.
//
// IPv6 packets go in through a packet socket, as if they had arrived on
// lo. IPv4 cannot take that way: the kernel refuses 127.0.0.0/8 on input
// (unless route_localnet is set), so IPv4 packets go out through a raw
// socket with the header included, which loops them back. The kernel then
// fills in the header checksum itself, and the ID when it is 0 and DF is
// clear; tests compare what arrives with what was built to check that
// header. Either way the kernel verifies the UDP checksum on receipt.
type deliverer struct {
	lo      *net.Interface
	packet  int // AF_PACKET socket for IPv6
	rawIPv4 int // raw IPv4 socket with IP_HDRINCL
}

func newDeliverer(t *testing.T) *deliverer {
	lo := loopback(t)
	return &deliverer{lo: lo, packet: packetSocket(t, lo, 0), rawIPv4: rawSocket(t, syscall.AF_INET, syscall.IPPROTO_RAW)}
}

func (d *deliverer) deliver(t *testing.T, pkt []byte) {
	t.Helper()
	var err error
	if pkt[0]>>4 == 4 {
		err = syscall.Sendto(d.rawIPv4, pkt, 0, &syscall.SockaddrInet4{Addr: [4]byte(pkt[16:20])})
	} else {
		err = syscall.Sendto(d.packet, pkt, 0, &syscall.SockaddrLinklayer{Protocol: htons(ethPIPv6), Ifindex: d.lo.Index, Halen: 6})
	}
	if err != nil {
		t.Fatalf("delivering a packet on %s: %v", d.lo.Name, err)
	}
}

// spoilChecksum changes the checksum at the start of b to a wrong value
// that is not 0 either, which in IPv4 UDP would mean no checksum.
func spoilChecksum(b []byte) {
	spoiled := binary.BigEndian.Uint16(b) + 1
	if spoiled == 0 {
		spoiled = 2 // 0 and 0xffff are one value, so 1 would be right
	}
	binary.BigEndian.PutUint16(b, spoiled)
}

// TestKernelAcceptsBuiltPackets delivers datagrams built by PutUDP on
// loopback, each after a copy with its UDP checksum spoiled, and checks
// that the receiving socket gets the good one from the right address and
// never the spoiled one, which the kernel drops on its checksum. It also
// captures each IPv4 packet as the kernel sent it and checks that the
// header checksum the kernel computed is the one PutUDP wrote.
func TestKernelAcceptsBuiltPackets(t *testing.T) {
	d := newDeliverer(t)
	tap := packetSocket(t, d.lo, ethPAll)
	for _, addr := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()} {
		t.Run(map[bool]string{true: "IPv4", false: "IPv6"}[addr.Is4()], func(t *testing.T) {
			receiver := listenLoopbackUDP(t, addr)
			to := receiver.LocalAddr().(*net.UDPAddr).AddrPort()
			// The spoiled copy comes from another port, so that it stays
			// apart from the good one even when both payloads are empty.
			from, spoiledFrom := netip.AddrPortFrom(addr, 4500), netip.AddrPortFrom(addr, 4501)
			seed := uint64(time.Now().UnixNano())
			for _, size := range []int{0, 1, 1399, 1400, 9000} {
				good, spoiled := filler(size, seed), filler(size, seed+1)
				var built [2][]byte
				for i, payload := range [][]byte{spoiled, good} {
					buf := append(make([]byte, MaxHeader), payload...)
					start, err := PutUDP(buf, MaxHeader, []netip.AddrPort{spoiledFrom, from}[i], to)
					if err != nil {
						t.Fatal(err)
					}
					built[i] = buf[start:]
				}
				spoilChecksum(built[0][len(built[0])-len(spoiled)-2:])
				d.deliver(t, built[0])
				d.deliver(t, built[1])

				got := make([]byte, 1<<16)
				receiver.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, src, err := receiver.ReadFromUDPAddrPort(got)
				if err != nil {
					t.Fatalf("%d bytes: the built datagram never arrived: %v", size, err)
				}
				if !bytes.Equal(got[:n], good) || src != from {
					t.Fatalf("%d bytes: received %d bytes from %v, want the good %d bytes from %v", size, n, src, size, from)
				}
				receiver.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
				if n, _, err := receiver.ReadFromUDPAddrPort(got); err == nil {
					t.Fatalf("%d bytes: the kernel delivered a datagram with a spoiled checksum (%d bytes)", size, n)
				}
				if addr.Is4() {
					sent, _ := capture(t, tap, func(pkt []byte, info *Info) bool {
						return info.Source() == from && info.Destination() == to && bytes.Equal(info.Payload(pkt), good)
					})
					if !bytes.Equal(sent, built[1]) {
						t.Fatalf("%d bytes: the kernel sent\n% x\nfor\n% x", size, sent[:IPv4HeaderLen+UDPHeaderLen], built[1][:IPv4HeaderLen+UDPHeaderLen])
					}
				}
			}
		})
	}
}

// TestKernelAcceptsBuiltESP delivers ESP packets built by PutESP on
// loopback and reads them back from a raw ESP socket, which sees them only
// when the kernel took the IP header. Raw IPv4 sockets return the header
// too, which must be the one PutESP wrote, checksum included.
func TestKernelAcceptsBuiltESP(t *testing.T) {
	d := newDeliverer(t)
	for _, addr := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()} {
		t.Run(map[bool]string{true: "IPv4", false: "IPv6"}[addr.Is4()], func(t *testing.T) {
			family := syscall.AF_INET
			if addr.Is6() {
				listenLoopbackUDP(t, addr) // skips without IPv6
				family = syscall.AF_INET6
			}
			listener := rawSocket(t, family, ProtoESP)
			esp := filler(300, uint64(time.Now().UnixNano()))
			buf := append(make([]byte, MaxHeader), esp...)
			start, err := PutESP(buf, MaxHeader, addr, addr)
			if err != nil {
				t.Fatal(err)
			}
			built := buf[start:]
			d.deliver(t, built)

			// Other ESP on this host may show up as well.
			want := esp
			if addr.Is4() {
				want = built
			}
			got := make([]byte, 1<<16)
			deadline := time.Now().Add(5 * time.Second)
			for time.Now().Before(deadline) {
				n, _, err := syscall.Recvfrom(listener, got, 0)
				if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EINTR) {
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				if bytes.Equal(got[:n], want) {
					return
				}
				if addr.Is4() && n == len(built) && bytes.Equal(got[IPv4HeaderLen:n], esp) {
					t.Fatalf("the kernel delivered\n% x\nfor\n% x", got[:IPv4HeaderLen], built[:IPv4HeaderLen])
				}
			}
			t.Fatal("the built ESP packet never arrived")
		})
	}
}
