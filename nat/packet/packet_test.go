package packet

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// Addresses from the documentation ranges (RFC 5737, RFC 3849).
var (
	v4Src = netip.MustParseAddr("192.0.2.1")
	v4Dst = netip.MustParseAddr("198.51.100.7")
	v6Src = netip.MustParseAddr("2001:db8::1")
	v6Dst = netip.MustParseAddr("2001:db8::2")
)

// referenceChecksum is the Internet checksum written out as RFC 1071
// describes it, independently of the package's: add the concatenated data
// as 16-bit big-endian words in 32 bits, padding an odd last byte with
// zero, fold the carries back in, complement. Data that already holds a
// correct checksum gives 0.
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

// pseudoHeader is the header UDP's checksum covers besides the datagram:
// RFC 768 for IPv4, RFC 8200 §8.1 for IPv6.
func pseudoHeader(src, dst netip.Addr, proto uint8, length int) []byte {
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		p := append(s[:], d[:]...)
		return append(p, 0, proto, byte(length>>8), byte(length))
	}
	s, d := src.As16(), dst.As16()
	p := append(s[:], d[:]...)
	return append(p, byte(length>>24), byte(length>>16), byte(length>>8), byte(length), 0, 0, 0, proto)
}

// udpDatagram builds a UDP header and payload with the checksum that
// referenceChecksum gives for the pseudo-header of src and dst.
func udpDatagram(src, dst netip.AddrPort, payload []byte) []byte {
	u := make([]byte, UDPHeaderLen+len(payload))
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(len(u)))
	copy(u[UDPHeaderLen:], payload)
	binary.BigEndian.PutUint16(u[6:], referenceChecksum(pseudoHeader(src.Addr(), dst.Addr(), ProtoUDP, len(u)), u))
	return u
}

// ipv4Packet builds an IPv4 packet by hand: options (a multiple of 4
// bytes) after the fixed header, an arbitrary ID, the don't-fragment flag
// and a header checksum from referenceChecksum.
func ipv4Packet(src, dst netip.Addr, proto uint8, options, transport []byte) []byte {
	headerLen := IPv4HeaderLen + len(options)
	p := make([]byte, headerLen+len(transport))
	p[0] = 0x40 | byte(headerLen/4)
	p[1] = 0xb8 // DSCP EF: a field Parse ignores
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	binary.BigEndian.PutUint16(p[4:], 0x1234)
	binary.BigEndian.PutUint16(p[6:], 0x4000)
	p[8] = 17
	p[9] = proto
	s, d := src.As4(), dst.As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	copy(p[IPv4HeaderLen:], options)
	copy(p[headerLen:], transport)
	fixIPv4Checksum(p)
	return p
}

// fixIPv4Checksum recomputes the header checksum of an IPv4 packet after
// a test changed its header.
func fixIPv4Checksum(p []byte) {
	headerLen := int(p[0]&0x0f) * 4
	binary.BigEndian.PutUint16(p[10:], 0)
	binary.BigEndian.PutUint16(p[10:], referenceChecksum(p[:headerLen]))
}

// extHeader is one IPv6 extension header: its type and the bytes after
// its next-header and length fields (a multiple of 8, minus 2).
type extHeader struct {
	kind uint8
	body []byte
}

// padN is the body of an options header of n*8 bytes holding one PadN
// option.
func padN(n int) []byte {
	b := make([]byte, n*8-2)
	b[0], b[1] = 1, byte(len(b)-2)
	return b
}

// ipv6Packet builds an IPv6 packet by hand with the given extension
// headers in front of the transport bytes.
func ipv6Packet(src, dst netip.Addr, proto uint8, exts []extHeader, transport []byte) []byte {
	p := make([]byte, IPv6HeaderLen)
	p[0], p[1], p[2], p[3] = 0x6b, 0x81, 0x23, 0x45 // traffic class and flow label Parse ignores
	p[7] = 3
	s, d := src.As16(), dst.As16()
	copy(p[8:], s[:])
	copy(p[24:], d[:])
	next := 6 // where the next header field to fill in is
	for _, e := range exts {
		p[next] = e.kind
		next = len(p)
		p = append(p, 0, byte((len(e.body)+2)/8-1))
		p = append(p, e.body...)
	}
	p[next] = proto
	p = append(p, transport...)
	binary.BigEndian.PutUint16(p[4:], uint16(len(p)-IPv6HeaderLen))
	return p
}

// checkUDPChecksum fails t unless the UDP datagram in pkt verifies with
// referenceChecksum.
func checkUDPChecksum(t *testing.T, pkt []byte, info *Info) {
	t.Helper()
	udp := pkt[info.PayloadOffset-UDPHeaderLen : info.PayloadOffset+info.PayloadLen]
	if binary.BigEndian.Uint16(udp[6:]) == 0 {
		t.Fatal("UDP checksum not filled in")
	}
	if got := referenceChecksum(pseudoHeader(info.Src, info.Dst, ProtoUDP, len(udp)), udp); got != 0 {
		t.Fatalf("UDP checksum does not verify: reference sum gives %#04x", got)
	}
}

