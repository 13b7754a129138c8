package sendq

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
)

// ike returns an IKE datagram in port-4500 form (behind the non-ESP
// marker) of n bytes, tagged with seq.
func ike(n int, seq uint32) []byte {
	p := make([]byte, n)
	binary.BigEndian.PutUint32(p[8:], seq)
	return p
}

// esp returns an ESP datagram of n bytes, tagged with seq.
func esp(n int, seq uint32) []byte {
	p := make([]byte, n)
	binary.BigEndian.PutUint32(p, 0x1000)
	binary.BigEndian.PutUint32(p[4:], seq)
	return p
}

func seqOf(p []byte) uint32 {
	if LaneOf(p) == Priority {
		return binary.BigEndian.Uint32(p[8:])
	}
	return binary.BigEndian.Uint32(p[4:])
}

func TestLaneOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    []byte
		want Lane
	}{
		{"IKE", ike(100, 1), Priority},
		{"keepalive", []byte{0xff}, Priority},
		{"control message", framing.AppendControl(nil, framing.ControlPing, make([]byte, framing.ControlPingSize)), Priority},
		{"ESP with SPI 0x1fe", []byte{0, 0, 1, 0xfe, 0, 0, 0, 1}, Bulk},
		{"ESP", esp(100, 1), Bulk},
		{"ESP with a zero byte in its SPI", []byte{0, 0, 0, 1, 0, 0, 0, 1}, Bulk},
		{"short", []byte{0, 0}, Bulk},
	} {
		if got := LaneOf(tc.p); got != tc.want {
			t.Errorf("%s: lane %d, want %d", tc.name, got, tc.want)
		}
	}
}

// TestIKEGoesFirst: IKE queued behind ESP leaves before it, and each lane
// keeps its order.
func TestIKEGoesFirst(t *testing.T) {
	var q Queue
	now := time.Now().UnixNano()
	for i := range uint32(10) {
		q.Push(esp(1400, i), Bulk, now)
	}
	q.Push(ike(300, 100), Priority, now)
	q.Push(ike(300, 101), Priority, now)
	got := q.Pop(nil, 64, 1<<20, now)
	if len(got) != 12 {
		t.Fatalf("popped %d datagrams, want 12", len(got))
	}
	want := []uint32{100, 101, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
	for i, p := range got {
		if seqOf(p) != want[i] {
			t.Fatalf("datagram %d is %d, want %d (order %v)", i, seqOf(p), want[i], want)
		}
	}
	q.Release()
	if !q.Empty() {
		t.Fatal("queue not empty after popping everything")
	}
}

// TestBudgetRefusesTheNewest: over the budget, the newest ESP is refused
// and counted, what waits stays; IKE has its own budget.
func TestBudgetRefusesTheNewest(t *testing.T) {
	q := Queue{Budget: 10 * 1400}
	now := time.Now().UnixNano()
	for i := range uint32(15) {
		v := q.Push(esp(1400, i), Bulk, now)
		if want := i < 10; (v == Queued) != want {
			t.Fatalf("datagram %d: verdict %d, queued want %v", i, v, want)
		}
	}
	if v := q.Push(ike(500, 99), Priority, now); v != Queued {
		t.Fatal("IKE refused because ESP spent its budget")
	}
	if d := q.TakeDrops(); d.Full != 5 || d.Late != 0 {
		t.Fatalf("drops %+v, want 5 full", d)
	}
	if _, bulk := q.Bytes(); bulk != 10*1400 {
		t.Fatalf("bulk bytes %d, want %d", bulk, 10*1400)
	}
	got := q.Pop(nil, 64, 1<<20, now)
	if len(got) != 11 || seqOf(got[0]) != 99 || seqOf(got[1]) != 0 || seqOf(got[10]) != 9 {
		t.Fatalf("popped %d, first %d: want IKE 99 then ESP 0..9", len(got), seqOf(got[0]))
	}
	q.Release()
}

// TestLateESPIsDropped: a queue whose datagrams were late for a moment
// sends them; one that stood for an interval drops its late ESP at the
// head, but not small ESP nor IKE, until a datagram comes out in time;
// one that stood within sixteen intervals drops again at once, and one
// that stood long ago waits for an interval again.
func TestLateESPIsDropped(t *testing.T) {
	const ms = int64(time.Millisecond)
	q := Queue{Target: 5 * time.Millisecond, Interval: 100 * time.Millisecond}
	pop := func(now int64) (seqs []uint32) {
		t.Helper()
		for _, p := range q.Pop(nil, 64, 1<<20, now) {
			seqs = append(seqs, seqOf(p))
		}
		q.Release()
		return seqs
	}
	expect := func(what string, got []uint32, want ...uint32) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: popped %v, want %v", what, got, want)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("%s: popped %v, want %v", what, got, want)
			}
		}
	}
	t0 := time.Now().UnixNano()

	// A moment late: sent.
	q.Push(esp(1400, 1), Bulk, t0)
	expect("late for a moment", pop(t0+10*ms), 1)
	if d := q.TakeDrops(); d.Late != 0 {
		t.Fatalf("dropped %d for a moment's lateness", d.Late)
	}

	// Late ever since, for an interval: the queue stands.
	q.Push(esp(1400, 2), Bulk, t0+100*ms)
	q.Push(esp(100, 3), Bulk, t0+100*ms) // small: a ping
	q.Push(ike(1400, 4), Priority, t0+100*ms)
	q.Push(esp(1400, 5), Bulk, t0+112*ms) // in time
	expect("standing", pop(t0+115*ms), 4, 3, 5)
	if d := q.TakeDrops(); d.Late != 1 {
		t.Fatalf("drops %+v, want 1 late (ESP 2)", d)
	}

	// It stood less than an interval ago: late ESP goes at once.
	q.Push(esp(1400, 6), Bulk, t0+120*ms)
	expect("stood recently", pop(t0+130*ms))
	if d := q.TakeDrops(); d.Late != 1 {
		t.Fatalf("drops %+v, want 1 late (ESP 6)", d)
	}
	q.Push(esp(1400, 7), Bulk, t0+131*ms)
	expect("in time again", pop(t0+132*ms), 7)

	// Sixteen intervals after it last stood, a moment's lateness passes
	// again; within them it would not.
	q.Push(esp(1400, 8), Bulk, t0+1000*ms)
	expect("ten intervals after", pop(t0+1010*ms))
	q.Push(esp(1400, 9), Bulk, t0+1011*ms)
	expect("in time", pop(t0+1012*ms), 9)
	q.Push(esp(1400, 10), Bulk, t0+2700*ms)
	expect("long after", pop(t0+2710*ms), 10)
	if d := q.TakeDrops(); d.Late != 1 {
		t.Fatalf("drops %+v, want 1 (ESP 8, within sixteen intervals)", d)
	}
}

