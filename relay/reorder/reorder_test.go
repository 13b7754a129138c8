package reorder

import (
	"encoding/binary"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/relay"
)

func esp(spi, seq uint32) relay.Datagram {
	b := make([]byte, relay.Headroom+64)
	binary.BigEndian.PutUint32(b[relay.Headroom:], spi)
	binary.BigEndian.PutUint32(b[relay.Headroom+4:], seq)
	return relay.Datagram{Buf: b, Off: relay.Headroom, N: 64}
}

// recorder collects the sequence numbers delivered.
type recorder struct {
	mu   sync.Mutex
	seqs []uint32
}

func (r *recorder) deliver(dgs []relay.Datagram) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, d := range dgs {
		r.seqs = append(r.seqs, binary.BigEndian.Uint32(d.Bytes()[4:]))
	}
}

func (r *recorder) got() []uint32 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.seqs)
}

// feed gives b seqs, one at a time: the first from member 1, the rest
// from member 0, so that a gap among them may still come on member 1.
func feed(b *Buffer, now int64, seqs ...uint32) {
	for i, s := range seqs {
		member := 0
		if i == 0 {
			member = 1
		}
		b.Receive(member, []relay.Datagram{esp(7, s)}, now)
	}
}

// feedFrom gives b seqs, one at a time, from member.
func feedFrom(b *Buffer, member int, now int64, seqs ...uint32) {
	for _, s := range seqs {
		b.Receive(member, []relay.Datagram{esp(7, s)}, now)
	}
}

func TestRestoresOrderWhenTheGapFills(t *testing.T) {
	r := &recorder{}
	b := &Buffer{Deliver: r.deliver}
	defer b.Close()
	b.SetHold(time.Second, time.Second)
	now := time.Now().UnixNano()
	feed(b, now, 1, 2, 4, 5, 3, 6, 8, 7)
	if want := []uint32{1, 2, 3, 4, 5, 6, 7, 8}; !slices.Equal(r.got(), want) {
		t.Fatalf("delivered %v, want %v", r.got(), want)
	}
	if s := b.Stats(); s.OutOfOrder != 0 || s.Held != 3 || s.Delivered != 8 {
		t.Fatalf("stats %+v", s)
	}
}

