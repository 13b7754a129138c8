package packet

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// hopLimit is the TTL (IPv4) or hop limit (IPv6) of the packets built here.
const hopLimit = 64

// Largest payloads one packet carries: the IPv4 total length and the IPv6
// payload length are 16-bit fields, and so is the UDP length.
const (
	maxIPv4Payload = 0xffff - IPv4HeaderLen
	maxIPv6Payload = 0xffff
)

// PutUDP writes IP and UDP headers into buf[:payloadOff] so that they end
// exactly at payloadOff, for a UDP datagram whose payload is
// buf[payloadOff:], from src to dst. Both addresses must be IPv4 or both
// IPv6; IPv4-mapped IPv6 addresses count as IPv4, and zones are ignored.
// It returns the offset where the packet starts (payloadOff minus the
// header length), so the packet is buf[start:].
//
// The IPv4 header has no options, ID 0 and the don't-fragment flag set, as
// suits a packet never fragmented (RFC 6864). The UDP checksum covers the
// pseudo-header for both versions, and a computed 0 is sent as 0xffff.
// TTL or hop limit is 64. The payload is left untouched.
//
// Errors match ErrAddress, ErrFamily, ErrOffset, ErrNoRoom or ErrTooLarge.
// PutUDP does not allocate unless it fails.
func PutUDP(buf []byte, payloadOff int, src, dst netip.AddrPort) (start int, err error) {
	is4, err := family(src.Addr(), dst.Addr())
	if err != nil {
		return 0, err
	}
	if is4 {
		start, err = putIPv4(buf, payloadOff, UDPHeaderLen, ProtoUDP, src.Addr(), dst.Addr())
	} else {
		start, err = putIPv6(buf, payloadOff, UDPHeaderLen, ProtoUDP, src.Addr(), dst.Addr())
	}
	if err != nil {
		return 0, err
	}
	udp := buf[payloadOff-UDPHeaderLen:]
	binary.BigEndian.PutUint16(udp[0:2], src.Port())
	binary.BigEndian.PutUint16(udp[2:4], dst.Port())
	binary.BigEndian.PutUint16(udp[4:6], uint16(len(udp)))
	binary.BigEndian.PutUint16(udp[6:8], 0)

	// The pseudo-header: both addresses, which the IP header just written
	// holds side by side, then the protocol and the UDP length. Both fit
	// 16 bits, so IPv4's zero-padded protocol byte and 16-bit length and
	// IPv6's 32-bit length and zero-padded next header sum to the same two
	// words.
	var addrs []byte
	if is4 {
		addrs = buf[start+12 : start+20]
	} else {
		addrs = buf[start+8 : start+40]
	}
	sum := ChecksumAdd(0, addrs)
	sum = ChecksumAddWord(sum, ProtoUDP)
	sum = ChecksumAddWord(sum, uint64(len(udp)))
	sum = ChecksumAdd(sum, udp)
	check := ^ChecksumFold(sum)
	if check == 0 {
		check = 0xffff // 0 would mean no checksum (RFC 768)
	}
	binary.BigEndian.PutUint16(udp[6:8], check)
	return start, nil
}

// PutESP writes an IP header into buf[:payloadOff] so that it ends exactly
// at payloadOff, for a raw ESP packet (IP protocol 50) that is
// buf[payloadOff:], from src to dst. Addresses, header fields, the result
// and errors are as for PutUDP. It does not allocate unless it fails.
func PutESP(buf []byte, payloadOff int, src, dst netip.Addr) (start int, err error) {
	is4, err := family(src, dst)
	if err != nil {
		return 0, err
	}
	if is4 {
		return putIPv4(buf, payloadOff, 0, ProtoESP, src, dst)
	}
	return putIPv6(buf, payloadOff, 0, ProtoESP, src, dst)
}

