package tun_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/iketcp/iketcp/nat/tun"
)

// The splitter's tests build their packets by hand, with nattest's
// checksum, sharing no code with what they test.

const (
	flagFIN = 0x01
	flagSYN = 0x02
	flagRST = 0x04
	flagPSH = 0x08
	flagACK = 0x10
	flagCWR = 0x80
)

var (
	tcpSrc4 = netip.MustParseAddrPort("192.0.2.2:40000")
	tcpDst4 = netip.MustParseAddrPort("198.51.100.2:4500")
	tcpSrc6 = netip.MustParseAddrPort("[2001:db8::2]:40000")
	tcpDst6 = netip.MustParseAddrPort("[2001:db8:1::2]:4500")
)

// tcpSegment is what tcpPacket builds.
type tcpSegment struct {
	src, dst netip.AddrPort
	seq, ack uint32
	flags    uint8
	id       uint16 // IPv4 identification
	payload  []byte
}

// tcpPacket builds seg as an IPv4 (with DF) or IPv6 packet with a 20-byte
// TCP header and correct checksums.
func tcpPacket(seg tcpSegment) []byte {
	tcp := make([]byte, 20, 20+len(seg.payload))
	nattest.Put16(tcp[0:], seg.src.Port())
	nattest.Put16(tcp[2:], seg.dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], seg.seq)
	binary.BigEndian.PutUint32(tcp[8:], seg.ack)
	tcp[12] = 5 << 4
	tcp[13] = seg.flags
	nattest.Put16(tcp[14:], 512)
	tcp = append(tcp, seg.payload...)
	s, d := seg.src.Addr().AsSlice(), seg.dst.Addr().AsSlice()
	pseudo := append(append([]byte{}, s...), d...)
	var hdr []byte
	if seg.src.Addr().Is4() {
		pseudo = append(pseudo, 0, 6, byte(len(tcp)>>8), byte(len(tcp)))
		hdr = make([]byte, 20)
		hdr[0] = 0x45
		nattest.Put16(hdr[2:], uint16(20+len(tcp)))
		nattest.Put16(hdr[4:], seg.id)
		nattest.Put16(hdr[6:], 0x4000)
		hdr[8], hdr[9] = 64, 6
		copy(hdr[12:], s)
		copy(hdr[16:], d)
		nattest.Put16(hdr[10:], nattest.Checksum(hdr))
	} else {
		pseudo = append(pseudo, 0, 0, byte(len(tcp)>>8), byte(len(tcp)), 0, 0, 0, 6)
		hdr = make([]byte, 40)
		hdr[0] = 0x60
		nattest.Put16(hdr[4:], uint16(len(tcp)))
		hdr[6], hdr[7] = 6, 64
		copy(hdr[8:], s)
		copy(hdr[24:], d)
	}
	nattest.Put16(tcp[16:], nattest.Checksum(append(pseudo, tcp...)))
	return append(hdr, tcp...)
}

// payloadOf returns size bytes of payload numbered n.
func payloadOf(n, size int) []byte {
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(n*7 + i)
	}
	return b
}

// superSegment is what the kernel hands a TUN reader for segments of
// sizes, from seq on: one packet with the first one's headers (and
// flags), the IP length of the whole, and a header saying GSO size
// gsoSize and an unfinished checksum (the pseudo-header's sum, not
// complemented). It returns the header, the packet, and the segments it
// stands for, as the kernel would cut them.
func superSegment(v6 bool, seq uint32, flags uint8, gsoSize int, sizes ...int) (tun.VirtioNetHdr, []byte, [][]byte) {
	src, dst := tcpSrc4, tcpDst4
	gso := uint8(tun.GSOTCPv4)
	ipLen := 20
	if v6 {
		src, dst, gso, ipLen = tcpSrc6, tcpDst6, tun.GSOTCPv6, 40
	}
	var all []byte
	var segs [][]byte
	for k, size := range sizes {
		p := payloadOf(k, size)
		all = append(all, p...)
		f := flags
		if k < len(sizes)-1 {
			f &^= flagFIN | flagPSH
		}
		if k > 0 {
			f &^= flagCWR
		}
		segs = append(segs, tcpPacket(tcpSegment{src: src, dst: dst, seq: seq, ack: 77, flags: f, id: 100 + uint16(k), payload: p}))
		seq += uint32(size)
	}
	pkt := tcpPacket(tcpSegment{src: src, dst: dst, seq: seq - uint32(len(all)), ack: 77, flags: flags, id: 100, payload: all})
	// The checksum field holds the pseudo-header's sum: start from the
	// full checksum's complement, less the TCP header and payload.
	tcp := pkt[ipLen:]
	nattest.Put16(tcp[16:], 0)
	partial := ^nattest.Checksum(tcp) // the sum of the TCP bytes
	full := binary.BigEndian.Uint16(tcpPacket(tcpSegment{src: src, dst: dst, seq: seq - uint32(len(all)), ack: 77, flags: flags, id: 100, payload: all})[ipLen+16:])
	// full = ~(pseudo + tcp), so pseudo = ~full - tcp, in one's complement.
	pseudo := onesSub(^full, partial)
	nattest.Put16(tcp[16:], pseudo)
	h := tun.VirtioNetHdr{
		Flags:      tun.VirtioNeedsCsum,
		GSOType:    gso,
		HdrLen:     uint16(ipLen + 20),
		GSOSize:    uint16(gsoSize),
		CsumStart:  uint16(ipLen),
		CsumOffset: 16,
	}
	return h, pkt, segs
}

