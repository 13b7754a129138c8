package faketcp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
	"github.com/iketcp/iketcp/nat/tun/tuntest"
)

// The offload tests run the stack on devices that hand TCP segmentation
// and checksums to the kernel (tun.OffloadDevice): a recordDevice with
// offload, which keeps what Send writes, and the pipe of tuntest, which
// moves super-segments as the kernel between two TUN devices does.

// super builds a super-segment from the peer: the headers of its first
// segment (flags), one payload after the other, and a virtio-net header
// with GSO size gso and hdrFlags. With VirtioNeedsCsum the checksum field
// holds the pseudo-header's sum, as the kernel leaves it; otherwise the
// checksum of the whole, as if it were one segment. It advances the
// peer's seq past the payloads and returns the header and the packet,
// header first.
func (r *remoteEnd) super(flags, hdrFlags uint8, gso int, payloads ...[]byte) []byte {
	all := bytes.Join(payloads, nil)
	buf := append(make([]byte, controlBufSize), all...)
	fields := tcpFields{seq: r.seq, ack: r.ack, flags: flags, window: DefaultWindow}
	start := r.hdr.putHeaders(buf, controlBufSize, len(all), fields, nil, 0, hdrFlags&tun.VirtioNeedsCsum != 0)
	r.seq += uint32(len(all))
	ipLen := r.hdr.ipHeaderLen()
	h := tun.VirtioNetHdr{Flags: hdrFlags, GSOType: tun.GSOTCPv4, HdrLen: uint16(ipLen + tcpHeaderLen),
		GSOSize: uint16(gso), CsumStart: uint16(ipLen), CsumOffset: 16}
	if !r.hdr.is4 {
		h.GSOType = tun.GSOTCPv6
	}
	out := make([]byte, tun.VirtioNetHdrLen, tun.VirtioNetHdrLen+len(buf)-start)
	_ = h.Encode(out)
	return append(out, buf[start:]...)
}

// kernelCut cuts an offloaded packet (virtio-net header first) as the
// kernel does before it leaves the host: a super-segment into its
// segments, a single one with its checksum finished.
func kernelCut(t *testing.T, b []byte) [][]byte {
	t.Helper()
	var h tun.VirtioNetHdr
	if err := h.Decode(b); err != nil {
		t.Fatal(err)
	}
	pkt := bytes.Clone(b[tun.VirtioNetHdrLen:])
	if !h.IsGSO() {
		if err := tun.FinishChecksum(&h, pkt); err != nil {
			t.Fatal(err)
		}
		return [][]byte{pkt}
	}
	cut, err := tun.SplitTCP(&h, pkt)
	if err != nil {
		t.Fatalf("the kernel would refuse the super-segment: %v (header %+v)", err, h)
	}
	var segs [][]byte
	for k := range cut.Segments() {
		seg := make([]byte, cut.HeaderLen()+cut.GSOSize())
		segs = append(segs, seg[:cut.Put(seg, pkt, k)])
	}
	return segs
}

