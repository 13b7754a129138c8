// Package packet owns the bytes of the IP packets that transparent mode
// reads from and writes to its TUN device: it parses IPv4 and IPv6 packets
// carrying UDP or ESP, and builds reply packets in place, in front of a
// payload that is already in the buffer, with correct checksums.
//
// The package is pure: it does no I/O and does not allocate. Packets are
// what a TUN device opened with IFF_NO_PI delivers, one IP packet per read,
// starting with the IP header.
package packet

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Protocol numbers, header sizes and the room a reply needs.
const (
	ProtoUDP = 17 // IP protocol number of UDP
	ProtoESP = 50 // IP protocol number of ESP

	IPv4HeaderLen = 20 // IPv4 header without options
	IPv6HeaderLen = 40 // IPv6 fixed header
	UDPHeaderLen  = 8

	// MaxHeader is the most room a reply needs in front of its payload:
	// IPv6 + UDP.
	MaxHeader = IPv6HeaderLen + UDPHeaderLen
)

// ESPHeaderLen is the shortest ESP packet Parse accepts: the SPI and the
// sequence number.
const ESPHeaderLen = 8

// IPv6 next-header values of the extension headers Parse skips or refuses.
const (
	ipv6HopByHop    = 0
	ipv6Routing     = 43
	ipv6Fragment    = 44
	ipv6DestOptions = 60
)

// maxExtensionHeaders bounds how many IPv6 extension headers Parse walks
// before it gives up on a packet.
const maxExtensionHeaders = 8

// IPv4 flags and fragment offset, as in the header's seventh and eighth
// bytes.
const (
	ipv4DontFragment   = 0x4000
	ipv4MoreFragments  = 0x2000
	ipv4FragmentOffset = 0x1fff
)

// Info describes a parsed packet.
type Info struct {
	Version          int        // 4 or 6
	Src, Dst         netip.Addr // as on the wire: IPv4 for version 4, IPv6 for version 6
	Proto            uint8      // ProtoUDP or ProtoESP
	SrcPort, DstPort uint16     // UDP only, 0 for ESP
	PayloadOffset    int        // where the UDP payload (or, for ESP, the ESP header) starts in the packet
	PayloadLen       int
}

// Payload returns the UDP payload (or, for ESP, the whole ESP packet) of
// pkt, the packet info was parsed from. It aliases pkt.
func (info *Info) Payload(pkt []byte) []byte {
	return pkt[info.PayloadOffset : info.PayloadOffset+info.PayloadLen]
}

// Source returns the source address and port (0 for ESP).
func (info *Info) Source() netip.AddrPort { return netip.AddrPortFrom(info.Src, info.SrcPort) }

// Destination returns the destination address and port (0 for ESP).
func (info *Info) Destination() netip.AddrPort {
	return netip.AddrPortFrom(info.Dst, info.DstPort)
}

// Parse parses pkt, one IP packet as read from a TUN device opened with
// IFF_NO_PI, into info. It accepts IPv4 (with or without options) and IPv6
// (skipping hop-by-hop, routing and destination options extension headers)
// carrying UDP or ESP, and ignores bytes beyond the length the IP header
// declares. It checks the IPv4 header checksum but not the UDP checksum:
// packets from local sockets may reach the TUN before the kernel computed
// it. info is written only when Parse returns nil.
//
// Errors match, with errors.Is, one of ErrTooShort, ErrTruncated,
// ErrVersion, ErrFragment, ErrProtocol, ErrLength or ErrChecksum. A UDP
// length must equal the IP payload length, and an ESP packet must hold at
// least its SPI and sequence number (ESPHeaderLen bytes).
//
// Parse does not allocate, and neither do its rejections of packets that
// are merely not for it: fragments (ErrFragment), other protocols
// (ProtocolError) and other IP versions (VersionError). Errors about
// malformed packets carry the offending numbers in their text and do
// allocate.
func Parse(pkt []byte, info *Info) error {
	if len(pkt) == 0 {
		return fmt.Errorf("%w: empty packet", ErrTooShort)
	}
	switch version := pkt[0] >> 4; version {
	case 4:
		return parseIPv4(pkt, info)
	case 6:
		return parseIPv6(pkt, info)
	default:
		return VersionError(version)
	}
}