// onesSub is a - b in one's complement arithmetic.
func onesSub(a, b uint16) uint16 {
	s := uint32(a) + uint32(^b)
	s = s&0xffff + s>>16
	return uint16(s)
}

// checksumsOK reports whether pkt, an IPv4 or IPv6 TCP packet with a
// 20-byte IP header (IPv4) or none beyond the fixed one (IPv6), has
// correct checksums.
func checksumsOK(pkt []byte) bool {
	var pseudo, tcp []byte
	switch pkt[0] >> 4 {
	case 4:
		if nattest.Checksum(pkt[:20]) != 0 {
			return false
		}
		tcp = pkt[20:]
		pseudo = append(append([]byte{}, pkt[12:20]...), 0, 6, byte(len(tcp)>>8), byte(len(tcp)))
	case 6:
		tcp = pkt[40:]
		pseudo = append(append([]byte{}, pkt[8:40]...), 0, 0, byte(len(tcp)>>8), byte(len(tcp)), 0, 0, 0, 6)
	default:
		return false
	}
	return nattest.Checksum(append(pseudo, tcp...)) == 0
}

func TestVirtioNetHdrCodec(t *testing.T) {
	h := tun.VirtioNetHdr{Flags: tun.VirtioNeedsCsum, GSOType: tun.GSOTCPv6, HdrLen: 60, GSOSize: 1400, CsumStart: 40, CsumOffset: 16}
	b := make([]byte, tun.VirtioNetHdrLen)
	if err := h.Encode(b); err != nil {
		t.Fatal(err)
	}
	// struct virtio_net_hdr in the host's order; these machines are
	// little-endian.
	want := []byte{1, 4, 60, 0, 0x78, 0x05, 40, 0, 16, 0}
	if binary.NativeEndian.Uint16([]byte{1, 0}) == 1 && !bytes.Equal(b, want) {
		t.Errorf("Encode: % x, want % x", b, want)
	}
	var got tun.VirtioNetHdr
	if err := got.Decode(b); err != nil || got != h {
		t.Errorf("Decode: %+v, %v; want %+v", got, err, h)
	}
	if err := got.Decode(b[:9]); err == nil {
		t.Error("Decode of 9 bytes did not fail")
	}
	if err := h.Encode(b[:9]); err == nil {
		t.Error("Encode into 9 bytes did not fail")
	}
	for _, c := range []struct {
		flags   uint8
		trusted bool
	}{{0, false}, {tun.VirtioNeedsCsum, true}, {tun.VirtioDataValid, true}, {0x04, false}} {
		if got := (&tun.VirtioNetHdr{Flags: c.flags}).ChecksumTrusted(); got != c.trusted {
			t.Errorf("flags %#x: ChecksumTrusted %v", c.flags, got)
		}
	}
}