// checkIPv4Checksum fails t unless pkt starts with an IPv4 header whose
// checksum verifies with referenceChecksum.
func checkIPv4Checksum(t *testing.T, pkt []byte) {
	t.Helper()
	if got := referenceChecksum(pkt[:int(pkt[0]&0x0f)*4]); got != 0 {
		t.Fatalf("IPv4 header checksum does not verify: reference sum gives %#04x", got)
	}
}

// TestKnownAnswerIPv4UDP builds 192.0.2.1:4500 → 198.51.100.7:4500
// carrying "ping" and compares it with these bytes, worked out by hand:
//
//	IPv4 header
//	  45 00 00 20   version 4, IHL 5, TOS 0, total length 32 (20 + 8 + 4)
//	  00 00 40 00   ID 0, DF, fragment offset 0
//	  40 11 4e 91   TTL 64, protocol 17, header checksum
//	  c0 00 02 01   192.0.2.1
//	  c6 33 64 07   198.51.100.7
//	UDP header
//	  11 94 11 94   ports 4500, 4500
//	  00 0c 11 a1   length 12, checksum
//	70 69 6e 67     "ping"
//
// Header checksum: 4500+0020+0000+4000+4011+c000+0201+c633+6407 = 2b16c;
// folded b16c+2 = b16e; complemented 4e91.
// UDP checksum: pseudo-header c000+0201+c633+6407+0011+000c = 1ec58, UDP
// header 1194+1194+000c = 2334, payload 7069+6e67 = ded0; total 2ee5c;
// folded ee5c+2 = ee5e; complemented 11a1.
func TestKnownAnswerIPv4UDP(t *testing.T) {
	want := []byte{
		0x45, 0x00, 0x00, 0x20,
		0x00, 0x00, 0x40, 0x00,
		0x40, 0x11, 0x4e, 0x91,
		0xc0, 0x00, 0x02, 0x01,
		0xc6, 0x33, 0x64, 0x07,
		0x11, 0x94, 0x11, 0x94,
		0x00, 0x0c, 0x11, 0xa1,
		'p', 'i', 'n', 'g',
	}
	buf := append(make([]byte, MaxHeader), "ping"...)
	start, err := PutUDP(buf, MaxHeader, netip.AddrPortFrom(v4Src, 4500), netip.AddrPortFrom(v4Dst, 4500))
	if err != nil {
		t.Fatal(err)
	}
	if start != MaxHeader-IPv4HeaderLen-UDPHeaderLen {
		t.Errorf("start = %d, want %d", start, MaxHeader-IPv4HeaderLen-UDPHeaderLen)
	}
	if !bytes.Equal(buf[start:], want) {
		t.Fatalf("PutUDP built\n% x\nwant\n% x", buf[start:], want)
	}
	var info Info
	if err := Parse(want, &info); err != nil {
		t.Fatal(err)
	}
	wantInfo := Info{Version: 4, Src: v4Src, Dst: v4Dst, Proto: ProtoUDP, SrcPort: 4500, DstPort: 4500, PayloadOffset: 28, PayloadLen: 4}
	if info != wantInfo {
		t.Fatalf("Parse = %+v, want %+v", info, wantInfo)
	}
	checkIPv4Checksum(t, want)
	checkUDPChecksum(t, want, &info)
}

// TestKnownAnswerIPv6UDP builds [2001:db8::1]:500 → [2001:db8::2]:500
// carrying "ping" and compares it with these bytes, worked out by hand:
//
//	60 00 00 00                    version 6, traffic class 0, flow label 0
//	00 0c 11 40                    payload length 12, next header 17, hop limit 64
//	20 01 0d b8 00 .. 00 01        2001:db8::1
//	20 01 0d b8 00 .. 00 02        2001:db8::2
//	01 f4 01 f4 00 0c c1 a8        ports 500, 500, length 12, checksum
//	70 69 6e 67                    "ping"
//
// UDP checksum: pseudo-header 2001+0db8+0001 + 2001+0db8+0002 + 000c + 0011
// = 5b92, UDP header 01f4+01f4+000c = 03f4, payload ded0; total 13e56;
// folded 3e56+1 = 3e57; complemented c1a8.
func TestKnownAnswerIPv6UDP(t *testing.T) {
	want := []byte{
		0x60, 0x00, 0x00, 0x00,
		0x00, 0x0c, 0x11, 0x40,
		0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
		0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
		0x01, 0xf4, 0x01, 0xf4, 0x00, 0x0c, 0xc1, 0xa8,
		'p', 'i', 'n', 'g',
	}
	buf := append(make([]byte, MaxHeader), "ping"...)
	start, err := PutUDP(buf, MaxHeader, netip.AddrPortFrom(v6Src, 500), netip.AddrPortFrom(v6Dst, 500))
	if err != nil {
		t.Fatal(err)
	}
	if start != 0 {
		t.Errorf("start = %d, want 0", start)
	}
	if !bytes.Equal(buf[start:], want) {
		t.Fatalf("PutUDP built\n% x\nwant\n% x", buf[start:], want)
	}
	var info Info
	if err := Parse(want, &info); err != nil {
		t.Fatal(err)
	}
	wantInfo := Info{Version: 6, Src: v6Src, Dst: v6Dst, Proto: ProtoUDP, SrcPort: 500, DstPort: 500, PayloadOffset: 48, PayloadLen: 4}
	if info != wantInfo {
		t.Fatalf("Parse = %+v, want %+v", info, wantInfo)
	}
	checkUDPChecksum(t, want, &info)
}

