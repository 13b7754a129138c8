package packet

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
)

// FuzzParse feeds arbitrary bytes to Parse. Invariants: it never panics
// and never changes the packet; when it accepts one, the fields agree with
// the bytes (version, addresses, protocol, ports), the payload lies inside
// the packet and, for UDP, is the UDP length minus the header; and PutUDP
// or PutESP, given those fields and that payload, builds a packet that
// parses to the same addresses (IPv4-mapped ones unmapped), ports and
// payload.
func FuzzParse(f *testing.F) {
	src4, dst4 := netip.AddrPortFrom(v4Src, 4500), netip.AddrPortFrom(v4Dst, 4500)
	src6, dst6 := netip.AddrPortFrom(v6Src, 500), netip.AddrPortFrom(v6Dst, 500)
	f.Add(ipv4Packet(v4Src, v4Dst, ProtoUDP, nil, udpDatagram(src4, dst4, []byte("ping"))))
	f.Add(ipv4Packet(v4Src, v4Dst, ProtoUDP, []byte{1, 1, 1, 0}, udpDatagram(src4, dst4, filler(40, 1))))
	f.Add(ipv4Packet(v4Src, v4Dst, ProtoESP, nil, filler(60, 2)))
	f.Add(append(ipv4Packet(v4Src, v4Dst, ProtoUDP, nil, udpDatagram(src4, dst4, nil)), 9, 9))
	f.Add(ipv6Packet(v6Src, v6Dst, ProtoUDP, nil, udpDatagram(src6, dst6, []byte("ping"))))
	f.Add(ipv6Packet(v6Src, v6Dst, ProtoUDP, []extHeader{{ipv6HopByHop, padN(1)}, {ipv6Routing, make([]byte, 14)}, {ipv6DestOptions, padN(2)}}, udpDatagram(src6, dst6, filler(30, 3))))
	f.Add(ipv6Packet(v6Src, v6Dst, ProtoESP, []extHeader{{ipv6DestOptions, padN(1)}}, filler(60, 4)))
	f.Add(ipv6Packet(v6Src, v6Dst, ProtoUDP, []extHeader{{ipv6Fragment, make([]byte, 6)}}, udpDatagram(src6, dst6, nil)))
	f.Add([]byte{0x45})
	f.Add([]byte{0x60})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		before := bytes.Clone(pkt)
		var info Info
		err := Parse(pkt, &info)
		if !bytes.Equal(pkt, before) {
			t.Fatal("Parse changed the packet")
		}
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error text")
			}
			return
		}
		if info.PayloadOffset < 0 || info.PayloadLen < 0 || info.PayloadOffset+info.PayloadLen > len(pkt) {
			t.Fatalf("payload at %d, %d bytes, outside the %d-byte packet", info.PayloadOffset, info.PayloadLen, len(pkt))
		}
		if int(pkt[0]>>4) != info.Version {
			t.Fatalf("version %d from a packet of version %d", info.Version, pkt[0]>>4)
		}
		var src, dst netip.Addr
		minHeader := IPv4HeaderLen
		switch info.Version {
		case 4:
			src, dst = netip.AddrFrom4([4]byte(pkt[12:16])), netip.AddrFrom4([4]byte(pkt[16:20]))
			if info.Proto != pkt[9] {
				t.Fatalf("protocol %d, header says %d", info.Proto, pkt[9])
			}
			if referenceChecksum(pkt[:int(pkt[0]&0x0f)*4]) != 0 {
				t.Fatal("accepted a bad IPv4 header checksum")
			}
			if binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 {
				t.Fatal("accepted an IPv4 fragment")
			}
		case 6:
			src, dst = netip.AddrFrom16([16]byte(pkt[8:24])), netip.AddrFrom16([16]byte(pkt[24:40]))
			minHeader = IPv6HeaderLen
		default:
			t.Fatalf("version %d", info.Version)
		}
		if info.Src != src || info.Dst != dst {
			t.Fatalf("addresses %v → %v, header says %v → %v", info.Src, info.Dst, src, dst)
		}
		var rebuilt []byte
		var start int
		switch info.Proto {
		case ProtoUDP:
			if info.PayloadOffset < minHeader+UDPHeaderLen {
				t.Fatalf("UDP payload at %d, inside the headers", info.PayloadOffset)
			}
			udp := pkt[info.PayloadOffset-UDPHeaderLen:]
			if got := int(binary.BigEndian.Uint16(udp[4:])); info.PayloadLen != got-UDPHeaderLen {
				t.Fatalf("payload of %d bytes, UDP length %d", info.PayloadLen, got)
			}
			if info.SrcPort != binary.BigEndian.Uint16(udp[0:]) || info.DstPort != binary.BigEndian.Uint16(udp[2:]) {
				t.Fatalf("ports %d → %d, header says % x", info.SrcPort, info.DstPort, udp[:4])
			}
			rebuilt = append(make([]byte, MaxHeader), info.Payload(pkt)...)
			start, err = PutUDP(rebuilt, MaxHeader, info.Source(), info.Destination())
		case ProtoESP:
			if info.PayloadOffset < minHeader || info.PayloadLen < ESPHeaderLen || info.SrcPort != 0 || info.DstPort != 0 {
				t.Fatalf("ESP info %+v", info)
			}
			rebuilt = append(make([]byte, MaxHeader), info.Payload(pkt)...)
			start, err = PutESP(rebuilt, MaxHeader, info.Src, info.Dst)
		default:
			t.Fatalf("protocol %d", info.Proto)
		}
		// IPv4-mapped addresses in an IPv6 header (which Linux drops on
		// receipt) count as IPv4 when building.
		wantSrc, wantDst := info.Src.Unmap(), info.Dst.Unmap()
		if wantSrc.Is4() != wantDst.Is4() {
			if !errors.Is(err, ErrFamily) {
				t.Fatalf("rebuilding %+v: err = %v, want %v", info, err, ErrFamily)
			}
			return
		}
		if err != nil {
			t.Fatalf("rebuilding %+v: %v", info, err)
		}
		var again Info
		if err := Parse(rebuilt[start:], &again); err != nil {
			t.Fatalf("rebuilt packet does not parse: %v", err)
		}
		if again.Src != wantSrc || again.Dst != wantDst || again.Proto != info.Proto ||
			again.SrcPort != info.SrcPort || again.DstPort != info.DstPort || !bytes.Equal(again.Payload(rebuilt[start:]), info.Payload(pkt)) {
			t.Fatalf("rebuilt packet parses to %+v, the original to %+v", again, info)
		}
	})
}

