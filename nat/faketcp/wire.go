package faketcp

import (
	"encoding/binary"
	"net/netip"

	"github.com/iketcp/iketcp/nat/packet"
)

// Header sizes and the numbers of the headers built and parsed here.
const (
	protoTCP      = 6
	ipv4HeaderLen = 20
	ipv6HeaderLen = 40
	tcpHeaderLen  = 20 // without options
	hopLimit      = 64 // TTL or hop limit of the packets built here, as Linux's default

	ipv4DontFragment   = 0x4000
	ipv4MoreFragments  = 0x2000
	ipv4FragmentOffset = 0x1fff

	// IPv6 extension headers that parsing walks past, and the fragment
	// header, which it refuses: a segment is never fragmented here.
	ipv6HopByHop       = 0
	ipv6Routing        = 43
	ipv6Fragment       = 44
	ipv6DestOptions    = 60
	maxIPv6Extensions  = 8
	maxIPv4Payload     = 0xffff - ipv4HeaderLen
	maxIPv6Payload     = 0xffff
	maxIPv4MSS         = maxIPv4Payload - tcpHeaderLen
	maxIPv6MSS         = maxIPv6Payload - tcpHeaderLen
	maxPacket          = ipv6HeaderLen + maxIPv6Payload // the largest IP packet without jumbograms
	defaultIPv4PeerMSS = 536                            // RFC 9293 §3.7.1: what a peer that sends no MSS option takes
	defaultIPv6PeerMSS = 1220                           // RFC 8200 §5's minimum MTU less headers
)

// TCP header flags.
const (
	flagFIN = 0x01
	flagSYN = 0x02
	flagRST = 0x04
	flagPSH = 0x08
	flagACK = 0x10
)

// TCP option kinds.
const (
	optEnd           = 0
	optNOP           = 1
	optMSS           = 2
	optWindowScale   = 3
	optSACKPermitted = 4
)

// windowScale is the window scale this stack offers on its SYN and
// SYN-ACK, as Linux does for its default buffer sizes.
const windowScale = 7

// maxWindowShift is the largest window scale shift (RFC 7323 §2.3).
const maxWindowShift = 14

// segment is the TCP header of one received segment: the fields the state
// machine reads, with the options it cares about, which only a SYN carries.
type segment struct {
	srcPort, dstPort uint16
	seq, ack         uint32
	flags            uint8
	window           uint16
	mss              uint16 // 0: no MSS option
	windowScale      bool   // the window scale option was offered
	wsShift          uint8  // its shift count, at most 14 (RFC 7323 §2.3)
	sackPermitted    bool
	payloadLen       int
}

func (s *segment) has(flags uint8) bool { return s.flags&flags == flags }

// inbound is one parsed packet.
type inbound struct {
	src, dst   netip.Addr
	seg        segment
	tcpOff     int // where the TCP header starts in the packet
	payloadOff int // where the TCP payload starts in the packet
}

// verdictIP says why parsePacket refused a packet, or that it did not.
type verdictIP uint8

const (
	packetOK          verdictIP = iota
	packetMalformed             // too short, inconsistent lengths, bad IPv4 header checksum, fragment, bad TCP data offset, port 0, a source no TCP comes from
	packetNotTCP                // another protocol
	packetNotLocal              // another IP version than the stack's, or another destination address
	packetBadChecksum           // the TCP checksum is wrong
)

// parsePacket parses pkt, one IP packet as a TUN device opened with
// IFF_NO_PI delivers it, into in, if it is a TCP segment to local, whose
// family it must be of (is4). It verifies the IPv4 header checksum and the
// TCP checksum, ignores bytes beyond the IP length, and does not allocate.
func parsePacket(pkt []byte, local netip.Addr, is4 bool, in *inbound) verdictIP {
	return parseTrusted(pkt, local, is4, in, false)
}