// filler returns n bytes of a pattern that differs from one test to the
// next.
func filler(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 0x1ce))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestPutUDPRoundTrip(t *testing.T) {
	mapped := func(a netip.Addr) netip.Addr { return netip.AddrFrom16(a.As16()) }
	families := []struct {
		name     string
		src, dst netip.Addr
		version  int
		maxLen   int
	}{
		{"IPv4", v4Src, v4Dst, 4, 0xffff - IPv4HeaderLen - UDPHeaderLen},
		{"IPv4-mapped", mapped(v4Src), mapped(v4Dst), 4, 0xffff - IPv4HeaderLen - UDPHeaderLen},
		{"IPv4 to mapped", v4Src, mapped(v4Dst), 4, 0xffff - IPv4HeaderLen - UDPHeaderLen},
		{"IPv6", v6Src, v6Dst, 6, 0xffff - UDPHeaderLen},
		{"IPv6 link-local with zone", netip.MustParseAddr("fe80::1%tun0"), netip.MustParseAddr("fe80::2"), 6, 0xffff - UDPHeaderLen},
	}
	for _, fam := range families {
		for _, size := range []int{0, 1, 2, 3, 1400, 1401, 65000, fam.maxLen} {
			for _, room := range []int{MaxHeader, MaxHeader + 1, MaxHeader + 7} {
				payload := filler(size, uint64(size*room))
				buf := make([]byte, room+size)
				for i := range room {
					buf[i] = 0xa5
				}
				copy(buf[room:], payload)
				src := netip.AddrPortFrom(fam.src, 500)
				dst := netip.AddrPortFrom(fam.dst, uint16(4500+size))
				start, err := PutUDP(buf, room, src, dst)
				if err != nil {
					t.Fatalf("%s, %d bytes, room %d: %v", fam.name, size, room, err)
				}
				headerLen := IPv4HeaderLen + UDPHeaderLen
				if fam.version == 6 {
					headerLen = IPv6HeaderLen + UDPHeaderLen
				}
				if start != room-headerLen {
					t.Fatalf("%s, %d bytes: start = %d, want %d", fam.name, size, start, room-headerLen)
				}
				for i := range start {
					if buf[i] != 0xa5 {
						t.Fatalf("%s, %d bytes: byte %d in front of the packet overwritten", fam.name, size, i)
					}
				}
				if !bytes.Equal(buf[room:], payload) {
					t.Fatalf("%s, %d bytes: payload changed", fam.name, size)
				}
				pkt := buf[start:]
				var info Info
				if err := Parse(pkt, &info); err != nil {
					t.Fatalf("%s, %d bytes: Parse: %v", fam.name, size, err)
				}
				want := Info{
					Version: fam.version, Src: fam.src.Unmap().WithZone(""), Dst: fam.dst.Unmap(), Proto: ProtoUDP,
					SrcPort: src.Port(), DstPort: dst.Port(), PayloadOffset: headerLen, PayloadLen: size,
				}
				if info != want {
					t.Fatalf("%s, %d bytes: Parse = %+v, want %+v", fam.name, size, info, want)
				}
				if !bytes.Equal(info.Payload(pkt), payload) {
					t.Fatalf("%s, %d bytes: Payload is not the payload", fam.name, size)
				}
				if info.Source() != netip.AddrPortFrom(want.Src, src.Port()) || info.Destination() != netip.AddrPortFrom(want.Dst, dst.Port()) {
					t.Fatalf("%s, %d bytes: Source %v, Destination %v", fam.name, size, info.Source(), info.Destination())
				}
				if fam.version == 4 {
					checkIPv4Checksum(t, pkt)
					if pkt[8] != 64 || binary.BigEndian.Uint16(pkt[6:]) != 0x4000 {
						t.Fatalf("%s: TTL %d, flags and offset %#04x; want 64, DF only", fam.name, pkt[8], binary.BigEndian.Uint16(pkt[6:]))
					}
				} else if pkt[7] != 64 {
					t.Fatalf("%s: hop limit %d, want 64", fam.name, pkt[7])
				}
				checkUDPChecksum(t, pkt, &info)
			}
		}
	}
}