// TestSendRuns sends batches through an offloading device: each run of
// equal-sized datagrams (the last may be shorter, unless it is small
// enough to go alone) goes out as one
// super-segment, within the bounds of one, with headers that the kernel
// cuts into the very segments Send sends without offloads.
func TestSendRuns(t *testing.T) {
	for _, addrs := range families {
		for _, c := range []struct {
			name  string
			sizes []int
			runs  []int // segments per packet written
		}{
			{"mixed", []int{1400, 1400, 1000, 1400, 1400, 1400, 200, 1400, 900, 900}, []int{3, 3, 1, 2, 1}},
			{"small leaves alone", []int{1400, 1400, 256, 257, 1400, 100, 100, 100}, []int{2, 1, 1, 1, 3}},
			{"one", []int{700}, []int{1}},
			{"longer ends a run", []int{500, 500, 600, 600}, []int{2, 2}},
			{"IP length", repeat(1400, 60), []int{46, 14}},
			{"segments", repeat(100, 100), []int{64, 36}},
		} {
			t.Run(fmt.Sprintf("%v/%s", addrs[0], c.name), func(t *testing.T) {
				s, dev, conn, _ := drivenStackOn(t, &recordDevice{keep: true, offload: true}, Config{Local: addrs[0]}, netip.AddrPortFrom(addrs[1], 40000))
				if !s.Offload() {
					t.Fatal("the stack does not use the offloads")
				}
				dev.take()
				var bufs [][]byte
				for i, size := range c.sizes {
					bufs = append(bufs, datagram(uint32(i), size))
				}
				before := conn.Stats()
				firstID := uint16(conn.ipID.Load()) + 1
				if err := conn.Send(bufs, Headroom); err != nil {
					t.Fatal(err)
				}
				if plain := dev.take(); len(plain) != 0 {
					t.Errorf("%d packets went out without offload", len(plain))
				}
				written := dev.takeOffloaded()
				if len(written) != len(c.runs) {
					t.Fatalf("%d packets written, want %d", len(written), len(c.runs))
				}
				seq, next, id := before.Seq, 0, firstID
				ipLen := ipv4HeaderLen
				if !addrs[0].Is4() {
					ipLen = ipv6HeaderLen
				}
				for r, b := range written {
					var h tun.VirtioNetHdr
					_ = h.Decode(b)
					want := tun.VirtioNetHdr{Flags: tun.VirtioNeedsCsum, HdrLen: uint16(ipLen + 20), CsumStart: uint16(ipLen), CsumOffset: 16}
					if c.runs[r] > 1 {
						want.GSOType, want.GSOSize = tun.GSOTCPv6, uint16(c.sizes[next])
						if addrs[0].Is4() {
							want.GSOType = tun.GSOTCPv4
						}
					}
					if h != want {
						t.Errorf("packet %d: header %+v, want %+v", r, h, want)
					}
					segs := kernelCut(t, b)
					if len(segs) != c.runs[r] {
						t.Fatalf("packet %d: %d segments, want %d", r, len(segs), c.runs[r])
					}
					for k, seg := range segs {
						var in inbound
						if v := parsePacket(seg, addrs[1], addrs[1].Is4(), &in); v != packetOK {
							t.Fatalf("packet %d segment %d: verdict %d", r, k, v)
						}
						flags := uint8(flagACK)
						if k == len(segs)-1 {
							flags |= flagPSH
						}
						if in.seg.seq != seq || in.seg.ack != before.Ack || in.seg.flags != flags ||
							!bytes.Equal(seg[in.payloadOff:], bufs[next][Headroom:]) {
							t.Fatalf("packet %d segment %d: seq %d ack %d flags %s, %d bytes; want seq %d ack %d flags %s, datagram %d",
								r, k, in.seg.seq, in.seg.ack, flagString(in.seg.flags), in.seg.payloadLen, seq, before.Ack, flagString(flags), next)
						}
						if addrs[0].Is4() {
							if got := binary.BigEndian.Uint16(seg[4:6]); got != id {
								t.Errorf("packet %d segment %d: IPv4 ID %d, want %d", r, k, got, id)
							}
							id++
						}
						seq += uint32(in.seg.payloadLen)
						next++
					}
				}
				st := conn.Stats()
				supers := 0
				for _, n := range c.runs {
					if n > 1 {
						supers++
					}
				}
				if st.Seq != seq || st.SegmentsSent-before.SegmentsSent != uint64(len(c.sizes)) || st.SuperSegmentsSent != uint64(supers) {
					t.Errorf("stats: seq %d (want %d), %d segments sent (want %d), %d super-segments (want %d)",
						st.Seq, seq, st.SegmentsSent-before.SegmentsSent, len(c.sizes), st.SuperSegmentsSent, supers)
				}
			})
		}
	}
}

func repeat(size, n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = size
	}
	return s
}