func parseIPv4(pkt []byte, info *Info) error {
	if len(pkt) < IPv4HeaderLen {
		return fmt.Errorf("%w: %d bytes, less than an IPv4 header", ErrTooShort, len(pkt))
	}
	headerLen := int(pkt[0]&0x0f) * 4
	totalLen := int(binary.BigEndian.Uint16(pkt[2:4]))
	switch {
	case headerLen < IPv4HeaderLen:
		return fmt.Errorf("%w: IPv4 header length field says %d bytes", ErrTooShort, headerLen)
	case totalLen < headerLen:
		return fmt.Errorf("%w: IPv4 total length %d is less than its %d-byte header", ErrTooShort, totalLen, headerLen)
	case totalLen > len(pkt):
		return fmt.Errorf("%w: IPv4 total length %d, %d bytes read", ErrTruncated, totalLen, len(pkt))
	}
	if sum := ChecksumFold(ChecksumAdd(0, pkt[:headerLen])); sum != 0xffff {
		return fmt.Errorf("%w: header sums to %#04x, not 0xffff", ErrChecksum, sum)
	}
	if binary.BigEndian.Uint16(pkt[6:8])&(ipv4MoreFragments|ipv4FragmentOffset) != 0 {
		return ErrFragment
	}
	var parsed Info
	parsed.Version = 4
	parsed.Src = netip.AddrFrom4([4]byte(pkt[12:16]))
	parsed.Dst = netip.AddrFrom4([4]byte(pkt[16:20]))
	if err := parseTransport(pkt[:totalLen], headerLen, pkt[9], &parsed); err != nil {
		return err
	}
	*info = parsed
	return nil
}

func parseIPv6(pkt []byte, info *Info) error {
	if len(pkt) < IPv6HeaderLen {
		return fmt.Errorf("%w: %d bytes, less than an IPv6 header", ErrTooShort, len(pkt))
	}
	totalLen := IPv6HeaderLen + int(binary.BigEndian.Uint16(pkt[4:6]))
	if totalLen > len(pkt) {
		return fmt.Errorf("%w: IPv6 payload length %d, %d bytes read after the header", ErrTruncated, totalLen-IPv6HeaderLen, len(pkt)-IPv6HeaderLen)
	}
	pkt = pkt[:totalLen]
	next, offset := pkt[6], IPv6HeaderLen
	for range maxExtensionHeaders {
		if next != ipv6HopByHop && next != ipv6Routing && next != ipv6DestOptions {
			break
		}
		// Each of these starts with the next header and its own length in
		// 8-byte units, not counting the first 8 bytes.
		if offset+8 > len(pkt) {
			return fmt.Errorf("%w: IPv6 extension header %d at byte %d overruns the %d-byte packet", ErrTooShort, next, offset, len(pkt))
		}
		extLen := (int(pkt[offset+1]) + 1) * 8
		if offset+extLen > len(pkt) {
			return fmt.Errorf("%w: %d-byte IPv6 extension header %d at byte %d overruns the %d-byte packet", ErrTooShort, extLen, next, offset, len(pkt))
		}
		next, offset = pkt[offset], offset+extLen
	}
	switch next {
	case ipv6Fragment:
		return ErrFragment
	case ipv6HopByHop, ipv6Routing, ipv6DestOptions:
		return fmt.Errorf("%w: more than %d IPv6 extension headers", ErrProtocol, maxExtensionHeaders)
	}
	var parsed Info
	parsed.Version = 6
	parsed.Src = netip.AddrFrom16([16]byte(pkt[8:24]))
	parsed.Dst = netip.AddrFrom16([16]byte(pkt[24:40]))
	if err := parseTransport(pkt, offset, next, &parsed); err != nil {
		return err
	}
	*info = parsed
	return nil
}

// parseTransport parses the UDP or ESP packet at pkt[offset:], pkt ending
// where the IP packet ends, into info.
func parseTransport(pkt []byte, offset int, proto uint8, info *Info) error {
	payloadLen := len(pkt) - offset
	switch proto {
	case ProtoUDP:
		if payloadLen < UDPHeaderLen {
			return fmt.Errorf("%w: %d bytes of IP payload, less than a UDP header", ErrTooShort, payloadLen)
		}
		udp := pkt[offset:]
		if udpLen := int(binary.BigEndian.Uint16(udp[4:6])); udpLen != payloadLen {
			return fmt.Errorf("%w: UDP length %d, IP payload %d bytes", ErrLength, udpLen, payloadLen)
		}
		info.SrcPort = binary.BigEndian.Uint16(udp[0:2])
		info.DstPort = binary.BigEndian.Uint16(udp[2:4])
		info.PayloadOffset = offset + UDPHeaderLen
		info.PayloadLen = payloadLen - UDPHeaderLen
	case ProtoESP:
		if payloadLen < ESPHeaderLen {
			return fmt.Errorf("%w: %d bytes of IP payload, less than an ESP header", ErrTooShort, payloadLen)
		}
		info.PayloadOffset = offset
		info.PayloadLen = payloadLen
	default:
		return ProtocolError(proto)
	}
	info.Proto = proto
	return nil
}