// TestPutUDPZeroChecksumSentAsOnes picks a payload for which the UDP
// checksum computes to 0 and checks that 0xffff goes out instead, since 0
// means "no checksum".
func TestPutUDPZeroChecksumSentAsOnes(t *testing.T) {
	for _, addrs := range [][2]netip.Addr{{v4Src, v4Dst}, {v6Src, v6Dst}} {
		src, dst := netip.AddrPortFrom(addrs[0], 500), netip.AddrPortFrom(addrs[1], 500)
		buf := make([]byte, MaxHeader+2)
		start, err := PutUDP(buf, MaxHeader, src, dst)
		if err != nil {
			t.Fatal(err)
		}
		// A payload word equal to the checksum of the zero payload makes
		// the sum of everything else 0xffff, whose complement is 0.
		check := binary.BigEndian.Uint16(buf[MaxHeader-2:])
		binary.BigEndian.PutUint16(buf[MaxHeader:], check)
		if _, err := PutUDP(buf, MaxHeader, src, dst); err != nil {
			t.Fatal(err)
		}
		if got := binary.BigEndian.Uint16(buf[MaxHeader-2:]); got != 0xffff {
			t.Fatalf("%v: checksum %#04x, want 0xffff", addrs[0], got)
		}
		var info Info
		if err := Parse(buf[start:], &info); err != nil {
			t.Fatal(err)
		}
		checkUDPChecksum(t, buf[start:], &info)
	}
}

func TestPutESPRoundTrip(t *testing.T) {
	for _, addrs := range [][2]netip.Addr{{v4Src, v4Dst}, {v6Src, v6Dst}, {netip.AddrFrom16(v4Src.As16()), v4Dst}} {
		is4 := addrs[0].Unmap().Is4()
		headerLen, maxLen := IPv6HeaderLen, 0xffff
		if is4 {
			headerLen, maxLen = IPv4HeaderLen, 0xffff-IPv4HeaderLen
		}
		for _, size := range []int{ESPHeaderLen, ESPHeaderLen + 1, 1400, 65000, maxLen} {
			esp := filler(size, uint64(size))
			buf := append(make([]byte, MaxHeader), esp...)
			start, err := PutESP(buf, MaxHeader, addrs[0], addrs[1])
			if err != nil {
				t.Fatalf("%v, %d bytes: %v", addrs[0], size, err)
			}
			if start != MaxHeader-headerLen {
				t.Fatalf("%v, %d bytes: start = %d, want %d", addrs[0], size, start, MaxHeader-headerLen)
			}
			pkt := buf[start:]
			var info Info
			if err := Parse(pkt, &info); err != nil {
				t.Fatalf("%v, %d bytes: Parse: %v", addrs[0], size, err)
			}
			want := Info{Version: 6, Src: addrs[0], Dst: addrs[1], Proto: ProtoESP, PayloadOffset: headerLen, PayloadLen: size}
			if is4 {
				want.Version, want.Src, want.Dst = 4, addrs[0].Unmap(), addrs[1].Unmap()
				checkIPv4Checksum(t, pkt)
			}
			if info != want {
				t.Fatalf("%v, %d bytes: Parse = %+v, want %+v", addrs[0], size, info, want)
			}
			if !bytes.Equal(info.Payload(pkt), esp) {
				t.Fatalf("%v, %d bytes: ESP bytes changed", addrs[0], size)
			}
		}
	}
}

