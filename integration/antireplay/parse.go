package antireplay

import (
	"encoding/binary"
	"net/netip"
)

// tcpSegment is what the tracker reads from a packet.
type tcpSegment struct {
	src, dst netip.AddrPort
	seq      uint32
	flags    uint8
	payload  int // TCP payload length, from the IP header's length
}

type parseResult int

const (
	parseOK parseResult = iota // a TCP segment with its header
	parseNotTCP
	parseMalformed
)

const (
	protoTCP = 6
	// maxExtHeaders bounds the walk over IPv6 extension headers.
	maxExtHeaders = 8
)

// parseTCP reads the IP and TCP headers of pkt. Only the fixed 20 bytes
// of the TCP header must be present; the payload length comes from the IP
// header, so pkt may be cut after the headers (NFQUEUE's copy range).
// Non-first fragments are "not TCP": they carry no TCP header.
func parseTCP(pkt []byte) (seg tcpSegment, res parseResult) {
	if len(pkt) < 1 {
		return seg, parseMalformed
	}
	var src, dst netip.Addr
	var off, end int // TCP header offset, end of the IP packet
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < 20 {
			return seg, parseMalformed
		}
		ihl := int(pkt[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(pkt[2:4]))
		if ihl < 20 || len(pkt) < ihl || total < ihl {
			return seg, parseMalformed
		}
		if pkt[9] != protoTCP || binary.BigEndian.Uint16(pkt[6:8])&0x1fff != 0 {
			return seg, parseNotTCP
		}
		src, dst = netip.AddrFrom4([4]byte(pkt[12:16])), netip.AddrFrom4([4]byte(pkt[16:20]))
		off, end = ihl, total
	case 6:
		if len(pkt) < 40 {
			return seg, parseMalformed
		}
		end = 40 + int(binary.BigEndian.Uint16(pkt[4:6]))
		next, o := pkt[6], 40
		for i := 0; next != protoTCP; i++ {
			if i == maxExtHeaders || len(pkt) < o+8 {
				return seg, parseNotTCP
			}
			switch next {
			case 0, 43, 60: // hop-by-hop, routing, destination options
				next, o = pkt[o], o+(int(pkt[o+1])+1)*8
			case 44: // fragment
				if binary.BigEndian.Uint16(pkt[o+2:o+4])&0xfff8 != 0 {
					return seg, parseNotTCP
				}
				next, o = pkt[o], o+8
			case 51: // authentication header
				next, o = pkt[o], o+(int(pkt[o+1])+2)*4
			default:
				return seg, parseNotTCP
			}
		}
		src, dst = netip.AddrFrom16([16]byte(pkt[8:24])), netip.AddrFrom16([16]byte(pkt[24:40]))
		off = o
	default:
		return seg, parseMalformed
	}
	if len(pkt) < off+20 {
		return seg, parseMalformed
	}
	tcp := pkt[off:]
	doff := int(tcp[12]>>4) * 4
	if doff < 20 || end < off+doff {
		return seg, parseMalformed
	}
	seg.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp[0:2]))
	seg.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:4]))
	seg.seq = binary.BigEndian.Uint32(tcp[4:8])
	seg.flags = tcp[13]
	seg.payload = end - off - doff
	return seg, parseOK
}