// FuzzPutUDPRoundTrip builds datagrams with arbitrary addresses, ports,
// payloads and room in front. Invariants: PutUDP succeeds when the
// addresses are of one family, starts the packet right in front of the
// payload, touches nothing else, and Parse gives back the same fields; the
// checksums verify with the reference implementation.
func FuzzPutUDPRoundTrip(f *testing.F) {
	f.Add(v4Src.AsSlice(), v4Dst.AsSlice(), uint16(4500), uint16(4500), []byte("ping"), uint8(0))
	f.Add(v6Src.AsSlice(), v6Dst.AsSlice(), uint16(500), uint16(500), []byte{}, uint8(3))
	f.Add(netip.AddrFrom16(v4Src.As16()).AsSlice(), v4Dst.AsSlice(), uint16(0), uint16(65535), filler(1400, 5), uint8(1))
	f.Add(v4Src.AsSlice(), v6Dst.AsSlice(), uint16(1), uint16(2), []byte{0xff}, uint8(0))
	f.Fuzz(func(t *testing.T, srcBytes, dstBytes []byte, srcPort, dstPort uint16, payload []byte, extraRoom uint8) {
		srcAddr, ok1 := netip.AddrFromSlice(srcBytes)
		dstAddr, ok2 := netip.AddrFromSlice(dstBytes)
		if !ok1 || !ok2 {
			return
		}
		src, dst := netip.AddrPortFrom(srcAddr, srcPort), netip.AddrPortFrom(dstAddr, dstPort)
		room := MaxHeader + int(extraRoom)
		buf := make([]byte, room+len(payload))
		for i := range room {
			buf[i] = 0x5a
		}
		copy(buf[room:], payload)
		start, err := PutUDP(buf, room, src, dst)
		is4 := srcAddr.Unmap().Is4()
		if is4 != dstAddr.Unmap().Is4() {
			if err == nil {
				t.Fatalf("built a packet from %v to %v", src, dst)
			}
			return
		}
		if err != nil {
			t.Fatalf("%v → %v, %d bytes: %v", src, dst, len(payload), err)
		}
		want := Info{Version: 6, Src: srcAddr, Dst: dstAddr, Proto: ProtoUDP, SrcPort: srcPort, DstPort: dstPort, PayloadOffset: IPv6HeaderLen + UDPHeaderLen, PayloadLen: len(payload)}
		if is4 {
			want.Version, want.Src, want.Dst, want.PayloadOffset = 4, srcAddr.Unmap(), dstAddr.Unmap(), IPv4HeaderLen+UDPHeaderLen
		}
		if start != room-want.PayloadOffset {
			t.Fatalf("start %d, want %d", start, room-want.PayloadOffset)
		}
		if !bytes.Equal(buf[room:], payload) {
			t.Fatal("payload changed")
		}
		for i := range start {
			if buf[i] != 0x5a {
				t.Fatalf("byte %d in front of the packet changed", i)
			}
		}
		pkt := buf[start:]
		var info Info
		if err := Parse(pkt, &info); err != nil {
			t.Fatalf("Parse: %v", err)
		}
		if info != want {
			t.Fatalf("Parse = %+v, want %+v", info, want)
		}
		if is4 {
			checkIPv4Checksum(t, pkt)
		}
		checkUDPChecksum(t, pkt, &info)
	})
}