// TestParse parses packets built by hand, with the header variants Parse
// must see through.
func TestParse(t *testing.T) {
	src4, dst4 := netip.AddrPortFrom(v4Src, 4500), netip.AddrPortFrom(v4Dst, 4501)
	src6, dst6 := netip.AddrPortFrom(v6Src, 500), netip.AddrPortFrom(v6Dst, 501)
	ike := filler(300, 1)
	esp := filler(120, 2)
	udp4 := udpDatagram(src4, dst4, ike)
	udp6 := udpDatagram(src6, dst6, ike)
	routing := append([]byte{0, 0}, make([]byte, 20)...) // type 0, segments left 0: 24 bytes
	udp4Info := Info{Version: 4, Src: v4Src, Dst: v4Dst, Proto: ProtoUDP, SrcPort: 4500, DstPort: 4501, PayloadOffset: 28, PayloadLen: len(ike)}
	udp6Info := Info{Version: 6, Src: v6Src, Dst: v6Dst, Proto: ProtoUDP, SrcPort: 500, DstPort: 501, PayloadOffset: 48, PayloadLen: len(ike)}
	esp4Info := Info{Version: 4, Src: v4Src, Dst: v4Dst, Proto: ProtoESP, PayloadOffset: 20, PayloadLen: len(esp)}
	esp6Info := Info{Version: 6, Src: v6Src, Dst: v6Dst, Proto: ProtoESP, PayloadOffset: 40, PayloadLen: len(esp)}
	empty4Info := udp4Info
	empty4Info.PayloadLen = 0
	with := func(info Info, offsetDelta int) Info { info.PayloadOffset += offsetDelta; return info }
	nopOptions := func(n int) []byte { // n bytes of NOPs ending in End of Options
		b := bytes.Repeat([]byte{1}, n)
		b[n-1] = 0
		return b
	}
	eightDestOptions := make([]extHeader, maxExtensionHeaders)
	for i := range eightDestOptions {
		eightDestOptions[i] = extHeader{ipv6DestOptions, padN(1)}
	}
	tests := []struct {
		name string
		pkt  []byte
		want Info
	}{
		{"IPv4 UDP", ipv4Packet(v4Src, v4Dst, ProtoUDP, nil, udp4), udp4Info},
		{"IPv4 UDP, 4 bytes of options", ipv4Packet(v4Src, v4Dst, ProtoUDP, nopOptions(4), udp4), with(udp4Info, 4)},
		{"IPv4 UDP, 40 bytes of options", ipv4Packet(v4Src, v4Dst, ProtoUDP, nopOptions(40), udp4), with(udp4Info, 40)},
		{"IPv4 UDP, trailing bytes", append(ipv4Packet(v4Src, v4Dst, ProtoUDP, nil, udp4), 1, 2, 3), udp4Info},
		{"IPv4 UDP, empty payload", ipv4Packet(v4Src, v4Dst, ProtoUDP, nil, udpDatagram(src4, dst4, nil)), empty4Info},
		{"IPv4 ESP", ipv4Packet(v4Src, v4Dst, ProtoESP, nil, esp), esp4Info},
		{"IPv4 ESP, options", ipv4Packet(v4Src, v4Dst, ProtoESP, nopOptions(8), esp), with(esp4Info, 8)},
		{"IPv4 ESP, header only", ipv4Packet(v4Src, v4Dst, ProtoESP, nil, esp[:ESPHeaderLen]), Info{Version: 4, Src: v4Src, Dst: v4Dst, Proto: ProtoESP, PayloadOffset: 20, PayloadLen: ESPHeaderLen}},
		{"IPv6 UDP", ipv6Packet(v6Src, v6Dst, ProtoUDP, nil, udp6), udp6Info},
		{"IPv6 UDP, trailing bytes", append(ipv6Packet(v6Src, v6Dst, ProtoUDP, nil, udp6), 0, 0), udp6Info},
		{"IPv6 UDP, hop-by-hop", ipv6Packet(v6Src, v6Dst, ProtoUDP, []extHeader{{ipv6HopByHop, padN(1)}}, udp6), with(udp6Info, 8)},
		{"IPv6 UDP, hop-by-hop, routing, destination options", ipv6Packet(v6Src, v6Dst, ProtoUDP, []extHeader{{ipv6HopByHop, padN(2)}, {ipv6Routing, routing}, {ipv6DestOptions, padN(3)}}, udp6), with(udp6Info, 16+24+24)},
		{"IPv6 UDP, eight extension headers", ipv6Packet(v6Src, v6Dst, ProtoUDP, eightDestOptions, udp6), with(udp6Info, 8*8)},
		{"IPv6 ESP", ipv6Packet(v6Src, v6Dst, ProtoESP, nil, esp), esp6Info},
		{"IPv6 ESP, destination options", ipv6Packet(v6Src, v6Dst, ProtoESP, []extHeader{{ipv6DestOptions, padN(1)}}, esp), with(esp6Info, 8)},
		{"IPv6 with IPv4-mapped addresses", ipv6Packet(netip.AddrFrom16(v4Src.As16()), netip.AddrFrom16(v4Dst.As16()), ProtoESP, nil, esp), Info{Version: 6, Src: netip.AddrFrom16(v4Src.As16()), Dst: netip.AddrFrom16(v4Dst.As16()), Proto: ProtoESP, PayloadOffset: 40, PayloadLen: len(esp)}},
	}
	for _, tt := range tests {
		before := bytes.Clone(tt.pkt)
		var info Info
		if err := Parse(tt.pkt, &info); err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if info != tt.want {
			t.Errorf("%s: Parse = %+v, want %+v", tt.name, info, tt.want)
			continue
		}
		if !bytes.Equal(tt.pkt, before) {
			t.Errorf("%s: Parse changed the packet", tt.name)
		}
		want := ike
		if info.Proto == ProtoESP {
			want = esp[:info.PayloadLen]
		}
		if info.PayloadLen == 0 {
			want = nil
		}
		if !bytes.Equal(info.Payload(tt.pkt), want) {
			t.Errorf("%s: wrong payload bytes", tt.name)
		}
	}
}