// parseTrusted is parsePacket, without the TCP checksum when the device
// vouches for it (trusted): the kernel checked it, or left it unfinished
// on a packet that has not touched a wire since (see
// tun.VirtioNetHdr.ChecksumTrusted). pkt may be a super-segment: one
// TCP header, the payload of many segments.
func parseTrusted(pkt []byte, local netip.Addr, is4 bool, in *inbound, trusted bool) verdictIP {
	if len(pkt) == 0 {
		return packetMalformed
	}
	var src, dst netip.Addr
	var tcpOff int
	switch pkt[0] >> 4 {
	case 4:
		if !is4 {
			return packetNotLocal
		}
		if len(pkt) < ipv4HeaderLen {
			return packetMalformed
		}
		headerLen := int(pkt[0]&0x0f) * 4
		totalLen := int(binary.BigEndian.Uint16(pkt[2:4]))
		if headerLen < ipv4HeaderLen || totalLen < headerLen || totalLen > len(pkt) {
			return packetMalformed
		}
		if packet.ChecksumFold(packet.ChecksumAdd(0, pkt[:headerLen])) != 0xffff {
			return packetMalformed
		}
		if binary.BigEndian.Uint16(pkt[6:8])&(ipv4MoreFragments|ipv4FragmentOffset) != 0 {
			return packetMalformed
		}
		if pkt[9] != protoTCP {
			return packetNotTCP
		}
		dst = netip.AddrFrom4([4]byte(pkt[16:20]))
		if dst != local {
			return packetNotLocal
		}
		src = netip.AddrFrom4([4]byte(pkt[12:16]))
		pkt, tcpOff = pkt[:totalLen], headerLen
	case 6:
		if is4 {
			return packetNotLocal
		}
		if len(pkt) < ipv6HeaderLen {
			return packetMalformed
		}
		totalLen := ipv6HeaderLen + int(binary.BigEndian.Uint16(pkt[4:6]))
		if totalLen > len(pkt) {
			return packetMalformed
		}
		pkt = pkt[:totalLen]
		next, offset := pkt[6], ipv6HeaderLen
		for range maxIPv6Extensions {
			if next != ipv6HopByHop && next != ipv6Routing && next != ipv6DestOptions {
				break
			}
			if offset+8 > len(pkt) {
				return packetMalformed
			}
			extLen := (int(pkt[offset+1]) + 1) * 8
			if offset+extLen > len(pkt) {
				return packetMalformed
			}
			next, offset = pkt[offset], offset+extLen
		}
		switch next {
		case protoTCP:
		case ipv6Fragment, ipv6HopByHop, ipv6Routing, ipv6DestOptions:
			return packetMalformed
		default:
			return packetNotTCP
		}
		dst = netip.AddrFrom16([16]byte(pkt[24:40]))
		if dst != local {
			return packetNotLocal
		}
		src = netip.AddrFrom16([16]byte(pkt[8:24]))
		tcpOff = offset
	default:
		return packetMalformed
	}

	if src.IsMulticast() || src.IsUnspecified() || src == ipv4Broadcast {
		return packetMalformed // no TCP comes from there, and no RST may go there
	}
	tcp := pkt[tcpOff:]
	if len(tcp) < tcpHeaderLen {
		return packetMalformed
	}
	dataOff := int(tcp[12]>>4) * 4
	if dataOff < tcpHeaderLen || dataOff > len(tcp) {
		return packetMalformed
	}
	if !trusted {
		sum := pseudoHeaderSum(src, dst)
		sum = packet.ChecksumAddWord(sum, uint64(len(tcp)))
		if packet.ChecksumFold(packet.ChecksumAdd(sum, tcp)) != 0xffff {
			return packetBadChecksum
		}
	}
	seg := segment{
		srcPort:    binary.BigEndian.Uint16(tcp[0:2]),
		dstPort:    binary.BigEndian.Uint16(tcp[2:4]),
		seq:        binary.BigEndian.Uint32(tcp[4:8]),
		ack:        binary.BigEndian.Uint32(tcp[8:12]),
		flags:      tcp[13],
		window:     binary.BigEndian.Uint16(tcp[14:16]),
		payloadLen: len(tcp) - dataOff,
	}
	if seg.srcPort == 0 || seg.dstPort == 0 {
		return packetMalformed
	}
	if seg.has(flagSYN) {
		parseSYNOptions(tcp[tcpHeaderLen:dataOff], &seg)
	}
	in.src, in.dst, in.seg, in.tcpOff, in.payloadOff = src, dst, seg, tcpOff, tcpOff+dataOff
	return packetOK
}