// TestSendFrozenNoRuns: frozen sequence numbers cannot ride a
// super-segment (the kernel would number its segments on): each datagram
// goes out as a packet of its own, checksum and all.
func TestSendFrozenNoRuns(t *testing.T) {
	_, dev, conn, _ := drivenStackOn(t, &recordDevice{keep: true, offload: true}, Config{Local: addr4A, Seq: SeqFrozen}, netip.AddrPortFrom(addr4B, 40000))
	dev.take()
	if err := conn.Send([][]byte{datagram(0, 1000), datagram(1, 1000), datagram(2, 1000)}, Headroom); err != nil {
		t.Fatal(err)
	}
	plain, offloaded := dev.take(), dev.takeOffloaded()
	if len(plain) != 3 || len(offloaded) != 0 {
		t.Fatalf("%d plain packets and %d offloaded, want 3 and 0", len(plain), len(offloaded))
	}
	for _, p := range plain {
		var in inbound
		if v := parsePacket(p, addr4B, true, &in); v != packetOK || in.seg.seq != conn.Stats().Seq {
			t.Errorf("verdict %d, seq %d", v, in.seg.seq)
		}
	}
}

// TestReceiveSuperSegments feeds super-segments, as the kernel hands
// them to an offloading device, to a driven stack: their datagrams reach
// the handler where they lie, the checksum is verified only when the
// kernel did not vouch for it, and what the kernel would not make is
// dropped and counted.
func TestReceiveSuperSegments(t *testing.T) {
	for _, addrs := range families {
		t.Run(addrs[0].String(), func(t *testing.T) {
			s, dev, c, r := drivenStackOn(t, &recordDevice{keep: true, offload: true}, Config{Local: addrs[0], MSS: 1200, MTU: 65535}, netip.AddrPortFrom(addrs[1], 40000))
			var got []Payload
			c.SetHandler(func(batch []Payload) {
				for _, p := range batch {
					got = append(got, Payload{Buf: p.Buf, Off: p.Off, N: p.N})
				}
			})
			now := drivenEpoch
			payloads := [][]byte{datagram(0, 1000)[Headroom:], datagram(1, 1000)[Headroom:], datagram(2, 1000)[Headroom:], datagram(3, 300)[Headroom:]}
			// Unfinished checksum (CHECKSUM_PARTIAL): trusted.
			feedVirtio(s, now, r.super(flagACK|flagPSH, tun.VirtioNeedsCsum, 1000, payloads...))
			if len(got) != 4 {
				t.Fatalf("%d datagrams delivered, want 4", len(got))
			}
			for i, p := range got {
				if p.Off < Headroom || &p.Buf[0] != &got[0].Buf[0] || p.Off != got[0].Off+1000*i {
					t.Errorf("datagram %d at %d, not where it lies in the super-segment", i, p.Off)
				}
				if index, err := checkDatagram(p.Buf[p.Off : p.Off+p.N]); err != nil || index != uint32(i) {
					t.Errorf("datagram %d: number %d, %v", i, index, err)
				}
			}
			if st := c.Stats(); st.Ack != r.seq || st.SegmentsReceived != 4 {
				t.Errorf("after the super-segment: ack %d (peer's seq %d), %d segments", st.Ack, r.seq, st.SegmentsReceived)
			}
			if st := s.Stats(); st.SuperSegments != 1 {
				t.Errorf("%d super-segments counted", st.SuperSegments)
			}
			// Checked by the kernel (DataValid): trusted, even with a
			// checksum that would not pass.
			got = nil
			pkt := r.super(flagACK|flagPSH, tun.VirtioDataValid, 1000, payloads[:2]...)
			pkt[len(pkt)-1] ^= 0xff
			feedVirtio(s, now, pkt)
			if len(got) != 2 {
				t.Errorf("DataValid: %d delivered", len(got))
			}
			// Nothing vouched for: verified over the whole.
			got = nil
			feedVirtio(s, now, r.super(flagACK|flagPSH, 0, 1000, payloads[:2]...))
			bad := r.super(flagACK|flagPSH, 0, 1000, payloads[:2]...)
			bad[len(bad)-1] ^= 0xff
			feedVirtio(s, now, bad)
			if len(got) != 2 || s.Stats().BadChecksum != 1 {
				t.Errorf("no flags: %d delivered, %d bad checksums; want 2 and 1", len(got), s.Stats().BadChecksum)
			}
			// What the kernel would not make.
			got = nil
			zero := r.super(flagACK, tun.VirtioNeedsCsum, 1000, payloads[:2]...)
			binary.NativeEndian.PutUint16(zero[4:6], 0) // GSO size 0
			feedVirtio(s, now, zero)
			if len(got) != 0 || s.Stats().Malformed != 1 {
				t.Errorf("GSO size 0: %d delivered, %d malformed", len(got), s.Stats().Malformed)
			}
			// Segments larger than the MSS this side advertised (1200).
			feedVirtio(s, now, r.super(flagACK, tun.VirtioNeedsCsum, 1300, datagram(9, 1300)[Headroom:], datagram(10, 1300)[Headroom:]))
			if st := c.Stats(); len(got) != 0 || st.DroppedOversize != 2 {
				t.Errorf("oversize: %d delivered, %d dropped", len(got), st.DroppedOversize)
			}
			// A FIN rides the last segment: the others' data comes first.
			dev.take()
			feedVirtio(s, now, r.super(flagACK|flagFIN, tun.VirtioNeedsCsum, 1000, payloads[:3]...))
			if len(got) != 3 || !errors.Is(c.Err(), ErrPeerClosed) {
				t.Errorf("FIN: %d delivered, conn %v", len(got), c.Err())
			}
			// Control segments go out plainly.
			if replies := dev.take(); len(replies) != 1 {
				t.Errorf("%d replies to the FIN", len(replies))
			}
		})
	}
}