func TestParseErrors(t *testing.T) {
	src4, dst4 := netip.AddrPortFrom(v4Src, 4500), netip.AddrPortFrom(v4Dst, 4500)
	src6, dst6 := netip.AddrPortFrom(v6Src, 500), netip.AddrPortFrom(v6Dst, 500)
	udp4 := ipv4Packet(v4Src, v4Dst, ProtoUDP, nil, udpDatagram(src4, dst4, filler(100, 3)))
	udp6 := ipv6Packet(v6Src, v6Dst, ProtoUDP, nil, udpDatagram(src6, dst6, filler(100, 4)))
	// edit4 returns a copy of udp4 changed by edit, with the header
	// checksum fixed afterwards.
	edit4 := func(edit func(p []byte) []byte) []byte {
		p := edit(bytes.Clone(udp4))
		fixIPv4Checksum(p)
		return p
	}
	edit6 := func(edit func(p []byte) []byte) []byte { return edit(bytes.Clone(udp6)) }
	set16 := func(at int, v uint16) func(p []byte) []byte {
		return func(p []byte) []byte { binary.BigEndian.PutUint16(p[at:], v); return p }
	}
	nineDestOptions := make([]extHeader, maxExtensionHeaders+1)
	for i := range nineDestOptions {
		nineDestOptions[i] = extHeader{ipv6DestOptions, padN(1)}
	}
	fragment := extHeader{ipv6Fragment, make([]byte, 6)}
	tests := []struct {
		name string
		pkt  []byte
		want error
	}{
		{"empty", nil, ErrTooShort},
		{"IPv4, 19 bytes", udp4[:19], ErrTooShort},
		{"IPv4, header length 16", edit4(func(p []byte) []byte { p[0] = 0x44; return p }), ErrTooShort},
		{"IPv4, header length 0", edit4(func(p []byte) []byte { p[0] = 0x40; return p }), ErrTooShort},
		{"IPv4, total length below header length", edit4(set16(2, 19)), ErrTooShort},
		{"IPv4, total length below options", edit4(func(p []byte) []byte { p[0] = 0x4f; binary.BigEndian.PutUint16(p[2:], 40); return p }), ErrTooShort},
		{"IPv4, total length past the bytes read", edit4(set16(2, uint16(len(udp4)+1))), ErrTruncated},
		{"IPv4, packet cut short", udp4[:len(udp4)-1], ErrTruncated},
		{"IPv4, header cut inside the options", edit4(func(p []byte) []byte { p[0] = 0x46; return p })[:22], ErrTruncated},
		{"IPv4, header checksum off by one", func() []byte { p := bytes.Clone(udp4); p[11]++; return p }(), ErrChecksum},
		{"IPv4, header checksum zero", func() []byte { p := bytes.Clone(udp4); p[10], p[11] = 0, 0; return p }(), ErrChecksum},
		{"IPv4, source changed after checksumming", func() []byte { p := bytes.Clone(udp4); p[15]++; return p }(), ErrChecksum},
		{"IPv4, more fragments", edit4(set16(6, 0x2000)), ErrFragment},
		{"IPv4, last fragment", edit4(set16(6, 0x00b9)), ErrFragment},
		{"IPv4, fragment offset with DF", edit4(set16(6, 0x4001)), ErrFragment},
		{"IPv4, TCP", edit4(func(p []byte) []byte { p[9] = 6; return p }), ErrProtocol},
		{"IPv4, ICMP", edit4(func(p []byte) []byte { p[9] = 1; return p }), ErrProtocol},
		{"IPv4, UDP payload shorter than a UDP header", ipv4Packet(v4Src, v4Dst, ProtoUDP, nil, make([]byte, 7)), ErrTooShort},
		{"IPv4, ESP shorter than its header", ipv4Packet(v4Src, v4Dst, ProtoESP, nil, make([]byte, 7)), ErrTooShort},
		{"IPv4, UDP length over the IP payload", edit4(set16(24, uint16(len(udp4)-20+1))), ErrLength},
		{"IPv4, UDP length under the IP payload", edit4(set16(24, uint16(len(udp4)-20-1))), ErrLength},
		{"IPv4, UDP length 0", edit4(set16(24, 0)), ErrLength},
		{"IPv4, UDP length counts trailing bytes beyond the total length", append(edit4(set16(24, uint16(len(udp4)-20+2))), 0, 0), ErrLength},
		{"version 0", []byte{0x05, 0, 0, 20}, ErrVersion},
		{"version 5", edit4(func(p []byte) []byte { p[0] = 0x55; return p }), ErrVersion},
		{"version 15", []byte{0xf0}, ErrVersion},
		{"IPv6, 39 bytes", udp6[:39], ErrTooShort},
		{"IPv6, payload length past the bytes read", edit6(set16(4, uint16(len(udp6)-40+1))), ErrTruncated},
		{"IPv6, packet cut short", udp6[:len(udp6)-1], ErrTruncated},
		{"IPv6, fragment header", ipv6Packet(v6Src, v6Dst, ProtoUDP, []extHeader{fragment}, udpDatagram(src6, dst6, nil)), ErrFragment},
		{"IPv6, fragment header after hop-by-hop", ipv6Packet(v6Src, v6Dst, ProtoESP, []extHeader{{ipv6HopByHop, padN(1)}, fragment}, make([]byte, 8)), ErrFragment},
		{"IPv6, ICMPv6", ipv6Packet(v6Src, v6Dst, 58, nil, make([]byte, 8)), ErrProtocol},
		{"IPv6, no next header", ipv6Packet(v6Src, v6Dst, 59, nil, nil), ErrProtocol},
		{"IPv6, AH", ipv6Packet(v6Src, v6Dst, 51, nil, make([]byte, 24)), ErrProtocol},
		{"IPv6, nine extension headers", ipv6Packet(v6Src, v6Dst, ProtoUDP, nineDestOptions, udpDatagram(src6, dst6, nil)), ErrProtocol},
		{"IPv6, extension header cut before its length", ipv6Packet(v6Src, v6Dst, ipv6DestOptions, nil, []byte{ProtoUDP}), ErrTooShort},
		{"IPv6, extension header longer than the packet", ipv6Packet(v6Src, v6Dst, ipv6HopByHop, nil, []byte{ProtoUDP, 1, 1, 4, 0, 0, 0, 0}), ErrTooShort},
		{"IPv6, jumbogram", ipv6Packet(v6Src, v6Dst, ipv6HopByHop, nil, nil), ErrTooShort},
		{"IPv6, UDP payload shorter than a UDP header", ipv6Packet(v6Src, v6Dst, ProtoUDP, nil, make([]byte, 7)), ErrTooShort},
		{"IPv6, ESP shorter than its header", ipv6Packet(v6Src, v6Dst, ProtoESP, []extHeader{{ipv6DestOptions, padN(1)}}, make([]byte, 4)), ErrTooShort},
		{"IPv6, UDP length over the IP payload", edit6(set16(44, uint16(len(udp6)-40+1))), ErrLength},
		{"IPv6, UDP length under the IP payload", edit6(set16(44, 8)), ErrLength},
	}
	allErrors := []error{ErrTooShort, ErrTruncated, ErrVersion, ErrFragment, ErrProtocol, ErrLength, ErrChecksum}
	for _, tt := range tests {
		info := Info{Version: -1}
		err := Parse(tt.pkt, &info)
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: err = %v, want %v", tt.name, err, tt.want)
			continue
		}
		for _, other := range allErrors {
			if other != tt.want && errors.Is(err, other) {
				t.Errorf("%s: %v also matches %v", tt.name, err, other)
			}
		}
		if err.Error() == "" {
			t.Errorf("%s: empty error text", tt.name)
		}
		if info != (Info{Version: -1}) {
			t.Errorf("%s: Parse wrote info on failure: %+v", tt.name, info)
		}
	}

	var protoErr ProtocolError
	if err := Parse(ipv6Packet(v6Src, v6Dst, 58, nil, nil), new(Info)); !errors.As(err, &protoErr) || protoErr != 58 {
		t.Errorf("ICMPv6: err = %v, want ProtocolError(58)", err)
	} else if got, want := err.Error(), "IP protocol 58: neither UDP nor ESP"; got != want {
		t.Errorf("ProtocolError text %q, want %q", got, want)
	}
	var versionErr VersionError
	if err := Parse([]byte{0x55}, new(Info)); !errors.As(err, &versionErr) || versionErr != 5 {
		t.Errorf("version 5: err = %v, want VersionError(5)", err)
	}
}

