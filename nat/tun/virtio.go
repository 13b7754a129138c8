package tun

import (
	"encoding/binary"
	"errors"

	"github.com/iketcp/iketcp/nat/packet"
)

// VirtioNetHdrLen is the size of the virtio-net header (struct
// virtio_net_hdr, without num_buffers) that a TUN device opened with
// IFF_VNET_HDR puts in front of every packet it reads and expects in
// front of every packet written to it.
const VirtioNetHdrLen = 10

// Flags of a VirtioNetHdr.
const (
	// VirtioNeedsCsum: the transport checksum is unfinished
	// (CHECKSUM_PARTIAL). The field at CsumStart+CsumOffset holds the
	// pseudo-header's sum, folded and not complemented; the checksum is
	// that plus the sum of everything from CsumStart on. The kernel sets
	// it on what it built or merged itself, or checked before it merged
	// (GRO): nothing on the way has touched a wire since it was last
	// checked.
	VirtioNeedsCsum = 0x01
	// VirtioDataValid: the kernel (or the device it came from) verified
	// the transport checksum (CHECKSUM_UNNECESSARY).
	VirtioDataValid = 0x02
)

// GSO types of a VirtioNetHdr.
const (
	GSONone  = 0x00 // one packet
	GSOTCPv4 = 0x01 // an IPv4 TCP super-segment: GSOSize bytes of payload per segment
	GSOTCPv6 = 0x04 // the same over IPv6
	// GSOECN is or'ed into GSOTCPv4/6 when the first segment carries
	// CWR; only a device that asked for TUN_F_TSO_ECN gets it.
	GSOECN = 0x80
)

// VirtioNetHdr is the virtio-net header of one packet: whether it is a
// TCP super-segment that the kernel cuts into segments (or already merged
// from them), and whether its checksum is finished. Its fields are in the
// host's byte order, as a TUN device without TUNSETVNETLE has them.
type VirtioNetHdr struct {
	Flags      uint8  // VirtioNeedsCsum, VirtioDataValid
	GSOType    uint8  // GSONone, GSOTCPv4, GSOTCPv6, maybe with GSOECN
	HdrLen     uint16 // the headers' length (a hint: the kernel may put more here)
	GSOSize    uint16 // the payload of each segment but the last
	CsumStart  uint16 // where the checksummed bytes start: the transport header
	CsumOffset uint16 // where the checksum field is, from CsumStart (16 for TCP, 6 for UDP)
}

// errShortHeader is Decode's and Encode's error for a buffer shorter than
// a header; made once, so that neither allocates.
var errShortHeader = errors.New("tun: a buffer shorter than a virtio-net header")

// Decode reads the header from b[:VirtioNetHdrLen].
func (h *VirtioNetHdr) Decode(b []byte) error {
	if len(b) < VirtioNetHdrLen {
		return errShortHeader
	}
	e := binary.NativeEndian
	*h = VirtioNetHdr{
		Flags:      b[0],
		GSOType:    b[1],
		HdrLen:     e.Uint16(b[2:4]),
		GSOSize:    e.Uint16(b[4:6]),
		CsumStart:  e.Uint16(b[6:8]),
		CsumOffset: e.Uint16(b[8:10]),
	}
	return nil
}

// Encode writes the header into b[:VirtioNetHdrLen].
func (h *VirtioNetHdr) Encode(b []byte) error {
	if len(b) < VirtioNetHdrLen {
		return errShortHeader
	}
	e := binary.NativeEndian
	b[0], b[1] = h.Flags, h.GSOType
	e.PutUint16(b[2:4], h.HdrLen)
	e.PutUint16(b[4:6], h.GSOSize)
	e.PutUint16(b[6:8], h.CsumStart)
	e.PutUint16(b[8:10], h.CsumOffset)
	return nil
}

// IsGSO reports whether the header describes a super-segment.
func (h *VirtioNetHdr) IsGSO() bool { return h.GSOType != GSONone }

// ChecksumTrusted reports whether the packet's transport checksum need
// not be verified: the kernel verified it (VirtioDataValid), or left it
// unfinished (VirtioNeedsCsum) because nothing since it was last checked
// or built could have damaged the packet, which is why the kernel's own
// TCP does not verify such packets either.
func (h *VirtioNetHdr) ChecksumTrusted() bool {
	return h.Flags&(VirtioNeedsCsum|VirtioDataValid) != 0
}

// TCP header fields the splitter reads and writes.
const (
	protoTCP       = 6
	tcpHeaderMin   = 20
	tcpHeaderMax   = 60
	tcpSeqOff      = 4
	tcpFlagsOff    = 13
	tcpCsumOff     = 16
	tcpFlagFIN     = 0x01
	tcpFlagSYN     = 0x02
	tcpFlagRST     = 0x04
	tcpFlagPSH     = 0x08
	tcpFlagCWR     = 0x80
	ipv4HeaderMin  = 20
	ipv6HeaderLen  = 40
	maxSplitHeader = 256 // IP header, IPv6 extension headers and TCP header of a super-segment
)