// sendRunsOf sends datagrams first..last on c in batches of 32, in runs
// of 1 to 20 datagrams of one size from rng, holding back while the
// peer's queue is long.
func sendRunsOf(c *Conn, peerDev *tuntest.PipeEnd, first, last uint32, rng *rand.Rand, maxSize int) error {
	batch := make([][]byte, 0, 32)
	size, left := 0, 0
	for i := first; i <= last; i++ {
		if left == 0 {
			size, left = 8+rng.IntN(maxSize-7), 1+rng.IntN(20)
		}
		left--
		batch = append(batch, datagram(i, size))
		if len(batch) == cap(batch) || i == last {
			for peerDev.Queued() > 4096 {
				time.Sleep(100 * time.Microsecond)
			}
			if err := c.Send(batch, Headroom); err != nil {
				return fmt.Errorf("sending datagrams up to %d: %w", i, err)
			}
			batch = batch[:0]
		}
	}
	return nil
}

// TestDatagramsBothWaysOffload sends datagrams in runs each way at once,
// with offloads at both ends, at the sender's only and at the
// receiver's only: all arrive intact and in order, the sequence numbers
// follow, and super-segments went where both ends allow them.
func TestDatagramsBothWaysOffload(t *testing.T) {
	const count = 5000
	for _, v6 := range []bool{false, true} {
		for _, off := range [][2]bool{{true, true}, {true, false}, {false, true}} {
			t.Run(fmt.Sprintf("v6=%v/offload=%v", v6, off), func(t *testing.T) {
				p := newPair(t, pairOptions{v6: v6, offload: off})
				if p.a.Offload() != off[0] || p.b.Offload() != off[1] {
					t.Fatalf("offloads: client %v, server %v", p.a.Offload(), p.b.Offload())
				}
				wireA := captureData(p.devA, p.b.LocalAddr())
				crossBothWays(t, p, count, sendRunsOf)
				// The client's packets as written: super-segments where it
				// offloads, each following the one before.
				records, total := wireA(), 0
				for i, r := range records {
					if i > 0 && r.seq != records[i-1].seq+uint32(records[i-1].len) {
						t.Fatalf("packet %d has seq %d, previous %d + %d", i, r.seq, records[i-1].seq, records[i-1].len)
					}
					total += r.len
				}
				cs, ss := p.client.Stats(), p.server.Stats()
				if uint64(total) != cs.BytesSent || cs.BytesSent != ss.BytesReceived || ss.BytesSent != cs.BytesReceived {
					t.Errorf("bytes: %d on the wire, client sent %d, server got %d; server sent %d, client got %d",
						total, cs.BytesSent, ss.BytesReceived, ss.BytesSent, cs.BytesReceived)
				}
				if cs.Ack != ss.Seq || ss.Ack != cs.Seq {
					t.Errorf("after the exchange: client seq %d ack %d, server seq %d ack %d", cs.Seq, cs.Ack, ss.Seq, ss.Ack)
				}
				if o := p.devA.Overflowed() + p.devB.Overflowed(); o != 0 {
					t.Errorf("the pipe overflowed %d times", o)
				}
				t.Logf("client: %d segments in %d packets (%d super-segments); server read %d super-segments whole",
					cs.SegmentsSent, len(records), cs.SuperSegmentsSent, p.b.Stats().SuperSegments)
				if off[0] != (cs.SuperSegmentsSent > 0) || off[0] != (len(records) < count) {
					t.Errorf("client offloads %v: %d super-segments, %d packets for %d datagrams", off[0], cs.SuperSegmentsSent, len(records), count)
				}
				if both := off[0] && off[1]; both != (p.b.Stats().SuperSegments > 0) {
					t.Errorf("offloads %v: the server read %d super-segments whole", off, p.b.Stats().SuperSegments)
				}
			})
		}
	}
}