// TestPopBounds: Pop stops at max datagrams and about maxBytes, but
// always returns one if any waits.
func TestPopBounds(t *testing.T) {
	var q Queue
	now := time.Now().UnixNano()
	for i := range uint32(10) {
		q.Push(esp(1000, i), Bulk, now)
	}
	if got := q.Pop(nil, 3, 1<<20, now); len(got) != 3 {
		t.Fatalf("max 3: popped %d", len(got))
	}
	q.Release()
	if got := q.Pop(nil, 64, 2500, now); len(got) != 2 {
		t.Fatalf("maxBytes 2500: popped %d, want 2", len(got))
	}
	q.Release()
	if got := q.Pop(nil, 64, 10, now); len(got) != 1 {
		t.Fatalf("maxBytes 10: popped %d, want 1 (at least one)", len(got))
	}
	q.Release()
	if n := q.Reset(); n != 4 {
		t.Fatalf("Reset dropped %d, want 4", n)
	}
	if !q.Empty() {
		t.Fatal("not empty after Reset")
	}
}

// TestCopiesAreIndependent: what Push took is a copy, what Pop returns
// is exactly it.
func TestCopiesAreIndependent(t *testing.T) {
	var q Queue
	now := time.Now().UnixNano()
	p := esp(777, 7)
	q.Push(p, Bulk, now)
	p[4] = 0xaa
	got := q.Pop(nil, 1, 1<<20, now)
	if len(got) != 1 || len(got[0]) != 777 || seqOf(got[0]) != 7 {
		t.Fatalf("popped %d bytes, seq %d: want the 777 bytes pushed, seq 7", len(got[0]), seqOf(got[0]))
	}
	q.Release()
}

func TestSizeClasses(t *testing.T) {
	for _, tc := range []struct{ n, size int }{{1, 256}, {256, 256}, {257, 512}, {1402, 2048}, {9218, 16384}, {65535, 65536}} {
		b := getBuffer(tc.n)
		if len(*b) != tc.size {
			t.Errorf("getBuffer(%d): %d bytes, want %d", tc.n, len(*b), tc.size)
		}
		putBuffer(b)
	}
	if b := getBuffer(70000); len(*b) != 70000 {
		t.Errorf("getBuffer(70000): %d bytes", len(*b))
	}
}