// The splitter's errors, made once so that SplitTCP does not allocate.
var (
	errNotGSO        = errors.New("tun: not a TCP super-segment (GSO type none)")
	errGSOType       = errors.New("tun: a GSO type other than TCP over IPv4 or IPv6")
	errGSOVersion    = errors.New("tun: the GSO type does not match the IP version")
	errGSOSize       = errors.New("tun: a super-segment with GSO size 0")
	errGSOLength     = errors.New("tun: a super-segment whose IP length does not fit the packet")
	errGSOProto      = errors.New("tun: a super-segment that is not TCP")
	errGSOFragment   = errors.New("tun: a fragmented super-segment")
	errGSOCsumStart  = errors.New("tun: a super-segment whose checksum start is not its TCP header")
	errGSOCsumOffset = errors.New("tun: a super-segment whose checksum offset is not TCP's")
	errGSOTCPHeader  = errors.New("tun: a super-segment with a bad TCP header length")
	errGSOFlags      = errors.New("tun: a super-segment with SYN or RST")
	errGSOEmpty      = errors.New("tun: a super-segment without payload")
	errCsumBounds    = errors.New("tun: a checksum start or offset outside the packet")
)

// TCPSplit is where the segments of a TCP super-segment lie: segment k is
// the headers of the first, with its own sequence number, IP length (and
// IPv4 ID), then payload bytes [Segment(k)) of the super-segment, as the
// kernel's own segmentation would cut it. Its zero value has no segments.
type TCPSplit struct {
	v6       bool
	tcpOff   int    // where the TCP header starts: the IP header's length, IPv6 extension headers included
	hdrLen   int    // IP and TCP headers: where the payload starts
	end      int    // the IP packet's length; bytes beyond it are not the packet's
	gsoSize  int    // payload bytes of each segment but the last
	segments int    // how many
	seq      uint32 // the first segment's sequence number
}