// TestLossOffload loses 5% of the packets each way between offloading
// ends, a whole run with each lost super-segment: the rest arrive intact
// and in order, and the conn goes on.
func TestLossOffload(t *testing.T) {
	const count = 5000
	p := newPair(t, pairOptions{offload: [2]bool{true, true}})
	atServer := newCollector(count)
	p.server.SetHandler(atServer.handle)
	p.devA.SetFaults(0.05, 0.01, 0.01)
	if err := sendRunsOf(p.client, p.devB, 0, count-1, rand.New(rand.NewPCG(3, 3)), 1400); err != nil {
		t.Fatal(err)
	}
	p.devA.SetFaults(0, 0, 0)
	if err := p.client.Send([][]byte{datagram(count, 100)}, Headroom); err != nil {
		t.Fatal(err)
	}
	atServer.wait(t, "client to server")
	if len(atServer.errs) > 0 {
		t.Fatal(atServer.errs[0])
	}
	if got := len(atServer.indices) - 1; got < count*80/100 || got == count {
		t.Errorf("%d of %d arrived through 5%% loss of runs", got, count)
	}
	if err := p.server.Err(); err != nil {
		t.Errorf("server conn ended: %v", err)
	}
}

// TestSuperSegmentBiggerThanMTU: with offloads the read buffers hold a
// whole super-segment even when Config.MTU is a path's, as a kernel may
// merge segments up to 64 KiB whatever the MTU.
func TestSuperSegmentBiggerThanMTU(t *testing.T) {
	s, _, c, r := drivenStackOn(t, &recordDevice{keep: true, offload: true}, Config{Local: addr4A, MTU: 1500}, netip.AddrPortFrom(addr4B, 40000))
	got := 0
	c.SetHandler(func(batch []Payload) { got += len(batch) })
	var payloads [][]byte
	for i := range 40 {
		payloads = append(payloads, datagram(uint32(i), 1400)[Headroom:])
	}
	feedVirtio(s, drivenEpoch, r.super(flagACK|flagPSH, tun.VirtioNeedsCsum, 1400, payloads...))
	if got != 40 || s.Stats().Malformed != 0 {
		t.Errorf("a 56000-byte super-segment with MTU 1500: %d of 40 datagrams, %d malformed", got, s.Stats().Malformed)
	}
}