// TestSplitTCP cuts super-segments as the kernel would and compares each
// segment with one built by hand.
func TestSplitTCP(t *testing.T) {
	for _, c := range []struct {
		name    string
		v6      bool
		flags   uint8
		gso     int
		sizes   []int
		segSeqs []uint32
	}{
		{"v4 two", false, flagACK | flagPSH, 1400, []int{1400, 1400}, nil},
		{"v4 last shorter", false, flagACK | flagPSH, 1400, []int{1400, 1400, 1400, 17}, nil},
		{"v4 one", false, flagACK, 100, []int{60}, nil},
		{"v4 FIN and CWR", false, flagACK | flagFIN | flagCWR, 500, []int{500, 500, 500}, nil},
		{"v4 46 of 1400", false, flagACK | flagPSH, 1400, repeat(1400, 46), nil},
		{"v6 three", true, flagACK | flagPSH, 1220, []int{1220, 1220, 1000}, nil},
		{"v6 odd size", true, flagACK, 333, []int{333, 333, 333, 1}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			const seq = 0xffff_f000 // wraps within the larger runs
			h, pkt, want := superSegment(c.v6, seq, c.flags, c.gso, c.sizes...)
			cut, err := tun.SplitTCP(&h, pkt)
			if err != nil {
				t.Fatal(err)
			}
			if cut.Segments() != len(c.sizes) || cut.GSOSize() != c.gso {
				t.Fatalf("%d segments of %d, want %d of %d", cut.Segments(), cut.GSOSize(), len(c.sizes), c.gso)
			}
			ipLen := 20
			if c.v6 {
				ipLen = 40
			}
			if cut.TCPOffset() != ipLen || cut.HeaderLen() != ipLen+20 {
				t.Errorf("TCP at %d, payload at %d", cut.TCPOffset(), cut.HeaderLen())
			}
			next, at := uint32(seq), ipLen+20
			dst := make([]byte, 2000)
			for k, size := range c.sizes {
				start, end, s := cut.Segment(k)
				if start != at || end != at+size || s != next {
					t.Errorf("segment %d: [%d, %d) seq %d; want [%d, %d) seq %d", k, start, end, s, at, at+size, next)
				}
				n := cut.Put(dst, pkt, k)
				if !bytes.Equal(dst[:n], want[k]) {
					t.Errorf("segment %d:\n got % x\nwant % x", k, dst[:n], want[k])
				}
				if !checksumsOK(dst[:n]) {
					t.Errorf("segment %d: bad checksums", k)
				}
				next += uint32(size)
				at += size
			}
			// A buffer too short gets the segment's start, as a device
			// cuts a packet.
			short := make([]byte, 30)
			if n := cut.Put(short, pkt, 0); n != 30 || !bytes.Equal(short, want[0][:30]) {
				t.Errorf("Put into 30 bytes: %d, % x", n, short)
			}
		})
	}
}

func repeat(size, n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = size
	}
	return s
}

// TestSplitTCPRefuses feeds the splitter what the kernel does not make.
func TestSplitTCPRefuses(t *testing.T) {
	good := func() (tun.VirtioNetHdr, []byte) {
		h, pkt, _ := superSegment(false, 1, flagACK, 100, 100, 100)
		return h, pkt
	}
	for _, c := range []struct {
		name   string
		mutate func(h *tun.VirtioNetHdr, pkt []byte) []byte
	}{
		{"GSO none", func(h *tun.VirtioNetHdr, pkt []byte) []byte { h.GSOType = tun.GSONone; return pkt }},
		{"UDP GSO", func(h *tun.VirtioNetHdr, pkt []byte) []byte { h.GSOType = 5; return pkt }},
		{"v6 type on v4", func(h *tun.VirtioNetHdr, pkt []byte) []byte { h.GSOType = tun.GSOTCPv6; return pkt }},
		{"GSO size 0", func(h *tun.VirtioNetHdr, pkt []byte) []byte { h.GSOSize = 0; return pkt }},
		{"empty", func(h *tun.VirtioNetHdr, pkt []byte) []byte { return nil }},
		{"short", func(h *tun.VirtioNetHdr, pkt []byte) []byte { return pkt[:19] }},
		{"IP length past the end", func(h *tun.VirtioNetHdr, pkt []byte) []byte { return pkt[:len(pkt)-1] }},
		{"version 5", func(h *tun.VirtioNetHdr, pkt []byte) []byte { pkt[0] = 0x55; return pkt }},
		{"UDP", func(h *tun.VirtioNetHdr, pkt []byte) []byte { pkt[9] = 17; return pkt }},
		{"fragment", func(h *tun.VirtioNetHdr, pkt []byte) []byte { pkt[6] |= 0x20; return pkt }},
		{"checksum start", func(h *tun.VirtioNetHdr, pkt []byte) []byte { h.CsumStart = 24; return pkt }},
		{"checksum offset", func(h *tun.VirtioNetHdr, pkt []byte) []byte { h.CsumOffset = 6; return pkt }},
		{"TCP header 16", func(h *tun.VirtioNetHdr, pkt []byte) []byte { pkt[32] = 4 << 4; return pkt }},
		{"TCP header past the end", func(h *tun.VirtioNetHdr, pkt []byte) []byte {
			pkt[32] = 15 << 4
			nattest.Put16(pkt[2:], 50)
			return pkt
		}},
		{"SYN", func(h *tun.VirtioNetHdr, pkt []byte) []byte { pkt[33] |= flagSYN; return pkt }},
		{"RST", func(h *tun.VirtioNetHdr, pkt []byte) []byte { pkt[33] |= flagRST; return pkt }},
		{"no payload", func(h *tun.VirtioNetHdr, pkt []byte) []byte { nattest.Put16(pkt[2:], 40); return pkt }},
	} {
		h, pkt := good()
		pkt = c.mutate(&h, pkt)
		if cut, err := tun.SplitTCP(&h, pkt); err == nil {
			t.Errorf("%s: split into %d segments", c.name, cut.Segments())
		}
	}
	// IPv6: the checksum start must lie in the packet, past the header.
	h, pkt, _ := superSegment(true, 1, flagACK, 100, 100, 100)
	for _, start := range []uint16{39, uint16(len(pkt) + 1)} {
		h.CsumStart = start
		if _, err := tun.SplitTCP(&h, pkt); err == nil {
			t.Errorf("v6 checksum start %d: split", start)
		}
	}
}

