package faketcp

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// The benchmarks move 1400-byte datagrams, a full-sized ESP packet. Each
// has a baseline-copy variant that only copies the datagram once, what
// the pipe's own copy costs; read the ratio of the MB/s figures.

const benchSize = 1400

func baselineCopy(b *testing.B) {
	src, dst := make([]byte, benchSize), make([]byte, benchSize)
	b.SetBytes(benchSize)
	b.ReportAllocs()
	for b.Loop() {
		copy(dst, src)
	}
}

// BenchmarkPipe sends datagrams from one stack to the other across the
// in-memory pipe: Send builds headers and checksums in place, the pipe
// copies each packet, the other stack's reader parses, verifies and hands
// each to the handler. One operation is one datagram; batch is how many
// one Send takes. The offload variants run on offloading pipe ends: a
// batch goes as one super-segment, whose headers Send builds once, with
// the checksum left to the kernel, and the reader cuts where it lies.
func BenchmarkPipe(b *testing.B) {
	b.Run("baseline-copy", baselineCopy)
	for _, v6 := range []bool{false, true} {
		for _, c := range []struct {
			batch   int
			offload bool
		}{{1, false}, {32, false}, {32, true}} {
			family := map[bool]string{false: "v4", true: "v6"}[v6]
			name := fmt.Sprintf("%s-batch%d", family, c.batch)
			if c.offload {
				name += "-offload"
			}
			batch := c.batch
			b.Run(name, func(b *testing.B) {
				p := newPair(b, pairOptions{v6: v6, offload: [2]bool{c.offload, c.offload}})
				var received atomic.Int64
				p.server.SetHandler(func(batch []Payload) { received.Add(int64(len(batch))) })
				bufs := make([][]byte, batch)
				for i := range bufs {
					bufs[i] = datagram(uint32(i), benchSize)
				}
				b.SetBytes(benchSize)
				b.ReportAllocs()
				b.ResetTimer()
				for sent := 0; sent < b.N; {
					n := min(batch, b.N-sent)
					// Hold back while the pipe is long, and while the
					// server's window has no room for the batch (its ACKs
					// come every quarter window): a sender that ran past
					// it would have its datagrams dropped.
					for p.devB.Queued() > 4096 || p.client.Stats().SendWindow < int64(n*benchSize) {
						time.Sleep(20 * time.Microsecond)
					}
					if err := p.client.Send(bufs[:n], Headroom); err != nil {
						b.Fatal(err)
					}
					sent += n
				}
				for received.Load() < int64(b.N) {
					if p.devB.Overflowed() > 0 || p.client.Stats().DroppedWindow > 0 {
						b.Fatalf("the pipe overflowed, or the window dropped datagrams")
					}
					time.Sleep(20 * time.Microsecond)
				}
				b.StopTimer()
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "datagrams/s")
			})
		}
	}
}

// BenchmarkSend is Send alone, to a device that takes the packets and
// does nothing, in batches of 32; with offload, to one that offloads,
// which takes the batch as one super-segment.
func BenchmarkSend(b *testing.B) {
	b.Run("baseline-copy", baselineCopy)
	for _, addrs := range families {
		for _, offload := range []bool{false, true} {
			name := map[bool]string{true: "v4", false: "v6"}[addrs[0].Is4()]
			if offload {
				name += "-offload"
			}
			b.Run(name, func(b *testing.B) { benchSend(b, addrs, offload) })
		}
	}
}

func benchSend(b *testing.B, addrs [2]netip.Addr, offload bool) {
	_, dev, c, _ := drivenStackOn(b, &recordDevice{keep: true, offload: offload}, Config{Local: addrs[0]}, netip.AddrPortFrom(addrs[1], 40000))
	dev.mu.Lock()
	dev.keep = false
	dev.mu.Unlock()
	bufs := make([][]byte, 32)
	for i := range bufs {
		bufs[i] = datagram(uint32(i), benchSize)
	}
	b.SetBytes(benchSize * int64(len(bufs)))
	b.ReportAllocs()
	for b.Loop() {
		openSendWindow(c)
		if err := c.Send(bufs, Headroom); err != nil {
			b.Fatal(err)
		}
	}
	if d := c.Stats().DroppedWindow; d > 0 {
		b.Fatalf("the window dropped %d datagrams", d)
	}
	b.ReportMetric(float64(b.N*len(bufs))/b.Elapsed().Seconds(), "datagrams/s")
}