func TestPutErrors(t *testing.T) {
	ap := netip.AddrPortFrom
	tests := []struct {
		name       string
		bufLen     int
		payloadOff int
		src, dst   netip.Addr
		esp        bool
		want       error
	}{
		{"UDP, zero source address", 100, MaxHeader, netip.Addr{}, v4Dst, false, ErrAddress},
		{"ESP, zero destination address", 100, MaxHeader, v6Src, netip.Addr{}, true, ErrAddress},
		{"UDP, IPv4 to IPv6", 100, MaxHeader, v4Src, v6Dst, false, ErrFamily},
		{"ESP, IPv6 to IPv4", 100, MaxHeader, v6Src, v4Dst, true, ErrFamily},
		{"UDP, negative offset", 100, -1, v4Src, v4Dst, false, ErrOffset},
		{"ESP, offset past the buffer", 100, 101, v4Src, v4Dst, true, ErrOffset},
		{"UDP, IPv4 with 27 bytes of room", 100, 27, v4Src, v4Dst, false, ErrNoRoom},
		{"UDP, IPv6 with 47 bytes of room", 100, 47, v6Src, v6Dst, false, ErrNoRoom},
		{"ESP, IPv4 with 19 bytes of room", 100, 19, v4Src, v4Dst, true, ErrNoRoom},
		{"ESP, IPv6 with 39 bytes of room", 100, 39, v6Src, v6Dst, true, ErrNoRoom},
		{"UDP, IPv4, 65508-byte payload", MaxHeader + 65508, MaxHeader, v4Src, v4Dst, false, ErrTooLarge},
		{"UDP, IPv6, 65528-byte payload", MaxHeader + 65528, MaxHeader, v6Src, v6Dst, false, ErrTooLarge},
		{"ESP, IPv4, 65516-byte payload", MaxHeader + 65516, MaxHeader, v4Src, v4Dst, true, ErrTooLarge},
		{"ESP, IPv6, 65536-byte payload", MaxHeader + 65536, MaxHeader, v6Src, v6Dst, true, ErrTooLarge},
	}
	for _, tt := range tests {
		buf := make([]byte, tt.bufLen)
		var start int
		var err error
		if tt.esp {
			start, err = PutESP(buf, tt.payloadOff, tt.src, tt.dst)
		} else {
			start, err = PutUDP(buf, tt.payloadOff, ap(tt.src, 500), ap(tt.dst, 500))
		}
		if !errors.Is(err, tt.want) || start != 0 {
			t.Errorf("%s: start %d, err %v; want 0, %v", tt.name, start, err, tt.want)
		}
		if !bytes.Equal(buf, make([]byte, tt.bufLen)) {
			t.Errorf("%s: buffer written on failure", tt.name)
		}
	}
}

