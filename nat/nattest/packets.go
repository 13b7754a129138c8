package nattest

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"testing"
	"time"
)

// The IP protocol number of UDP.
const protoUDP = 17

// UDPPacket builds an IPv4 (with DF) or IPv6 packet carrying a UDP
// datagram, with correct checksums, by hand: it shares no code with what
// it tests.
func UDPPacket(src, dst netip.AddrPort, payload []byte) []byte {
	udpLen := 8 + len(payload)
	udp := make([]byte, udpLen)
	Put16(udp[0:], src.Port())
	Put16(udp[2:], dst.Port())
	Put16(udp[4:], uint16(udpLen))
	copy(udp[8:], payload)
	s, d := src.Addr().AsSlice(), dst.Addr().AsSlice()
	var pseudo []byte
	pseudo = append(pseudo, s...)
	pseudo = append(pseudo, d...)
	var hdr []byte
	if src.Addr().Is4() {
		pseudo = append(pseudo, 0, protoUDP, byte(udpLen>>8), byte(udpLen))
		hdr = make([]byte, 20)
		hdr[0] = 0x45
		Put16(hdr[2:], uint16(20+udpLen))
		Put16(hdr[4:], 0x1234)
		Put16(hdr[6:], 0x4000) // don't fragment
		hdr[8] = 64
		hdr[9] = protoUDP
		copy(hdr[12:], s)
		copy(hdr[16:], d)
		Put16(hdr[10:], Checksum(hdr))
	} else {
		pseudo = append(pseudo, 0, 0, byte(udpLen>>8), byte(udpLen), 0, 0, 0, protoUDP)
		hdr = make([]byte, 40)
		hdr[0] = 0x60
		Put16(hdr[4:], uint16(udpLen))
		hdr[6] = protoUDP
		hdr[7] = 64
		copy(hdr[8:], s)
		copy(hdr[24:], d)
	}
	sum := Checksum(append(pseudo, udp...))
	if sum == 0 {
		sum = 0xffff
	}
	Put16(udp[6:], sum)
	return append(hdr, udp...)
}

// The IP protocol number of TCP.
const protoTCP = 6

// TCPPacket builds an IPv4 (with DF, and IPv4 ID id) or IPv6 packet
// carrying a TCP segment with a 20-byte header (window 512) and correct
// checksums, by hand: it shares no code with what it tests.
func TCPPacket(src, dst netip.AddrPort, seq, ack uint32, flags uint8, id uint16, payload []byte) []byte {
	tcp := make([]byte, 20, 20+len(payload))
	Put16(tcp[0:], src.Port())
	Put16(tcp[2:], dst.Port())
	Put32(tcp[4:], seq)
	Put32(tcp[8:], ack)
	tcp[12] = 5 << 4
	tcp[13] = flags
	Put16(tcp[14:], 512)
	tcp = append(tcp, payload...)
	s, d := src.Addr().AsSlice(), dst.Addr().AsSlice()
	pseudo := append(append([]byte{}, s...), d...)
	var hdr []byte
	if src.Addr().Is4() {
		pseudo = append(pseudo, 0, protoTCP, byte(len(tcp)>>8), byte(len(tcp)))
		hdr = make([]byte, 20)
		hdr[0] = 0x45
		Put16(hdr[2:], uint16(20+len(tcp)))
		Put16(hdr[4:], id)
		Put16(hdr[6:], 0x4000) // don't fragment
		hdr[8], hdr[9] = 64, protoTCP
		copy(hdr[12:], s)
		copy(hdr[16:], d)
		Put16(hdr[10:], Checksum(hdr))
	} else {
		pseudo = append(pseudo, 0, 0, byte(len(tcp)>>8), byte(len(tcp)), 0, 0, 0, protoTCP)
		hdr = make([]byte, 40)
		hdr[0] = 0x60
		Put16(hdr[4:], uint16(len(tcp)))
		hdr[6], hdr[7] = protoTCP, 64
		copy(hdr[8:], s)
		copy(hdr[24:], d)
	}
	Put16(tcp[16:], Checksum(append(pseudo, tcp...)))
	return append(hdr, tcp...)
}

// Put32 writes v into b[:4], big-endian.
func Put32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
}

// Put16 writes v into b[:2], big-endian.
func Put16(b []byte, v uint16) { b[0], b[1] = byte(v>>8), byte(v) }

// Checksum is the Internet checksum of b.
func Checksum(b []byte) uint16 {
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

// ExpectUDP waits for one datagram with payload want on c, and returns
// where it came from.
func ExpectUDP(tb testing.TB, c *net.UDPConn, want []byte) netip.AddrPort {
	tb.Helper()
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		tb.Fatalf("%s did not receive %q: %v", c.LocalAddr(), want, err)
	}
	if !bytes.Equal(buf[:n], want) {
		tb.Fatalf("%s received %q, want %q", c.LocalAddr(), buf[:n], want)
	}
	return from
}

// DialTCP connects from the calling thread's namespace, bounded in time.
func DialTCP(to netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var d net.Dialer
	return d.DialContext(ctx, "tcp", to.String())
}