// parseSYNOptions reads the options a SYN or SYN-ACK may carry. It stops
// at the end-of-options option and at the first malformed one, keeping
// what it read before it, as Linux does.
func parseSYNOptions(opts []byte, seg *segment) {
	for len(opts) > 0 {
		kind := opts[0]
		if kind == optEnd {
			return
		}
		if kind == optNOP {
			opts = opts[1:]
			continue
		}
		if len(opts) < 2 || int(opts[1]) < 2 || int(opts[1]) > len(opts) {
			return
		}
		body := opts[2:opts[1]]
		switch {
		case kind == optMSS && len(body) == 2:
			seg.mss = binary.BigEndian.Uint16(body)
		case kind == optWindowScale && len(body) == 1:
			seg.windowScale, seg.wsShift = true, min(body[0], maxWindowShift)
		case kind == optSACKPermitted && len(body) == 0:
			seg.sackPermitted = true
		}
		opts = opts[opts[1]:]
	}
}

// pseudoHeaderSum is the running checksum of the addresses and protocol
// of TCP's pseudo-header (RFC 9293 §3.1, RFC 8200 §8.1); the TCP length is
// added per segment. IPv4's zero-padded protocol byte and IPv6's 32-bit
// next header sum to the same word.
func pseudoHeaderSum(src, dst netip.Addr) uint64 {
	var sum uint64
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		sum = packet.ChecksumAdd(packet.ChecksumAdd(0, s[:]), d[:])
	} else {
		s, d := src.As16(), dst.As16()
		sum = packet.ChecksumAdd(packet.ChecksumAdd(0, s[:]), d[:])
	}
	return packet.ChecksumAddWord(sum, protoTCP)
}

// ipv4Broadcast is the limited broadcast address.
var ipv4Broadcast = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// headers is the template of the IP and TCP headers of one conn's
// segments: its 4-tuple, and what building their headers needs.
type headers struct {
	local, remote netip.AddrPort
	is4           bool
	flowLabel     uint32 // IPv6 only; 20 bits
	addrSum       uint64 // pseudoHeaderSum(local, remote)
}

func newHeaders(local, remote netip.AddrPort, flowLabel uint32) headers {
	return headers{
		local:     local,
		remote:    remote,
		is4:       local.Addr().Is4(),
		flowLabel: flowLabel & 0xfffff,
		addrSum:   pseudoHeaderSum(local.Addr(), remote.Addr()),
	}
}

// ipHeaderLen is the IP header length of these segments.
func (hd *headers) ipHeaderLen() int {
	if hd.is4 {
		return ipv4HeaderLen
	}
	return ipv6HeaderLen
}

// tcpFields are the per-segment fields of a TCP header built here.
type tcpFields struct {
	seq, ack uint32
	flags    uint8
	window   uint16
}

// put writes a TCP header (with opts, whose length is a multiple of 4)
// and an IP header into buf[:payloadOff] so that they end at payloadOff,
// for the segment whose payload is buf[payloadOff:], and returns where the
// packet starts. The caller guarantees the room and a payload that fits
// one IP packet. It computes both checksums and does not allocate.
func (hd *headers) put(buf []byte, payloadOff int, h tcpFields, opts []byte, ipID uint16) (start int) {
	return hd.putHeaders(buf, payloadOff, len(buf)-payloadOff, h, opts, ipID, false)
}

