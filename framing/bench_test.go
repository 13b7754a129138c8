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

// BenchmarkFrame measures framing a 1400-byte datagram as it comes off a
// socket, two ways that do the same job: the relay's, which reads the
// datagram into a buffer with headroom and writes the length in front of
// it in place, against reading it into a plain buffer and appending the
// length and a copy to a frame. Both variants pay for the read (a copy of
// the datagram standing in for the kernel's), so MB/s counts the same
// 1400 bytes framed in each and the ratio is what the headroom saves: the
// second copy. (Timing PutLength alone, 2 bytes, and calling that 1400
// bytes per op measured nothing.)
func BenchmarkFrame(b *testing.B) {
	p := espPayload(1400, 0xc0ffee, 1)
	b.Run("in-place", func(b *testing.B) {
		buf := make([]byte, Headroom+len(p))
		b.SetBytes(int64(len(p)))
		b.ReportAllocs()
		var frame []byte
		for b.Loop() {
			n := copy(buf[Headroom:], p) // the read
			PutLength(buf[Headroom-LengthSize:], n)
			frame = buf[Headroom-LengthSize : Headroom+n]
		}
		if len(frame) != LengthSize+len(p) {
			b.Fatalf("frame of %d bytes", len(frame))
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
	})
	b.Run("append-copy", func(b *testing.B) {
		rbuf := make([]byte, len(p))
		dst := make([]byte, 0, 2*len(p))
		b.SetBytes(int64(len(p)))
		b.ReportAllocs()
		for b.Loop() {
			n := copy(rbuf, p) // the read
			dst = AppendFrame(dst[:0], rbuf[:n])
		}
		if len(dst) != LengthSize+len(p) {
			b.Fatalf("frame of %d bytes", len(dst))
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
	})
}