func TestGivesUpAGapAfterItsHold(t *testing.T) {
	r := &recorder{}
	b := &Buffer{Deliver: r.deliver}
	defer b.Close()
	b.SetHold(30*time.Millisecond, 30*time.Millisecond)
	feed(b, time.Now().UnixNano(), 1, 3, 4)
	if got := r.got(); !slices.Equal(got, []uint32{1}) {
		t.Fatalf("delivered %v before the hold passed, want [1]", got)
	}
	deadline := time.Now().Add(2 * time.Second)
	for len(r.got()) < 3 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := r.got(); !slices.Equal(got, []uint32{1, 3, 4}) {
		t.Fatalf("delivered %v, want [1 3 4] once the hold passed", got)
	}
	// 2 comes late after all: it goes, out of order, and is counted.
	feed(b, time.Now().UnixNano(), 2)
	if s := b.Stats(); s.Expired != 1 || s.OutOfOrder != 1 || s.MaxBehind != 2 || s.LateOrRepeat != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// TestHoldLearns: the hold starts at the cap, decays toward what the
// delays ask, and grows again when a gap takes long to fill or a
// datagram comes after its gap was given up.
func TestHoldLearns(t *testing.T) {
	b := &Buffer{Deliver: func([]relay.Datagram) {}}
	defer b.Close()
	ms := time.Millisecond
	b.SetHold(5*ms, 100*ms)
	if h := b.Stats().Hold; h != 100*ms {
		t.Fatalf("hold %v at first, want the cap", h)
	}
	now := time.Now().UnixNano()
	b.mu.Lock()
	b.resizeLocked(now + int64(60*time.Second))
	b.mu.Unlock()
	if h := b.Stats().Hold; h > 10*ms {
		t.Fatalf("hold %v a minute on, want it down near the delays' 5ms", h)
	}
	// A gap that takes 20 ms to fill: the hold covers it half as long again.
	now = time.Now().UnixNano()
	feed(b, now, 1, 3)
	b.Receive(1, []relay.Datagram{esp(7, 2)}, now+int64(20*ms))
	if h := b.Stats().Hold; h < 30*ms || h > 32*ms {
		t.Fatalf("hold %v after a gap took 20ms to fill, want 31ms", h)
	}
}

func TestWithoutHoldItMeasures(t *testing.T) {
	r := &recorder{}
	b := &Buffer{Deliver: r.deliver}
	feed(b, time.Now().UnixNano(), 1, 2, 5, 3, 4, 6)
	if want := []uint32{1, 2, 5, 3, 4, 6}; !slices.Equal(r.got(), want) {
		t.Fatalf("delivered %v, want them as they came", r.got())
	}
	if s := b.Stats(); s.OutOfOrder != 2 || s.MaxBehind != 2 || s.Held != 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestFullBufferGivesUpTheOldestGap(t *testing.T) {
	r := &recorder{}
	b := &Buffer{Deliver: r.deliver}
	defer b.Close()
	b.SetHold(time.Minute, time.Minute)
	now := time.Now().UnixNano()
	feed(b, now, 1)
	for s := uint32(3); s < 3+MaxHeld+1; s++ {
		feedFrom(b, 0, now, s)
	}
	if s := b.Stats(); s.HeldNow != 0 || s.Expired != 1 || len(r.got()) != MaxHeld+2 {
		t.Fatalf("stats %+v, delivered %d", s, len(r.got()))
	}
}

func TestInOrderDoesNotAllocate(t *testing.T) {
	b := &Buffer{Deliver: func([]relay.Datagram) {}}
	defer b.Close()
	b.SetHold(time.Second, time.Second)
	burst := []relay.Datagram{esp(7, 1)}
	seq := uint32(1)
	now := time.Now().UnixNano()
	b.Receive(0, burst, now)
	if n := testing.AllocsPerRun(1000, func() {
		seq++
		binary.BigEndian.PutUint32(burst[0].Bytes()[4:], seq)
		b.Receive(0, burst, now)
	}); n != 0 {
		t.Errorf("%v allocations per in-order datagram", n)
	}
}

// TestGapPassedByEveryMember: a gap that every live member carrying the
// SPI has brought datagrams beyond cannot fill (each member keeps order):
// it is given up at once, not after the hold; a gap that a live member
// may still bring waits for it, and so does one before a member's first
// datagram of the SPI; a member that is not live is not waited for.
func TestGapPassedByEveryMember(t *testing.T) {
	r := &recorder{}
	b := &Buffer{Deliver: r.deliver}
	defer b.Close()
	b.SetHold(time.Minute, time.Minute)
	now := time.Now().Add(-time.Second).UnixNano()
	feedFrom(b, 0, now, 1)
	feedFrom(b, 1, now, 2)
	feedFrom(b, 0, now, 4) // 3 may still come on member 1
	if got := r.got(); !slices.Equal(got, []uint32{1, 2}) {
		t.Fatalf("delivered %v, want [1 2] while member 1 may bring 3", got)
	}
	feedFrom(b, 1, now, 3, 6)               // 5 may still come on member 0
	feedFrom(b, 0, now+int64(passGrace), 7) // it did not: both are past it, it was lost before them
	if got, want := r.got(), []uint32{1, 2, 3, 4, 6, 7}; !slices.Equal(got, want) {
		t.Fatalf("delivered %v, want %v at once", got, want)
	}
	if s := b.Stats(); s.Passed != 1 || s.Expired != 0 || s.OutOfOrder != 0 || s.HeldNow != 0 {
		t.Fatalf("stats %+v", s)
	}
	// Member 1 dies: a gap is no longer waited for on it.
	feedFrom(b, 0, now, 9)
	if got := r.got(); len(got) != 6 {
		t.Fatalf("delivered %v: 9 went while member 1 is live", got)
	}
	b.SetLive(1 << 0)
	if got, want := r.got(), []uint32{1, 2, 3, 4, 6, 7, 9}; !slices.Equal(got, want) {
		t.Fatalf("delivered %v, want %v once member 1 is not live", got, want)
	}
	// Both live again: a new SPI's gap may come as member 1's first of it.
	b.SetLive(1<<0 | 1<<1)
	b.Receive(0, []relay.Datagram{esp(9, 1)}, now)
	b.Receive(0, []relay.Datagram{esp(9, 3)}, now)
	if s := b.Stats(); s.HeldNow != 1 {
		t.Fatalf("a new SPI's gap was not waited for on member 1: %+v", s)
	}
	// A gap both members passed just now waits out the grace, no more.
	now = time.Now().UnixNano()
	b.Receive(0, []relay.Datagram{esp(10, 1)}, now)
	b.Receive(1, []relay.Datagram{esp(10, 3)}, now)
	b.Receive(0, []relay.Datagram{esp(10, 4)}, now)
	if s := b.Stats(); s.HeldNow != 3 {
		t.Fatalf("a gap passed just now went at once: %+v", s)
	}
	deadline := time.Now().Add(2 * time.Second)
	for b.Stats().HeldNow != 1 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if s := b.Stats(); s.HeldNow != 1 || s.Passed != 3 || s.Expired != 0 {
		t.Fatalf("after the grace: %+v", s)
	}
}

// TestBudgetBoundsBuffersTogether: two buffers share a budget of four
// copies. The first fills it; the next datagram it would hold gives up
// its own oldest gap for room. The second, with nothing of its own to give
// up, holds nothing and lets what comes past a gap go at once. Closing
// both gives the budget back.
func TestBudgetBoundsBuffersTogether(t *testing.T) {
	budget := &Budget{Limit: 4 * heldSize}
	ra, rb := &recorder{}, &recorder{}
	a := &Buffer{Deliver: ra.deliver, Budget: budget}
	b := &Buffer{Deliver: rb.deliver, Budget: budget}
	for _, buf := range []*Buffer{a, b} {
		buf.SetHold(time.Minute, time.Minute)
	}
	now := time.Now().UnixNano()
	feed(a, now, 1, 3, 4, 5, 6)
	if got := ra.got(); !slices.Equal(got, []uint32{1}) || budget.Used() != 4*heldSize {
		t.Fatalf("a delivered %v with %d bytes of the budget used, want [1] and all four copies held", got, budget.Used())
	}
	feed(b, now, 1, 3)
	if got, s := rb.got(), b.Stats(); !slices.Equal(got, []uint32{1, 3}) || s.Unheld != 1 || s.HeldNow != 0 {
		t.Fatalf("b delivered %v (%+v): want [1 3], 3 past its gap at once", got, s)
	}
	feedFrom(a, 0, now, 7)
	if got, s := ra.got(), a.Stats(); !slices.Equal(got, []uint32{1, 3, 4, 5, 6, 7}) || s.Expired != 1 || s.HeldNow != 0 {
		t.Fatalf("a delivered %v (%+v): want its gap given up for room", got, s)
	}
	if budget.Used() > 4*heldSize {
		t.Fatalf("%d bytes used, over the budget's %d", budget.Used(), budget.Limit)
	}
	a.Close()
	b.Close()
	if budget.Used() != 0 {
		t.Fatalf("%d bytes still booked after both closed", budget.Used())
	}
	feed(a, now, 10, 12) // a member's burst that raced the close
	if budget.Used() != 0 || a.Stats().HeldNow != 0 {
		t.Fatalf("a closed buffer held %d, booking %d bytes", a.Stats().HeldNow, budget.Used())
	}
}

// BenchmarkReorderTwoMembers: two members alternate, the second a
// datagram behind, so every other datagram waits for a gap to fill.
func BenchmarkReorderTwoMembers(b *testing.B) {
	buf := &Buffer{Deliver: func([]relay.Datagram) {}}
	defer buf.Close()
	buf.SetHold(time.Second, time.Second)
	d := []relay.Datagram{esp(7, 1)}
	now := time.Now().UnixNano()
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		// Pairs arrive swapped: 2 (member 0), 1 (member 1), 4, 3, ...
		seq := uint32(i) + 1
		member := 1
		if i%2 == 0 {
			seq, member = seq+1, 0
		} else {
			seq--
		}
		binary.BigEndian.PutUint32(d[0].Bytes()[4:], seq)
		buf.Receive(member, d, now)
	}
}

func TestHoldFor(t *testing.T) {
	ms := time.Millisecond
	if got := HoldFor([]time.Duration{5 * ms, 25 * ms}, 50*ms); got != 45*ms {
		t.Errorf("5 and 25 ms: %v, want 45ms", got)
	}
	if got := HoldFor([]time.Duration{5 * ms, 500 * ms}, 50*ms); got != 50*ms {
		t.Errorf("capped: %v", got)
	}
	if got := HoldFor([]time.Duration{5 * ms, 25 * ms}, 0); got != 0 {
		t.Errorf("off: %v", got)
	}
}