// putHeaders writes the headers of a segment (or a super-segment) with
// payloadLen bytes of payload into buf[:payloadOff], as put does. With
// partial, the payload need not be in buf: the TCP checksum field gets
// only the pseudo-header's sum, folded and not complemented, for the
// kernel to finish (a virtio-net header's VirtioNeedsCsum), and the IP
// length counts payloadLen. It does not allocate.
func (hd *headers) putHeaders(buf []byte, payloadOff, payloadLen int, h tcpFields, opts []byte, ipID uint16, partial bool) (start int) {
	tcpLen := tcpHeaderLen + len(opts) + payloadLen
	tcpStart := payloadOff - tcpHeaderLen - len(opts)
	tcp := buf[tcpStart:]
	binary.BigEndian.PutUint16(tcp[0:2], hd.local.Port())
	binary.BigEndian.PutUint16(tcp[2:4], hd.remote.Port())
	binary.BigEndian.PutUint32(tcp[4:8], h.seq)
	binary.BigEndian.PutUint32(tcp[8:12], h.ack)
	tcp[12] = uint8((tcpHeaderLen + len(opts)) / 4 << 4)
	tcp[13] = h.flags
	binary.BigEndian.PutUint16(tcp[14:16], h.window)
	binary.BigEndian.PutUint32(tcp[16:20], 0) // checksum and urgent pointer
	copy(tcp[tcpHeaderLen:], opts)
	sum := packet.ChecksumAddWord(hd.addrSum, uint64(tcpLen))
	if partial {
		binary.BigEndian.PutUint16(tcp[16:18], packet.ChecksumFold(sum))
	} else {
		binary.BigEndian.PutUint16(tcp[16:18], ^packet.ChecksumFold(packet.ChecksumAdd(sum, tcp)))
	}

	if hd.is4 {
		start = tcpStart - ipv4HeaderLen
		ip := buf[start:tcpStart]
		ip[0] = 4<<4 | ipv4HeaderLen/4
		ip[1] = 0
		binary.BigEndian.PutUint16(ip[2:4], uint16(ipv4HeaderLen+tcpLen))
		binary.BigEndian.PutUint16(ip[4:6], ipID)
		binary.BigEndian.PutUint16(ip[6:8], ipv4DontFragment)
		ip[8] = hopLimit
		ip[9] = protoTCP
		binary.BigEndian.PutUint16(ip[10:12], 0)
		src, dst := hd.local.Addr().As4(), hd.remote.Addr().As4()
		copy(ip[12:16], src[:])
		copy(ip[16:20], dst[:])
		binary.BigEndian.PutUint16(ip[10:12], ^packet.ChecksumFold(packet.ChecksumAdd(0, ip)))
		return start
	}
	start = tcpStart - ipv6HeaderLen
	ip := buf[start:tcpStart]
	binary.BigEndian.PutUint32(ip[0:4], 6<<28|hd.flowLabel)
	binary.BigEndian.PutUint16(ip[4:6], uint16(tcpLen))
	ip[6] = protoTCP
	ip[7] = hopLimit
	src, dst := hd.local.Addr().As16(), hd.remote.Addr().As16()
	copy(ip[8:24], src[:])
	copy(ip[24:40], dst[:])
	return start
}

// synOptions are the options of a SYN or SYN-ACK: MSS, window scale and
// SACK permitted, laid out as Windows lays them out (MSS, NOP, WS, NOP,
// NOP, SACK_PERM); a SYN-ACK carries window scale and SACK permitted only
// when the SYN offered them (RFC 7323 §2.2, RFC 2018 §2). No timestamps:
// see the package documentation.
type synOptions struct {
	buf [12]byte
	n   int
}

func makeSYNOptions(mss uint16, windowScaleOn, sackPermitted bool) synOptions {
	var o synOptions
	o.buf[0], o.buf[1] = optMSS, 4
	binary.BigEndian.PutUint16(o.buf[2:4], mss)
	o.n = 4
	if windowScaleOn {
		o.buf[o.n], o.buf[o.n+1], o.buf[o.n+2], o.buf[o.n+3] = optNOP, optWindowScale, 3, windowScale
		o.n += 4
	}
	if sackPermitted {
		o.buf[o.n], o.buf[o.n+1], o.buf[o.n+2], o.buf[o.n+3] = optNOP, optNOP, optSACKPermitted, 2
		o.n += 4
	}
	return o
}

// seqBefore reports whether sequence number a comes before b, in the
// modulo-2^32 arithmetic of RFC 9293 §3.4.
func seqBefore(a, b uint32) bool { return int32(a-b) < 0 }
