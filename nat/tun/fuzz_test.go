package tun_test

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/iketcp/iketcp/nat/tun"
)

// FuzzSplitTCP feeds the splitter arbitrary headers and packets.
// Invariants: it never panics; what it accepts has segments that tile the
// payload within the IP length, each at most GSOSize bytes with only the
// last shorter, numbered on from the first sequence number; and Put
// writes each as a packet of the right size, with the segment's
// sequence number and payload, whose checksums are correct when its
// headers are the plain ones the kernel builds.
func FuzzSplitTCP(f *testing.F) {
	for _, v6 := range []bool{false, true} {
		for _, sizes := range [][]int{{100, 100}, {100, 100, 7}, {1}, {64, 64, 64, 64}} {
			h, pkt, _ := superSegment(v6, 0xfffffff0, flagACK|flagPSH|flagFIN, sizes[0], sizes...)
			b := make([]byte, tun.VirtioNetHdrLen)
			_ = h.Encode(b)
			f.Add(b, pkt)
		}
	}
	f.Add(make([]byte, tun.VirtioNetHdrLen), []byte{0x45})
	f.Fuzz(func(t *testing.T, hb, pkt []byte) {
		var h tun.VirtioNetHdr
		if h.Decode(hb) != nil {
			return
		}
		cut, err := tun.SplitTCP(&h, pkt)
		if err != nil {
			return
		}
		n := cut.Segments()
		if n < 1 || cut.GSOSize() != int(h.GSOSize) || cut.HeaderLen() > len(pkt) || cut.TCPOffset()+20 > cut.HeaderLen() {
			t.Fatalf("%d segments of %d, headers %d..%d, in %d bytes", n, cut.GSOSize(), cut.TCPOffset(), cut.HeaderLen(), len(pkt))
		}
		seq0 := binary.BigEndian.Uint32(pkt[cut.TCPOffset()+4:])
		at := cut.HeaderLen()
		dst := make([]byte, 1<<16+256)
		for k := range n {
			start, end, seq := cut.Segment(k)
			size := end - start
			if start != at || end > len(pkt) || size < 1 || size > cut.GSOSize() || (size < cut.GSOSize() && k != n-1) {
				t.Fatalf("segment %d of %d: [%d, %d) after %d", k, n, start, end, at)
			}
			if seq != seq0+uint32(start-cut.HeaderLen()) {
				t.Fatalf("segment %d: seq %d, first %d", k, seq, seq0)
			}
			m := cut.Put(dst, pkt, k)
			out := dst[:m]
			if m != cut.HeaderLen()+size || !bytes.Equal(out[cut.HeaderLen():], pkt[start:end]) {
				t.Fatalf("segment %d: %d bytes, payload differs", k, m)
			}
			if binary.BigEndian.Uint32(out[cut.TCPOffset()+4:]) != seq {
				t.Fatalf("segment %d: seq field differs", k)
			}
			if flags := out[cut.TCPOffset()+13]; k < n-1 && flags&(flagFIN|flagPSH) != 0 {
				t.Fatalf("segment %d of %d keeps FIN or PSH: %#x", k, n, flags)
			}
			plain := (pkt[0]>>4 == 4 && cut.TCPOffset() == 20) || (pkt[0]>>4 == 6 && cut.TCPOffset() == 40)
			if plain && cut.HeaderLen() == cut.TCPOffset()+20 && !checksumsOK(out) {
				t.Fatalf("segment %d: bad checksums", k)
			}
			at = end
		}
		end := int(binary.BigEndian.Uint16(pkt[2:4]))
		if pkt[0]>>4 == 6 {
			end = 40 + int(binary.BigEndian.Uint16(pkt[4:6]))
		}
		if at != end {
			t.Fatalf("the segments end at %d, the packet at %d", at, end)
		}
	})
}