// SplitTCP checks that pkt, a packet read from a TUN device with header
// h, is a TCP super-segment the kernel can have made, and returns where
// its segments lie. It reads the TCP header's own length rather than
// h.HdrLen, which the kernel sets to more than the headers on its
// forwarding path, and takes the TCP header's place from h.CsumStart,
// after checking that it is IPv4's header length, or at least IPv6's
// within the packet. A super-segment with SYN or RST is refused: the
// kernel never segments one. It does not allocate.
func SplitTCP(h *VirtioNetHdr, pkt []byte) (TCPSplit, error) {
	var s TCPSplit
	gso := h.GSOType &^ GSOECN
	switch {
	case h.GSOType == GSONone:
		return s, errNotGSO
	case gso != GSOTCPv4 && gso != GSOTCPv6:
		return s, errGSOType
	case h.GSOSize == 0:
		return s, errGSOSize
	case len(pkt) == 0:
		return s, errGSOLength
	}
	switch pkt[0] >> 4 {
	case 4:
		if gso != GSOTCPv4 {
			return s, errGSOVersion
		}
		if len(pkt) < ipv4HeaderMin {
			return s, errGSOLength
		}
		ihl := int(pkt[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(pkt[2:4]))
		if ihl < ipv4HeaderMin || total < ihl || total > len(pkt) {
			return s, errGSOLength
		}
		if pkt[9] != protoTCP {
			return s, errGSOProto
		}
		if binary.BigEndian.Uint16(pkt[6:8])&0x3fff != 0 { // MF or an offset
			return s, errGSOFragment
		}
		if int(h.CsumStart) != ihl {
			return s, errGSOCsumStart
		}
		s.end = total
	case 6:
		if gso != GSOTCPv6 {
			return s, errGSOVersion
		}
		if len(pkt) < ipv6HeaderLen {
			return s, errGSOLength
		}
		total := ipv6HeaderLen + int(binary.BigEndian.Uint16(pkt[4:6]))
		if total > len(pkt) {
			return s, errGSOLength
		}
		// Extension headers lie between the IPv6 header and CsumStart;
		// the kernel only segments TCP, so what is there is TCP's.
		if int(h.CsumStart) < ipv6HeaderLen || int(h.CsumStart) > total {
			return s, errGSOCsumStart
		}
		if pkt[6] != protoTCP && int(h.CsumStart) == ipv6HeaderLen {
			return s, errGSOProto
		}
		s.v6, s.end = true, total
	default:
		return s, errGSOVersion
	}
	if h.CsumOffset != tcpCsumOff {
		return s, errGSOCsumOffset
	}
	s.tcpOff = int(h.CsumStart)
	if s.tcpOff+tcpHeaderMin > s.end {
		return s, errGSOTCPHeader
	}
	tcpLen := int(pkt[s.tcpOff+12]>>4) * 4
	s.hdrLen = s.tcpOff + tcpLen
	if tcpLen < tcpHeaderMin || s.hdrLen > s.end || s.hdrLen > maxSplitHeader {
		return s, errGSOTCPHeader
	}
	if pkt[s.tcpOff+tcpFlagsOff]&(tcpFlagSYN|tcpFlagRST) != 0 {
		return s, errGSOFlags
	}
	payload := s.end - s.hdrLen
	if payload == 0 {
		return s, errGSOEmpty
	}
	s.gsoSize = int(h.GSOSize)
	s.segments = (payload + s.gsoSize - 1) / s.gsoSize
	s.seq = binary.BigEndian.Uint32(pkt[s.tcpOff+tcpSeqOff:])
	return s, nil
}

// Segments is how many segments the super-segment stands for.
func (s *TCPSplit) Segments() int { return s.segments }

// GSOSize is the payload of each segment but the last, which may be
// shorter.
func (s *TCPSplit) GSOSize() int { return s.gsoSize }

// HeaderLen is the length of the IP and TCP headers, where the first
// payload starts.
func (s *TCPSplit) HeaderLen() int { return s.hdrLen }

// TCPOffset is where the TCP header starts.
func (s *TCPSplit) TCPOffset() int { return s.tcpOff }

// Segment returns where segment k's payload lies in the super-segment,
// pkt[start:end], and its sequence number.
func (s *TCPSplit) Segment(k int) (start, end int, seq uint32) {
	start = s.hdrLen + k*s.gsoSize
	end = min(start+s.gsoSize, s.end)
	return start, end, s.seq + uint32(k*s.gsoSize)
}

// SegmentFlags returns segment k's TCP flags, given the super-segment's:
// as the kernel cuts one, only the last segment keeps FIN and PSH, and
// only the first CWR.
func (s *TCPSplit) SegmentFlags(k int, flags uint8) uint8 {
	if k < s.segments-1 {
		flags &^= tcpFlagFIN | tcpFlagPSH
	}
	if k > 0 {
		flags &^= tcpFlagCWR
	}
	return flags
}

// Put writes segment k of pkt, the super-segment s describes, into dst
// as a whole packet with its own headers and correct checksums, as the
// kernel's segmentation writes it (an IPv4 segment's ID is the first's
// plus k), and returns its length. A dst shorter than the segment gets
// its first len(dst) bytes, as a device cuts a packet longer than the
// buffer it reads into. It does not allocate.
func (s *TCPSplit) Put(dst, pkt []byte, k int) int {
	start, end, seq := s.Segment(k)
	size := s.hdrLen + end - start
	var hdr [maxSplitHeader]byte
	h := hdr[:s.hdrLen]
	copy(h, pkt[:s.hdrLen])
	if s.v6 {
		binary.BigEndian.PutUint16(h[4:6], uint16(size-ipv6HeaderLen))
	} else {
		binary.BigEndian.PutUint16(h[2:4], uint16(size))
		binary.BigEndian.PutUint16(h[4:6], binary.BigEndian.Uint16(h[4:6])+uint16(k))
		h[10], h[11] = 0, 0
		binary.BigEndian.PutUint16(h[10:12], ^packet.ChecksumFold(packet.ChecksumAdd(0, h[:s.tcpOff])))
	}
	tcp := h[s.tcpOff:]
	binary.BigEndian.PutUint32(tcp[tcpSeqOff:], seq)
	tcp[tcpFlagsOff] = s.SegmentFlags(k, tcp[tcpFlagsOff])
	tcp[tcpCsumOff], tcp[tcpCsumOff+1] = 0, 0
	sum := pseudoSum(h, s.v6)
	sum = packet.ChecksumAddWord(sum, uint64(size-s.tcpOff))
	sum = packet.ChecksumAdd(sum, tcp)
	sum = packet.ChecksumAdd(sum, pkt[start:end])
	binary.BigEndian.PutUint16(tcp[tcpCsumOff:], ^packet.ChecksumFold(sum))
	n := copy(dst, h)
	n += copy(dst[n:], pkt[start:end])
	return n
}

// pseudoSum is the running sum of the addresses and protocol of TCP's
// pseudo-header, read from the IP header h; the length is the caller's.
func pseudoSum(h []byte, v6 bool) uint64 {
	var sum uint64
	if v6 {
		sum = packet.ChecksumAdd(0, h[8:40])
	} else {
		sum = packet.ChecksumAdd(0, h[12:20])
	}
	return packet.ChecksumAddWord(sum, protoTCP)
}

// FinishChecksum finishes the transport checksum of pkt, a packet read
// with header h that is not a super-segment, if h says it is unfinished
// (VirtioNeedsCsum): the sum of everything from CsumStart on, added to the
// pseudo-header's sum that the field holds. A UDP checksum (CsumOffset 6)
// that comes to 0 is sent as 0xffff. It does not allocate.
func FinishChecksum(h *VirtioNetHdr, pkt []byte) error {
	if h.Flags&VirtioNeedsCsum == 0 {
		return nil
	}
	start, at := int(h.CsumStart), int(h.CsumStart)+int(h.CsumOffset)
	if start >= len(pkt) || at+2 > len(pkt) {
		return errCsumBounds
	}
	partial := uint64(binary.BigEndian.Uint16(pkt[at:]))
	pkt[at], pkt[at+1] = 0, 0
	sum := ^packet.ChecksumFold(packet.ChecksumAdd(partial, pkt[start:]))
	if sum == 0 && h.CsumOffset == 6 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(pkt[at:], sum)
	return nil
}