// family reports whether src and dst are both IPv4 (IPv4-mapped IPv6
// included), or an error when they are not of one family.
func family(src, dst netip.Addr) (is4 bool, err error) {
	if !src.IsValid() || !dst.IsValid() {
		return false, fmt.Errorf("%w: source %v, destination %v", ErrAddress, src, dst)
	}
	src4, dst4 := src.Unmap().Is4(), dst.Unmap().Is4()
	if src4 != dst4 {
		return false, fmt.Errorf("%w: source %v, destination %v", ErrFamily, src, dst)
	}
	return src4, nil
}

// headerRoom checks that buf[:payloadOff] has room for headerLen bytes and
// that buf[payloadOff:] fits in a packet whose payload, including
// transportLen bytes of transport header, is at most maxPayload bytes. It
// returns where the headers start and the IP payload length.
func headerRoom(buf []byte, payloadOff, headerLen, transportLen, maxPayload int) (start, ipPayloadLen int, err error) {
	if payloadOff < 0 || payloadOff > len(buf) {
		return 0, 0, fmt.Errorf("%w: payload offset %d, buffer of %d bytes", ErrOffset, payloadOff, len(buf))
	}
	if payloadOff < headerLen {
		return 0, 0, fmt.Errorf("%w: %d bytes of headers, %d bytes of room", ErrNoRoom, headerLen, payloadOff)
	}
	ipPayloadLen = transportLen + len(buf) - payloadOff
	if ipPayloadLen > maxPayload {
		return 0, 0, fmt.Errorf("%w: %d-byte payload, at most %d fit", ErrTooLarge, len(buf)-payloadOff, maxPayload-transportLen)
	}
	return payloadOff - headerLen, ipPayloadLen, nil
}

// putIPv4 writes an IPv4 header in front of transportLen bytes of
// transport header that end at payloadOff, and returns where it starts.
func putIPv4(buf []byte, payloadOff, transportLen int, proto uint8, src, dst netip.Addr) (int, error) {
	start, ipPayloadLen, err := headerRoom(buf, payloadOff, IPv4HeaderLen+transportLen, transportLen, maxIPv4Payload)
	if err != nil {
		return 0, err
	}
	h := buf[start : start+IPv4HeaderLen]
	h[0] = 4<<4 | IPv4HeaderLen/4 // version, header length in 4-byte words
	h[1] = 0                      // DSCP, ECN
	binary.BigEndian.PutUint16(h[2:4], uint16(IPv4HeaderLen+ipPayloadLen))
	binary.BigEndian.PutUint16(h[4:6], 0) // ID: not fragmented, so not needed
	binary.BigEndian.PutUint16(h[6:8], ipv4DontFragment)
	h[8] = hopLimit
	h[9] = proto
	binary.BigEndian.PutUint16(h[10:12], 0)
	src4, dst4 := src.Unmap().As4(), dst.Unmap().As4()
	copy(h[12:16], src4[:])
	copy(h[16:20], dst4[:])
	binary.BigEndian.PutUint16(h[10:12], ^ChecksumFold(ChecksumAdd(0, h)))
	return start, nil
}

// putIPv6 writes an IPv6 header in front of transportLen bytes of
// transport header that end at payloadOff, and returns where it starts.
func putIPv6(buf []byte, payloadOff, transportLen int, proto uint8, src, dst netip.Addr) (int, error) {
	start, ipPayloadLen, err := headerRoom(buf, payloadOff, IPv6HeaderLen+transportLen, transportLen, maxIPv6Payload)
	if err != nil {
		return 0, err
	}
	h := buf[start : start+IPv6HeaderLen]
	binary.BigEndian.PutUint32(h[0:4], 6<<28) // version; traffic class and flow label 0
	binary.BigEndian.PutUint16(h[4:6], uint16(ipPayloadLen))
	h[6] = proto
	h[7] = hopLimit
	src16, dst16 := src.As16(), dst.As16()
	copy(h[8:24], src16[:])
	copy(h[24:40], dst16[:])
	return start, nil
}
