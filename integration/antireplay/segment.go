package antireplay

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

// Segment describes a TCP segment to build by hand: a replayed or forged
// segment in a test, or at a raw socket.
type Segment struct {
	Src, Dst netip.AddrPort // both IPv4 or both IPv6
	Seq, Ack uint32
	Flags    uint8  // Flag bits
	Window   uint16 // 0 means 65535
	Payload  []byte
}

// Append appends the segment as an IP packet (IPv4 without options, DF
// set, TTL 64; or IPv6, hop limit 64) with a 20-byte TCP header and
// correct checksums. IPv4-mapped IPv6 addresses count as IPv4.
func (s Segment) Append(b []byte) ([]byte, error) {
	src, dst := s.Src.Addr().Unmap(), s.Dst.Addr().Unmap()
	tcpLen := 20 + len(s.Payload)
	var pseudo uint64
	switch {
	case src.Is4() && dst.Is4():
		if tcpLen > 65535-20 {
			return b, errors.New("segment payload too large for IPv4")
		}
		ip := make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:4], uint16(20+tcpLen))
		binary.BigEndian.PutUint16(ip[6:8], 0x4000) // DF
		ip[8], ip[9] = 64, protoTCP
		s4, d4 := src.As4(), dst.As4()
		copy(ip[12:16], s4[:])
		copy(ip[16:20], d4[:])
		binary.BigEndian.PutUint16(ip[10:12], ^fold(sum(0, ip)))
		b = append(b, ip...)
		pseudo = sum(sum(0, s4[:]), d4[:]) + protoTCP + uint64(tcpLen)
	case src.Is6() && dst.Is6():
		if tcpLen > 65535 {
			return b, errors.New("segment payload too large for IPv6")
		}
		ip := make([]byte, 40)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:6], uint16(tcpLen))
		ip[6], ip[7] = protoTCP, 64
		s16, d16 := src.As16(), dst.As16()
		copy(ip[8:24], s16[:])
		copy(ip[24:40], d16[:])
		b = append(b, ip...)
		pseudo = sum(sum(0, s16[:]), d16[:]) + protoTCP + uint64(tcpLen)
	default:
		return b, errors.New("segment addresses must be both IPv4 or both IPv6")
	}
	tcp := make([]byte, 20, tcpLen)
	binary.BigEndian.PutUint16(tcp[0:2], s.Src.Port())
	binary.BigEndian.PutUint16(tcp[2:4], s.Dst.Port())
	binary.BigEndian.PutUint32(tcp[4:8], s.Seq)
	binary.BigEndian.PutUint32(tcp[8:12], s.Ack)
	tcp[12] = 5 << 4
	tcp[13] = s.Flags
	win := s.Window
	if win == 0 {
		win = 65535
	}
	binary.BigEndian.PutUint16(tcp[14:16], win)
	tcp = append(tcp, s.Payload...)
	binary.BigEndian.PutUint16(tcp[16:18], ^fold(sum(pseudo, tcp)))
	return append(b, tcp...), nil
}

// sum adds b to an Internet checksum (RFC 1071) accumulator.
func sum(acc uint64, b []byte) uint64 {
	for len(b) >= 2 {
		acc += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	return acc
}

// fold folds an accumulator into 16 bits.
func fold(acc uint64) uint16 {
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return uint16(acc)
}
