package faketcp

import (
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// The allocation tests need a build without the race detector, which
// allocates.

var families = [][2]netip.Addr{{addr4B, addr4A}, {addr6B, addr6A}}

// TestSendDoesNotAllocate checks a Send batch in steady state, for both
// families and sequence modes, with and without offloads (runs of
// equal-sized datagrams and a shorter one, written as super-segments).
func TestSendDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, addrs := range families {
		for _, mode := range []SeqMode{SeqLive, SeqFrozen} {
			for _, offload := range []bool{false, true} {
				dev := &recordDevice{keep: true, offload: offload}
				_, _, c, _ := drivenStackOn(t, dev, Config{Local: addrs[0], Seq: mode}, netip.AddrPortFrom(addrs[1], 40000))
				dev.mu.Lock()
				dev.keep = false
				dev.mu.Unlock()
				bufs := make([][]byte, 32)
				for i := range bufs {
					bufs[i] = datagram(uint32(i), 1400-100*(i/10))
				}
				allocs := testing.AllocsPerRun(200, func() {
					openSendWindow(c)
					if err := c.Send(bufs, Headroom); err != nil {
						panic(err)
					}
				})
				if d := c.Stats().DroppedWindow; d > 0 {
					t.Errorf("%v %v offload %v: the window dropped %d datagrams: the check measured the wrong path", addrs[0], mode, offload, d)
				}
				if allocs != 0 {
					t.Errorf("%v %v offload %v: %v allocations per Send of 32 datagrams", addrs[0], mode, offload, allocs)
				}
				if st := c.Stats(); offload && mode == SeqLive && st.SuperSegmentsSent == 0 {
					t.Errorf("%v offload: no super-segment sent", addrs[0])
				}
			}
		}
	}
}

// TestReceiveDoesNotAllocate checks the receive path in steady state: a
// batch of data segments for a conn with a handler, a keepalive probe
// that gets an answer, a stranger's SYN that gets a SYN cookie, and a
// stranger's segment with a bad cookie that gets an RST.
func TestReceiveDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, addrs := range families {
		s, dev, c, r := drivenStack(t, Config{Local: addrs[0]}, netip.AddrPortFrom(addrs[1], 40000))
		dev.mu.Lock()
		dev.keep = false
		dev.mu.Unlock()
		delivered := 0
		c.SetHandler(func(batch []Payload) { delivered += len(batch) })
		var pkts [][]byte
		for i := range 6 {
			pkts = append(pkts, r.segment(flagACK|flagPSH, datagram(uint32(i), 1400)[Headroom:]))
		}
		r.seq--
		pkts = append(pkts, r.segment(flagACK, nil)) // a keepalive probe
		r.seq++
		stranger := remoteEnd{hdr: newHeaders(netip.AddrPortFrom(addrs[1], 40001), netip.AddrPortFrom(addrs[0], testPort), 0), seq: 5, ack: 9}
		pkts = append(pkts, stranger.segment(flagACK|flagPSH, []byte("who")))
		pkts = append(pkts, stranger.syn(makeSYNOptions(1400, true, false)))
		for k, p := range pkts {
			s.rx.sizes[k] = copy(s.rx.bufs[k][Headroom:], p)
		}
		now := time.Now()
		writesBefore := dev.writes
		runs := 0
		allocs := testing.AllocsPerRun(200, func() {
			s.processBatch(len(pkts), now)
			runs++
		})
		if allocs != 0 {
			t.Errorf("%v: %v allocations per batch of %d segments", addrs[0], allocs, len(pkts))
		}
		// Each run answers the keepalive and the stranger's two segments;
		// the very first also acknowledges the conn's first data at once
		// (windowShown).
		if delivered != 6*runs || dev.writes-writesBefore != 3*runs+1 {
			t.Errorf("%v: %d runs delivered %d payloads and wrote %d replies", addrs[0], runs, delivered, dev.writes-writesBefore)
		}
		if st := s.Stats(); st.Conns != 1 || st.SYNCookies != uint64(runs)+1 || st.BadCookies != uint64(runs) {
			t.Errorf("%v: %d runs, stack %+v", addrs[0], runs, st)
		}
	}
}

// TestReceiveSuperSegmentsDoNotAllocate checks the receive path with
// offloads in steady state: a batch of super-segments, as the kernel
// hands them to an offloading device, cut into more datagrams than a
// batch's buffers, for a conn with a handler.
func TestReceiveSuperSegmentsDoNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, addrs := range families {
		dev := &recordDevice{keep: true, offload: true}
		s, _, c, r := drivenStackOn(t, dev, Config{Local: addrs[0], MTU: 65535}, netip.AddrPortFrom(addrs[1], 40000))
		dev.mu.Lock()
		dev.keep = false
		dev.mu.Unlock()
		delivered := 0
		c.SetHandler(func(batch []Payload) { delivered += len(batch) })
		payloads := make([][]byte, 40)
		for i := range payloads {
			payloads[i] = datagram(uint32(i), 1400)[Headroom:]
		}
		var pkts [][]byte
		for range 4 {
			pkts = append(pkts, r.super(flagACK|flagPSH, tun.VirtioNeedsCsum, 1400, payloads...))
		}
		for k, p := range pkts {
			s.rx.sizes[k] = copy(s.rx.bufs[k][Headroom-tun.VirtioNetHdrLen:], p) - tun.VirtioNetHdrLen
		}
		now := time.Now()
		runs := 0
		allocs := testing.AllocsPerRun(200, func() {
			s.processBatch(len(pkts), now)
			runs++
		})
		if allocs != 0 {
			t.Errorf("%v: %v allocations per batch of %d super-segments", addrs[0], allocs, len(pkts))
		}
		if delivered != runs*len(pkts)*len(payloads) || s.Stats().SuperSegments != uint64(runs*len(pkts)) {
			t.Errorf("%v: %d runs delivered %d datagrams, %d super-segments", addrs[0], runs, delivered, s.Stats().SuperSegments)
		}
	}
}

// TestPipeDoesNotAllocate sends batches from one stack to the other over
// the pipe and waits for the handler to have them all: no allocation in
// steady state anywhere, the stacks' goroutines and the pipe included;
// with offloads, the batches move as super-segments.
func TestPipeDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	for _, v6 := range []bool{false, true} {
		for _, offload := range []bool{false, true} {
			t.Run(fmt.Sprintf("v6=%v/offload=%v", v6, offload), func(t *testing.T) {
				checkPipeAllocs(t, v6, offload)
			})
		}
	}
}

// checkPipeAllocs is one case of TestPipeDoesNotAllocate.
func checkPipeAllocs(t *testing.T, v6, offload bool) {
	p := newPair(t, pairOptions{v6: v6, offload: [2]bool{offload, offload}})
	var received, target atomic.Int64
	arrived := make(chan struct{}, 1)
	p.server.SetHandler(func(batch []Payload) {
		if received.Add(int64(len(batch))) >= target.Load() {
			select {
			case arrived <- struct{}{}:
			default:
			}
		}
	})
	bufs := make([][]byte, 32)
	for i := range bufs {
		bufs[i] = datagram(uint32(i), 1400)
	}
	allocs := testing.AllocsPerRun(300, func() {
		target.Add(int64(len(bufs)))
		if err := p.client.Send(bufs, Headroom); err != nil {
			panic(err)
		}
		for received.Load() < target.Load() {
			<-arrived
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per batch of 32 sent and received", allocs)
	}
	if offload && p.b.Stats().SuperSegments == 0 {
		t.Error("no super-segment arrived")
	}
}