// openSendWindow moves the end of c's send window a GiB past what it has
// sent, as a peer whose ACKs keep up would: a driven stack's peer sends
// none of its own.
func openSendWindow(c *Conn) {
	c.mu.Lock()
	c.tcb.sndWndEnd = c.tcb.sndNxt + 1<<30
	c.mu.Unlock()
}

// BenchmarkReceive is the receive path alone: a batch of 8 data segments
// parsed, checksummed and handed to a handler; with offload, the same 8
// datagrams as one super-segment whose checksum the kernel vouches for
// (VirtioNeedsCsum), cut where it lies.
func BenchmarkReceive(b *testing.B) {
	b.Run("baseline-copy", baselineCopy)
	for _, addrs := range families {
		for _, offload := range []bool{false, true} {
			name := map[bool]string{true: "v4", false: "v6"}[addrs[0].Is4()]
			if offload {
				name += "-offload"
			}
			b.Run(name, func(b *testing.B) { benchReceive(b, addrs, offload) })
		}
	}
}

func benchReceive(b *testing.B, addrs [2]netip.Addr, offload bool) {
	s, _, c, r := drivenStackOn(b, &recordDevice{keep: true, offload: offload}, Config{Local: addrs[0], MTU: 65535}, netip.AddrPortFrom(addrs[1], 40000))
	c.SetHandler(func([]Payload) {})
	const n = 8
	packets := n
	if offload {
		payloads := make([][]byte, n)
		for k := range payloads {
			payloads[k] = datagram(uint32(k), benchSize)[Headroom:]
		}
		p := r.super(flagACK|flagPSH, tun.VirtioNeedsCsum, benchSize, payloads...)
		s.rx.sizes[0] = copy(s.rx.bufs[0][Headroom-tun.VirtioNetHdrLen:], p) - tun.VirtioNetHdrLen
		packets = 1
	} else {
		for k := range n {
			s.rx.sizes[k] = copy(s.rx.bufs[k][Headroom:], r.segment(flagACK|flagPSH, datagram(uint32(k), benchSize)[Headroom:]))
		}
	}
	now := time.Now()
	b.SetBytes(benchSize * n)
	b.ReportAllocs()
	for b.Loop() {
		s.processBatch(packets, now)
	}
	b.ReportMetric(float64(b.N*n)/b.Elapsed().Seconds(), "datagrams/s")
}

// BenchmarkSYNFlood is what a flood costs the stack's reader: batches
// of 64 SYNs from random addresses, each parsed and answered with a
// SYN cookie, or of 64 ACKs with forged cookies, each answered with an
// RST. One operation is one segment.
func BenchmarkSYNFlood(b *testing.B) {
	for _, kind := range []string{"SYN", "forged-cookie"} {
		b.Run(kind, func(b *testing.B) {
			s, dev, _ := listeningStack(b, Config{Local: addr4B})
			dev.mu.Lock()
			dev.keep = false
			dev.mu.Unlock()
			const n = 64
			pkts := floodSYNs(rand.New(rand.NewPCG(11, 11)), n, netip.AddrPortFrom(addr4B, testPort))
			if kind == "forged-cookie" {
				for k, p := range pkts {
					var in inbound
					parsePacket(p, addr4B, true, &in)
					r := remoteEnd{hdr: newHeaders(netip.AddrPortFrom(in.src, in.seg.srcPort), netip.AddrPortFrom(addr4B, testPort), 0), seq: in.seg.seq + 1, ack: uint32(k) * 0x9e3779b9}
					pkts[k] = r.segment(flagACK, nil)
				}
			}
			for k, p := range pkts {
				s.rx.sizes[k] = copy(s.rx.bufs[k][Headroom:], p)
			}
			now := time.Now()
			b.ReportAllocs()
			for b.Loop() {
				s.processBatch(n, now)
			}
			b.ReportMetric(float64(b.N*n)/b.Elapsed().Seconds(), "segments/s")
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/segment")
			if st := s.Stats(); st.Conns != 0 {
				b.Fatalf("the flood left %d conns", st.Conns)
			}
		})
	}
}