// TestSteadyStateDoesNotAllocate: once warm, a queue takes and gives
// datagrams without allocating.
func TestSteadyStateDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's sync.Pool drops buffers at random; allocations are checked without -race")
	}
	var delays [2]Histogram
	q := Queue{Delays: &delays}
	p := esp(1400, 1)
	k := ike(200, 2)
	dst := make([][]byte, 0, 64)
	now := time.Now().UnixNano()
	round := func() {
		for range 32 {
			q.Push(p, Bulk, now)
		}
		q.Push(k, Priority, now)
		dst = q.Pop(dst[:0], 64, 1<<20, now)
		q.Release()
	}
	round()
	if a := testing.AllocsPerRun(100, round); a != 0 {
		t.Fatalf("%.1f allocations per round of 33 datagrams", a)
	}
}

func BenchmarkPushPop(b *testing.B) {
	var q Queue
	p := esp(1400, 1)
	dst := make([][]byte, 0, 64)
	now := time.Now().UnixNano()
	b.ReportAllocs()
	b.SetBytes(1400)
	for i := 0; b.Loop(); i++ {
		q.Push(p, Bulk, now)
		if i%32 == 31 {
			dst = q.Pop(dst[:0], 64, 1<<20, now)
			q.Release()
		}
	}
}

// TestRequeue: what a link could not send goes back to the heads of its
// lanes, in order, ahead of what came meanwhile, and keeps its age.
func TestRequeue(t *testing.T) {
	q := Queue{Target: 5 * time.Millisecond, Interval: time.Millisecond}
	t0 := time.Now().UnixNano()
	q.Push(ike(200, 1), Priority, t0)
	for i := range uint32(4) {
		q.Push(esp(1400, 10+i), Bulk, t0)
	}
	got := q.Pop(nil, 64, 1<<20, t0)
	if len(got) != 5 {
		t.Fatalf("popped %d", len(got))
	}
	q.Requeue(3) // ESP 11, 12, 13 unsent
	q.Release()
	q.Push(esp(1400, 20), Bulk, t0+1)
	q.Push(ike(200, 2), Priority, t0+1)
	got = q.Pop(nil, 64, 1<<20, t0+2)
	var seqs []uint32
	for _, p := range got {
		seqs = append(seqs, seqOf(p))
	}
	want := []uint32{2, 11, 12, 13, 20}
	if len(seqs) != len(want) {
		t.Fatalf("popped %v, want %v", seqs, want)
	}
	for i := range want {
		if seqs[i] != want[i] {
			t.Fatalf("popped %v, want %v", seqs, want)
		}
	}
	q.Requeue(4)
	q.Release()
	// Late from now on (the queue starts standing), then an interval on.
	q.Pop(nil, 1, 1<<20, t0+int64(6*time.Millisecond))
	q.Requeue(1)
	got = q.Pop(nil, 64, 1<<20, t0+int64(8*time.Millisecond))
	if len(got) != 0 {
		t.Fatalf("popped %d after they grew late, want 0: requeued ESP keeps its age", len(got))
	}
	if d := q.TakeDrops(); d.Late != 4 {
		t.Fatalf("drops %+v, want 4 late", d)
	}
}

// TestDelaysCounted: a datagram's wait is counted once, when it is sent:
// not when it is popped and put back.
func TestDelaysCounted(t *testing.T) {
	var delays [2]Histogram
	q := Queue{Delays: &delays}
	q.Push(esp(1400, 1), Bulk, 0)
	q.Push(ike(200, 2), Priority, int64(time.Millisecond))
	dst := q.Pop(nil, 8, 1<<20, int64(3*time.Millisecond))
	q.Requeue(len(dst))
	if _, n, _ := delays[Bulk].Snapshot(); n != 0 {
		t.Fatalf("%d waits counted for datagrams put back", n)
	}
	q.Pop(dst[:0], 8, 1<<20, int64(30*time.Millisecond))
	q.Release()
	b, n, sum := delays[Bulk].Snapshot()
	if n != 1 || sum != 30*time.Millisecond || b[8] != 1 { // 25ms < 30ms <= 50ms
		t.Fatalf("ESP: %d waits, sum %v, buckets %v: want one of 30ms, in the bucket up to 50ms", n, sum, b)
	}
	b, n, sum = delays[Priority].Snapshot()
	if n != 1 || sum != 29*time.Millisecond || b[8] != 1 {
		t.Fatalf("IKE: %d waits, sum %v, buckets %v: want one of 29ms", n, sum, b)
	}
	var h Histogram
	h.Observe(int64(time.Hour))
	if b, _, _ := h.Snapshot(); b[len(DelayBounds)] != 1 {
		t.Fatalf("an hour's wait is in %v, want the last bucket", b)
	}
}
