package faketcp

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

// Addresses from the documentation ranges (RFC 5737, RFC 3849).
var (
	addr4A = netip.MustParseAddr("192.0.2.1")
	addr4B = netip.MustParseAddr("198.51.100.7")
	addr6A = netip.MustParseAddr("2001:db8::1")
	addr6B = netip.MustParseAddr("2001:db8::2")
)

// referenceChecksum is the Internet checksum as RFC 1071 writes it out,
// independently of the package's: 16-bit big-endian words summed in 32
// bits, an odd last byte padded with zero, carries folded, complemented.
// Data that holds a correct checksum gives 0.
func referenceChecksum(data ...[]byte) uint16 {
	var all []byte
	for _, d := range data {
		all = append(all, d...)
	}
	var sum uint32
	for i := 0; i+1 < len(all); i += 2 {
		sum += uint32(all[i])<<8 | uint32(all[i+1])
	}
	if len(all)%2 == 1 {
		sum += uint32(all[len(all)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// referencePseudoHeader is TCP's pseudo-header for a segment of length
// bytes.
func referencePseudoHeader(src, dst netip.Addr, length int) []byte {
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		p := append(s[:], d[:]...)
		return append(p, 0, protoTCP, byte(length>>8), byte(length))
	}
	s, d := src.As16(), dst.As16()
	p := append(s[:], d[:]...)
	return append(p, 0, 0, byte(length>>8), byte(length), 0, 0, 0, protoTCP)
}

func filler(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// TestPutParse builds segments with headers.put and checks them against the
// reference checksum and against parsePacket, for both families, with
// and without SYN options, and payloads of odd and even lengths.
func TestPutParse(t *testing.T) {
	for _, addrs := range [][2]netip.Addr{{addr4A, addr4B}, {addr6A, addr6B}} {
		local, remote := netip.AddrPortFrom(addrs[0], 40000), netip.AddrPortFrom(addrs[1], 4500)
		hd := newHeaders(local, remote, 0xabcdef)
		for _, payloadLen := range []int{0, 1, 2, 63, 1400, 1401} {
			for _, syn := range []bool{false, true} {
				payload := filler(payloadLen, byte(payloadLen))
				buf := append(make([]byte, Headroom), payload...)
				fields := tcpFields{seq: 0xfffffff0, ack: 77, flags: flagACK | flagPSH, window: 64240}
				var opts []byte
				if syn {
					o := makeSYNOptions(1460, true, true)
					opts = o.buf[:o.n]
					fields.flags = flagSYN | flagACK
					buf = append(make([]byte, controlBufSize), payload...)
				}
				off := len(buf) - payloadLen
				start := hd.put(buf, off, fields, opts, 0x1234)
				pkt := buf[start:]
				ipLen := hd.ipHeaderLen()
				if start != off-ipLen-tcpHeaderLen-len(opts) {
					t.Fatalf("start %d for payload at %d", start, off)
				}
				tcp := pkt[ipLen:]
				if got := referenceChecksum(referencePseudoHeader(local.Addr(), remote.Addr(), len(tcp)), tcp); got != 0 {
					t.Errorf("%v payload %d syn %v: TCP checksum off by %#x", local, payloadLen, syn, got)
				}
				if addrs[0].Is4() {
					if got := referenceChecksum(pkt[:ipv4HeaderLen]); got != 0 {
						t.Errorf("IPv4 header checksum off by %#x", got)
					}
					if binary.BigEndian.Uint16(pkt[2:4]) != uint16(len(pkt)) || binary.BigEndian.Uint16(pkt[4:6]) != 0x1234 {
						t.Errorf("IPv4 length or ID wrong: % x", pkt[:ipv4HeaderLen])
					}
				} else if binary.BigEndian.Uint32(pkt[0:4]) != 6<<28|0xabcdef&0xfffff || int(binary.BigEndian.Uint16(pkt[4:6])) != len(tcp) {
					t.Errorf("IPv6 header wrong: % x", pkt[:8])
				}

				var in inbound
				if v := parsePacket(pkt, remote.Addr(), addrs[0].Is4(), &in); v != packetOK {
					t.Fatalf("parse: verdict %d", v)
				}
				want := segment{srcPort: 40000, dstPort: 4500, seq: fields.seq, ack: fields.ack, flags: fields.flags, window: fields.window, payloadLen: payloadLen}
				if syn {
					want.mss, want.windowScale, want.wsShift, want.sackPermitted = 1460, true, windowScale, true
				}
				if in.seg != want || in.src != local.Addr() || in.dst != remote.Addr() {
					t.Errorf("parsed %+v from %v to %v, want %+v", in.seg, in.src, in.dst, want)
				}
				if got := pkt[in.payloadOff : in.payloadOff+payloadLen]; string(got) != string(payload) {
					t.Error("payload differs")
				}
			}
		}
	}
}

// TestParseRefuses checks that parsePacket refuses what is not a sound
// TCP segment for the stack, and says why.
func TestParseRefuses(t *testing.T) {
	build := func(local, remote netip.AddrPort, payload int) []byte {
		hd := newHeaders(local, remote, 0)
		buf := append(make([]byte, Headroom), filler(payload, 1)...)
		return buf[hd.put(buf, Headroom, tcpFields{seq: 1, ack: 2, flags: flagACK}, nil, 0):]
	}
	a4, b4 := netip.AddrPortFrom(addr4A, 1000), netip.AddrPortFrom(addr4B, 2000)
	a6, b6 := netip.AddrPortFrom(addr6A, 1000), netip.AddrPortFrom(addr6B, 2000)
	mutate := func(pkt []byte, fn func(p []byte)) []byte {
		p := append([]byte(nil), pkt...)
		fn(p)
		return p
	}
	fixIPv4 := func(p []byte) {
		binary.BigEndian.PutUint16(p[10:12], 0)
		binary.BigEndian.PutUint16(p[10:12], referenceChecksum(p[:20]))
	}
	v4, v6 := build(a4, b4, 10), build(a6, b6, 10)
	tests := []struct {
		name  string
		pkt   []byte
		local netip.Addr
		want  verdictIP
	}{
		{"sound IPv4", v4, addr4B, packetOK},
		{"sound IPv6", v6, addr6B, packetOK},
		{"empty", nil, addr4B, packetMalformed},
		{"IPv4 to another address", v4, addr4A, packetNotLocal},
		{"IPv6 to an IPv4 stack", v6, addr4B, packetNotLocal},
		{"IPv4 to an IPv6 stack", v4, addr6B, packetNotLocal},
		{"bad TCP checksum", mutate(v4, func(p []byte) { p[len(p)-1] ^= 1 }), addr4B, packetBadChecksum},
		{"bad IPv6 TCP checksum", mutate(v6, func(p []byte) { p[45] ^= 1 }), addr6B, packetBadChecksum},
		{"bad IPv4 header checksum", mutate(v4, func(p []byte) { p[8]-- }), addr4B, packetMalformed},
		{"UDP", mutate(v4, func(p []byte) { p[9] = 17; fixIPv4(p) }), addr4B, packetNotTCP},
		{"IPv6 UDP", mutate(v6, func(p []byte) { p[6] = 17 }), addr6B, packetNotTCP},
		{"fragment", mutate(v4, func(p []byte) { p[6] |= 0x20; fixIPv4(p) }), addr4B, packetMalformed},
		{"truncated", v4[:len(v4)-1], addr4B, packetMalformed},
		{"IPv6 truncated", v6[:len(v6)-1], addr6B, packetMalformed},
		{"data offset past the end", mutate(v4, func(p []byte) { p[32] = 0xf0 }), addr4B, packetMalformed},
		{"data offset too small", mutate(v4, func(p []byte) { p[32] = 0x40 }), addr4B, packetMalformed},
		{"version 5", mutate(v4, func(p []byte) { p[0] = 0x55 }), addr4B, packetMalformed},
		{"IPv4 header shorter than 20", v4[:19], addr4B, packetMalformed},
		{"multicast source", build(netip.AddrPortFrom(netip.MustParseAddr("224.0.0.1"), 1000), b4, 10), addr4B, packetMalformed},
		{"broadcast source", build(netip.AddrPortFrom(netip.MustParseAddr("255.255.255.255"), 1000), b4, 10), addr4B, packetMalformed},
		{"unspecified IPv6 source", build(netip.AddrPortFrom(netip.IPv6Unspecified(), 1000), b6, 10), addr6B, packetMalformed},
		{"source port 0", build(netip.AddrPortFrom(addr4A, 0), b4, 10), addr4B, packetMalformed},
		{"IPv4 segment shorter than a TCP header", mutate(v4[:39], func(p []byte) { binary.BigEndian.PutUint16(p[2:4], 39); fixIPv4(p) }), addr4B, packetMalformed},
	}
	for _, tt := range tests {
		var in inbound
		if got := parsePacket(tt.pkt, tt.local, tt.local.Is4(), &in); got != tt.want {
			t.Errorf("%s: verdict %d, want %d", tt.name, got, tt.want)
		}
	}
}

// TestSYNOptions checks the layouts of the SYN options and that parsing
// keeps what comes before a malformed option.
func TestSYNOptions(t *testing.T) {
	o := makeSYNOptions(1460, true, true)
	want := []byte{2, 4, 0x05, 0xb4, 1, 3, 3, 7, 1, 1, 4, 2}
	if string(o.buf[:o.n]) != string(want) {
		t.Errorf("SYN options % x, want % x", o.buf[:o.n], want)
	}
	if o := makeSYNOptions(1440, false, false); o.n != 4 {
		t.Errorf("MSS alone: %d bytes", o.n)
	}
	var seg segment
	parseSYNOptions([]byte{2, 4, 1, 0, 1, 3, 3, 7, 4, 9, 0}, &seg)
	if seg.mss != 256 || !seg.windowScale || seg.sackPermitted {
		t.Errorf("parsed %+v", seg)
	}
}