// TestFinishChecksum finishes the checksum of a packet that the kernel
// left unfinished, and leaves alone one it did not.
func TestFinishChecksum(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		h, pkt, segs := superSegment(v6, 9, flagACK|flagPSH, 1000, 300)
		h.GSOType, h.GSOSize = tun.GSONone, 0
		if err := tun.FinishChecksum(&h, pkt); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(pkt, segs[0]) {
			t.Errorf("v6 %v: finished\n% x\nwant\n% x", v6, pkt, segs[0])
		}
		h.Flags = tun.VirtioDataValid
		before := bytes.Clone(pkt)
		if err := tun.FinishChecksum(&h, pkt); err != nil || !bytes.Equal(pkt, before) {
			t.Errorf("v6 %v: a checked packet changed (%v)", v6, err)
		}
		h.Flags, h.CsumOffset = tun.VirtioNeedsCsum, uint16(len(pkt))
		if err := tun.FinishChecksum(&h, pkt); err == nil {
			t.Errorf("v6 %v: a checksum field past the end did not fail", v6)
		}
	}
	// A UDP checksum that comes to 0 is sent as 0xffff (RFC 768). The
	// pseudo-header's sum is 0; find two payload bytes that make the
	// rest come to 0xffff.
	udp := make([]byte, 10)
	udp[4], udp[5] = 0, 10
	h := tun.VirtioNetHdr{Flags: tun.VirtioNeedsCsum, CsumStart: 0, CsumOffset: 6}
	for v := range 1 << 16 {
		nattest.Put16(udp[8:], uint16(v))
		nattest.Put16(udp[6:], 0)
		if nattest.Checksum(udp) != 0 {
			continue
		}
		if err := tun.FinishChecksum(&h, udp); err != nil || udp[6] != 0xff || udp[7] != 0xff {
			t.Errorf("a UDP checksum of 0: % x (%v)", udp[6:8], err)
		}
		return
	}
	t.Fatal("no payload gives a zero UDP checksum")
}

// TestOffloadError checks what the fallback's error says and matches.
func TestOffloadError(t *testing.T) {
	err := error(&tun.OffloadError{Op: "TUNSETOFFLOAD", Err: errors.New("invalid argument")})
	if !errors.Is(err, errors.ErrUnsupported) {
		t.Error("an OffloadError does not match errors.ErrUnsupported")
	}
	if got := err.Error(); got != "the kernel refused the TUN device's offloads (TUNSETOFFLOAD: invalid argument); each segment takes a system call" {
		t.Errorf("Error: %q", got)
	}
	err = &tun.OffloadError{Err: tun.ErrOffloadNotAsked}
	if !errors.Is(err, tun.ErrOffloadNotAsked) || err.Error() != "TUN offloads not asked for; each segment takes a system call" {
		t.Errorf("not asked: %q", err)
	}
}
