package framing

import (
	"bytes"
	"testing"
)

// BenchmarkDeframe measures splitting a stream of 1400-byte ESP frames and
// parsing each header, against the baseline of only copying the same bytes
// out of the reader (what any stream consumer pays). Read the ratio of the
// two MB/s figures.
func BenchmarkDeframe(b *testing.B) {
	const n = 46 // frames per stream, about 64 KiB
	var payloads [][]byte
	for i := range n {
		payloads = append(payloads, espPayload(1400, 0xc0ffee, uint32(i)))
	}
	s := stream(false, payloads...)
	r := bytes.NewReader(s)

	b.Run("baseline-copy", func(b *testing.B) {
		buf := make([]byte, MaxFrame)
		b.SetBytes(int64(len(s)))
		b.ReportAllocs()
		for b.Loop() {
			r.Reset(s)
			for {
				if m, _ := r.Read(buf); m == 0 {
					break
				}
			}
		}
	})
	b.Run("decoder", func(b *testing.B) {
		d := NewDecoder(r, MaxFrame, false)
		var m Message
		b.SetBytes(int64(len(s)))
		b.ReportAllocs()
		for b.Loop() {
			r.Reset(s)
			for {
				p, err := d.Next()
				if err != nil {
					break
				}
				if m.Decode(p) != nil {
					b.Fatal("bad frame")
				}
			}
		}
		b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "frames/s")
	})
}

// BenchmarkFrame measures adding the length to a 1400-byte datagram read
// with headroom (in place, the relay's way) against appending it to a copy.
func BenchmarkFrame(b *testing.B) {
	p := espPayload(1400, 0xc0ffee, 1)
	b.Run("in-place", func(b *testing.B) {
		buf := make([]byte, Headroom+len(p))
		copy(buf[Headroom:], p)
		b.SetBytes(int64(len(p)))
		b.ReportAllocs()
		for b.Loop() {
			PutLength(buf[Headroom-LengthSize:], len(p))
		}
	})
	b.Run("append-copy", func(b *testing.B) {
		dst := make([]byte, 0, 2*len(p))
		b.SetBytes(int64(len(p)))
		b.ReportAllocs()
		for b.Loop() {
			dst = AppendFrame(dst[:0], p)
		}
	})
}
