package packet

import (
	"net/netip"
	"testing"
)

// The benchmarks run on 1400-byte payloads, a full-sized ESP packet or IKE
// fragment. Each has a baseline-copy variant that only copies the same
// packet, what any reader or writer of it pays; read the ratio of the MB/s
// figures.

func BenchmarkParse(b *testing.B) {
	payload := filler(1400, 10)
	for _, addrs := range [][2]netip.Addr{{v4Src, v4Dst}, {v6Src, v6Dst}} {
		name := map[bool]string{true: "v4", false: "v6"}[addrs[0].Is4()]
		buf := append(make([]byte, MaxHeader), payload...)
		start, err := PutUDP(buf, MaxHeader, netip.AddrPortFrom(addrs[0], 4500), netip.AddrPortFrom(addrs[1], 4500))
		if err != nil {
			b.Fatal(err)
		}
		pkt := buf[start:]
		if name == "v4" {
			b.Run("baseline-copy", func(b *testing.B) {
				dst := make([]byte, len(pkt))
				b.SetBytes(int64(len(payload)))
				b.ReportAllocs()
				for b.Loop() {
					copy(dst, pkt)
				}
			})
		}
		b.Run(name, func(b *testing.B) {
			var info Info
			b.SetBytes(int64(len(payload)))
			b.ReportAllocs()
			for b.Loop() {
				if err := Parse(pkt, &info); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkPutUDP(b *testing.B) {
	payload := filler(1400, 11)
	buf := append(make([]byte, MaxHeader), payload...)
	b.Run("baseline-copy", func(b *testing.B) {
		b.SetBytes(int64(len(payload)))
		b.ReportAllocs()
		for b.Loop() {
			copy(buf[MaxHeader:], payload)
		}
	})
	for _, addrs := range [][2]netip.Addr{{v4Src, v4Dst}, {v6Src, v6Dst}} {
		src, dst := netip.AddrPortFrom(addrs[0], 4500), netip.AddrPortFrom(addrs[1], 4500)
		b.Run(map[bool]string{true: "v4", false: "v6"}[addrs[0].Is4()], func(b *testing.B) {
			b.SetBytes(int64(len(payload)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := PutUDP(buf, MaxHeader, src, dst); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkPutESP(b *testing.B) {
	buf := append(make([]byte, MaxHeader), filler(1400, 12)...)
	for _, addrs := range [][2]netip.Addr{{v4Src, v4Dst}, {v6Src, v6Dst}} {
		b.Run(map[bool]string{true: "v4", false: "v6"}[addrs[0].Is4()], func(b *testing.B) {
			b.SetBytes(1400)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := PutESP(buf, MaxHeader, addrs[0], addrs[1]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