// TestChecksumMatchesReference compares the package's checksum with
// referenceChecksum over data of every length up to 300 bytes, split into
// pieces at even offsets as PutUDP splits its sum, and over the all-ones
// data that maximises carries.
func TestChecksumMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	for n := range 300 {
		data := filler(n, uint64(n))
		if n%3 == 0 {
			for i := range data {
				data[i] = 0xff
			}
		}
		want := referenceChecksum(data)
		if got := ^ChecksumFold(ChecksumAdd(0, data)); got != want {
			t.Fatalf("%d bytes: checksum %#04x, reference %#04x", n, got, want)
		}
		split := r.IntN(n/2+1) * 2
		if got := ^ChecksumFold(ChecksumAdd(ChecksumAdd(0, data[:split]), data[split:])); got != want {
			t.Fatalf("%d bytes split at %d: checksum %#04x, reference %#04x", n, split, got, want)
		}
	}
	sum := ChecksumAddWord(^uint64(0), 1) // 2^64 wraps to 1 in one's complement
	if sum != 1 {
		t.Fatalf("end-around carry lost: %#x", sum)
	}
}

// TestDoesNotAllocate checks the hot paths, and Parse's rejections of
// packets that are merely not for transparent mode, for allocations.
func TestDoesNotAllocate(t *testing.T) {
	payload := filler(1400, 9)
	var info Info
	buf4 := append(make([]byte, MaxHeader), payload...)
	buf6 := bytes.Clone(buf4)
	src4, dst4 := netip.AddrPortFrom(v4Src, 4500), netip.AddrPortFrom(v4Dst, 4500)
	src6, dst6 := netip.AddrPortFrom(v6Src, 4500), netip.AddrPortFrom(v6Dst, 4500)
	start4, _ := PutUDP(buf4, MaxHeader, src4, dst4)
	start6, _ := PutUDP(buf6, MaxHeader, src6, dst6)
	esp := ipv6Packet(v6Src, v6Dst, ProtoESP, []extHeader{{ipv6HopByHop, padN(1)}}, payload)
	tcp := ipv4Packet(v4Src, v4Dst, 6, nil, payload)
	fragment := ipv6Packet(v6Src, v6Dst, ProtoUDP, []extHeader{{ipv6Fragment, make([]byte, 6)}}, payload)
	checks := []struct {
		name string
		run  func()
	}{
		{"Parse IPv4 UDP", func() { _ = Parse(buf4[start4:], &info) }},
		{"Parse IPv6 UDP", func() { _ = Parse(buf6[start6:], &info) }},
		{"Parse IPv6 ESP", func() { _ = Parse(esp, &info) }},
		{"Parse rejecting TCP", func() { _ = Parse(tcp, &info) }},
		{"Parse rejecting a fragment", func() { _ = Parse(fragment, &info) }},
		{"Parse rejecting IP version 7", func() { _ = Parse([]byte{0x70}, &info) }},
		{"PutUDP IPv4", func() { _, _ = PutUDP(buf4, MaxHeader, src4, dst4) }},
		{"PutUDP IPv6", func() { _, _ = PutUDP(buf6, MaxHeader, src6, dst6) }},
		{"PutESP IPv4", func() { _, _ = PutESP(buf4, MaxHeader, v4Src, v4Dst) }},
		{"PutESP IPv6", func() { _, _ = PutESP(buf6, MaxHeader, v6Src, v6Dst) }},
	}
	for _, pkt := range [][]byte{buf4[start4:], buf6[start6:], esp} {
		if err := Parse(pkt, &info); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range checks {
		if n := testing.AllocsPerRun(1000, c.run); n != 0 {
			t.Errorf("%s allocates %v times per call", c.name, n)
		}
	}
}
