package aggregate

import (
	"encoding/binary"
	"math"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
)

func esp(spi uint32) []byte {
	b := make([]byte, 64)
	binary.BigEndian.PutUint32(b, spi)
	binary.BigEndian.PutUint32(b[4:], 1)
	return b
}

func members(now int64, weights ...int) []*Member {
	var ms []*Member
	for i, w := range weights {
		m := &Member{Index: uint8(i), Weight: w}
		m.Start(now)
		ms = append(ms, m)
	}
	return ms
}

func spread(s *Scheduler, ms []*Member, dg []byte, now int64, n int) []int {
	got := make([]int, len(ms)+1)
	for range n {
		got[s.Pick(ms, dg, now)+1]++
	}
	return got[1:]
}

func TestAlgorithmsSpread(t *testing.T) {
	now := time.Now().UnixNano()
	dg := esp(0xc0000001)
	if got := spread(&Scheduler{Algorithm: RoundRobin}, members(now, 1, 1), dg, now, 1000); got[0] != 500 || got[1] != 500 {
		t.Errorf("round-robin: %v, want 500/500", got)
	}
	if got := spread(&Scheduler{Algorithm: Weighted}, members(now, 3, 1), dg, now, 1000); got[0] != 750 || got[1] != 250 {
		t.Errorf("weighted 3:1: %v, want 750/250", got)
	}
	if got := spread(&Scheduler{Algorithm: Redundant}, members(now, 1, 1, 1), dg, now, 1000); got[0] != 1000 {
		t.Errorf("redundant: %v, want all on the first", got)
	}
	// IKE keeps to the first live member whatever the algorithm.
	ike := make([]byte, framing.MarkerSize+28)
	if got := spread(&Scheduler{Algorithm: RoundRobin}, members(now, 1, 1), ike, now, 10); got[0] != 10 {
		t.Errorf("IKE under round-robin: %v, want all on the first", got)
	}
}

func TestRendezvousKeepsSAsAndMovesOnlyTheDeadOnes(t *testing.T) {
	now := time.Now().UnixNano()
	ms := members(now, 1, 1, 1)
	s := &Scheduler{Algorithm: L4}
	where := map[uint32]int{}
	used := map[int]int{}
	for spi := uint32(0xc0000000); spi < 0xc0000000+300; spi++ {
		i := s.Pick(ms, esp(spi), now)
		for range 5 {
			if j := s.Pick(ms, esp(spi), now); j != i {
				t.Fatalf("SPI %#x went to %d, then %d", spi, i, j)
			}
		}
		where[spi] = i
		used[i]++
	}
	if len(used) != 3 || used[0] < 60 || used[1] < 60 || used[2] < 60 {
		t.Errorf("300 SAs over 3 members: %v", used)
	}
	ms[1].Stop()
	for spi, i := range where {
		j := s.Pick(ms, esp(spi), now)
		if i != 1 && j != i {
			t.Errorf("SPI %#x moved from live member %d to %d", spi, i, j)
		}
		if j == 1 {
			t.Errorf("SPI %#x stayed on the stopped member", spi)
		}
	}
}

func TestLivenessFollowsProbes(t *testing.T) {
	t0 := time.Now().UnixNano()
	m := &Member{}
	if m.Live(t0) {
		t.Fatal("live before Start")
	}
	m.Start(t0)
	ms := []*Member{m}
	s := &Scheduler{Algorithm: RoundRobin}
	if s.Pick(ms, esp(1), t0+int64(DeadAfter)-1) != 0 {
		t.Fatal("not live within DeadAfter of Start")
	}
	if s.Pick(ms, esp(1), t0+int64(DeadAfter)) != -1 {
		t.Fatal("still live DeadAfter after its last answer")
	}
	p := m.NextProbe(t0 + int64(DeadAfter))
	at := t0 + int64(DeadAfter) + int64(30*time.Millisecond)
	if !m.Answered(p, at) {
		t.Fatal("an answer after DeadAfter did not bring it back")
	}
	if m.Answered(p, at) {
		t.Fatal("the same answer counted twice")
	}
	if !m.Live(at) || m.RTT() != 30*time.Millisecond {
		t.Fatalf("live %v rtt %v, want live and 30ms", m.Live(at), m.RTT())
	}
	forged := framing.Probe{Seq: p.Seq + 1, Clock: p.Clock}
	if m.Answered(forged, at) {
		t.Fatal("an answer to a probe never sent was taken")
	}
}

func TestLossCountsUnansweredProbes(t *testing.T) {
	t0 := time.Now().UnixNano()
	m := &Member{}
	m.Start(t0)
	now := t0
	for i := range 20 {
		p := m.NextProbe(now)
		if i%4 != 0 {
			m.Answered(p, now+int64(time.Millisecond))
		}
		now += int64(ProbeInterval)
	}
	if got := m.Loss(now + int64(DeadAfter)); math.Abs(got-0.25) > 1e-9 {
		t.Errorf("loss %v, want 0.25", got)
	}
}

func TestLeastLatencyPrefersWhereItArrivesFirst(t *testing.T) {
	now := time.Now().UnixNano()
	ms := members(now, 1, 1)
	ms[0].srtt.Store(int64(40 * time.Millisecond))
	ms[1].srtt.Store(int64(10 * time.Millisecond))
	q := 0
	ms[1].Backlog = func() (int, uint64) { return q, 1 << 20 } // 1 MiB/s
	s := &Scheduler{Algorithm: LeastLatency}
	if i := s.Pick(ms, esp(1), now); i != 1 {
		t.Fatalf("picked %d with nothing queued, want the faster member", i)
	}
	q = 64 << 10 // 62.5 ms of queue at 1 MiB/s
	if i := s.Pick(ms, esp(1), now); i != 0 {
		t.Fatalf("picked %d behind 64 KiB of queue, want the idle slower member", i)
	}
}

func TestPickDoesNotAllocate(t *testing.T) {
	now := time.Now().UnixNano()
	ms := members(now, 3, 1)
	dg := esp(7)
	for _, a := range []Algorithm{RoundRobin, Weighted, Redundant, L3, L4, LeastLatency} {
		s := &Scheduler{Algorithm: a}
		if n := testing.AllocsPerRun(1000, func() { s.Pick(ms, dg, now) }); n != 0 {
			t.Errorf("%v: %v allocations per pick", a, n)
		}
	}
}

func TestParseAlgorithm(t *testing.T) {
	for _, a := range []Algorithm{RoundRobin, Weighted, Redundant, L3, L4, LeastLatency} {
		if got, err := ParseAlgorithm(a.String()); err != nil || got != a {
			t.Errorf("%v: %v %v", a, got, err)
		}
	}
	if _, err := ParseAlgorithm("wrr"); err == nil {
		t.Error("wrr parsed")
	}
}