// FuzzPutESPRoundTrip is FuzzPutUDPRoundTrip for PutESP.
func FuzzPutESPRoundTrip(f *testing.F) {
	f.Add(v4Src.AsSlice(), v4Dst.AsSlice(), filler(100, 6), uint8(0))
	f.Add(v6Src.AsSlice(), v6Dst.AsSlice(), filler(8, 7), uint8(9))
	f.Fuzz(func(t *testing.T, srcBytes, dstBytes []byte, esp []byte, extraRoom uint8) {
		src, ok1 := netip.AddrFromSlice(srcBytes)
		dst, ok2 := netip.AddrFromSlice(dstBytes)
		if !ok1 || !ok2 || len(esp) < ESPHeaderLen {
			return
		}
		room := MaxHeader + int(extraRoom)
		buf := append(make([]byte, room), esp...)
		start, err := PutESP(buf, room, src, dst)
		is4 := src.Unmap().Is4()
		if is4 != dst.Unmap().Is4() {
			if err == nil {
				t.Fatalf("built a packet from %v to %v", src, dst)
			}
			return
		}
		if err != nil {
			t.Fatalf("%v → %v, %d bytes: %v", src, dst, len(esp), err)
		}
		want := Info{Version: 6, Src: src, Dst: dst, Proto: ProtoESP, PayloadOffset: IPv6HeaderLen, PayloadLen: len(esp)}
		if is4 {
			want.Version, want.Src, want.Dst, want.PayloadOffset = 4, src.Unmap(), dst.Unmap(), IPv4HeaderLen
		}
		var info Info
		if err := Parse(buf[start:], &info); err != nil {
			t.Fatalf("Parse: %v", err)
		}
		if info != want || start != room-want.PayloadOffset {
			t.Fatalf("start %d, Parse = %+v; want %d, %+v", start, info, room-want.PayloadOffset, want)
		}
		if !bytes.Equal(info.Payload(buf[start:]), esp) {
			t.Fatal("ESP bytes changed")
		}
		if is4 {
			checkIPv4Checksum(t, buf[start:])
		}
	})
}
