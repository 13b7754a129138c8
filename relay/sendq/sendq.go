// Package sendq is the queue in front of a link: what waits while the
// link cannot send, in bytes rather than datagrams, in two lanes.
//
// IKE (and iketcp's control messages, and anything else behind the
// non-ESP marker) goes in the priority lane: it leaves before any ESP and
// is never dropped for being late, so that DPD and rekeys survive a link
// that ESP saturates. ESP goes in the bulk lane, which holds at most
// Budget bytes (the newest is refused beyond that) and is kept short as
// CoDel (RFC 8289) keeps a queue short: a burst, or a scheduler that
// leaves the link's writer waiting a few milliseconds, passes untouched;
// a standing queue, one whose datagrams have all waited longer than
// Target for a whole Interval, is drained by dropping at the head every
// datagram that waited longer than Target, until one did not. A queue
// that stood within the last sixteen intervals drops again at once. Small ESP datagrams (pings,
// TCP acknowledgements, DNS: what users feel) are never dropped for
// being late, as a carrier's byte-limited queue lets them in where a
// full-sized one does not fit.
//
// A Queue copies what it takes, into pooled buffers of a size class near
// the datagram's: nothing queues while the link keeps up, and then
// nothing is copied. A Queue is not safe for concurrent use: its link's
// lock guards it.
package sendq

import (
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
)

// Defaults of a Queue's zero fields.
const (
	DefaultBudget         = 2 << 20
	DefaultTarget         = 5 * time.Millisecond
	DefaultInterval       = 100 * time.Millisecond
	DefaultPriorityBudget = 1 << 20
	// SmallESP is the largest ESP datagram exempt from the late drop.
	SmallESP = 256
)

// Lane says which lane a datagram waits in.
type Lane uint8

const (
	Bulk     Lane = iota // ESP
	Priority             // IKE, control messages, keepalives
)

// LaneOf returns the lane of a datagram in port-4500 form: ESP's SPI is
// never 0, so four zero bytes in front are the non-ESP marker; iketcp's
// control messages carry the reserved SPI framing.ControlSPI, so that a
// liveness probe is not held up behind a full ESP lane.
func LaneOf(p []byte) Lane {
	if len(p) >= framing.MarkerSize && p[0]|p[1]|p[2] == 0 && (p[3] == 0 || p[3] == framing.ControlSPI) ||
		len(p) == 1 && p[0] == framing.KeepaliveByte {
		return Priority
	}
	return Bulk
}

// Verdict is what Push did with a datagram.
type Verdict uint8

const (
	Queued Verdict = iota
	Full           // refused: the lane's budget is spent
)

// Drops counts what a Queue dropped, for its owner to add to its
// counters.
type Drops struct {
	Full uint64 // refused by a spent budget (Push)
	Late uint64 // ESP dropped at the head of a standing queue (Pop)
}

// Queue is the queue in front of one link. Its zero value is ready, with
// the defaults.
type Queue struct {
	// Budget bounds the bytes of ESP waiting; PriorityBudget bounds the
	// bytes of IKE waiting, which a link that works never comes near.
	Budget, PriorityBudget int
	// Target is how long ESP may wait in a standing queue, and Interval
	// how long a queue must stand before its late ESP is dropped.
	Target, Interval time.Duration

	// Delays, if set, is where the time each datagram waited is counted
	// once it is sent, by lane.
	Delays *[2]Histogram

	prio, bulk ring
	popped     []entry // what the last Pop returned, until Release
	poppedAt   int64   // when
	drops      Drops

	// The late drop's state, in unix ns.
	aboveSince  int64 // since when every datagram dequeued was late; 0: the last was not
	dropping    bool  // the queue stands: late datagrams are dropped
	droppedLast int64 // when the queue last stopped standing
}

type entry struct {
	buf  *[]byte // pooled; the datagram is (*buf)[:n]
	n    int
	at   int64 // unix ns it was queued
	lane Lane
}

func (q *Queue) budget() int {
	if q.Budget > 0 {
		return q.Budget
	}
	return DefaultBudget
}

func (q *Queue) priorityBudget() int {
	if q.PriorityBudget > 0 {
		return q.PriorityBudget
	}
	return DefaultPriorityBudget
}

func (q *Queue) target() int64 {
	if q.Target > 0 {
		return int64(q.Target)
	}
	return int64(DefaultTarget)
}

func (q *Queue) interval() int64 {
	if q.Interval > 0 {
		return int64(q.Interval)
	}
	return int64(DefaultInterval)
}

// late decides, as the head of the bulk lane leaves at now after waiting
// since at, whether it is dropped: the queue must have stood (every
// datagram late) for an interval, or have stood within the last sixteen
// intervals, as CoDel resumes dropping.
func (q *Queue) late(at, now int64) bool {
	if now-at <= q.target() {
		q.aboveSince = 0
		if q.dropping {
			q.dropping, q.droppedLast = false, now
		}
		return false
	}
	if !q.dropping {
		if q.aboveSince == 0 {
			q.aboveSince = now
		}
		stood := now-q.aboveSince >= q.interval()
		again := q.droppedLast != 0 && now-q.droppedLast < 16*q.interval()
		q.dropping = stood || again
	}
	return q.dropping
}

// Empty reports whether nothing waits.
func (q *Queue) Empty() bool { return q.prio.len() == 0 && q.bulk.len() == 0 }

// Bytes returns the bytes waiting in each lane.
func (q *Queue) Bytes() (priority, bulk int) { return q.prio.bytes, q.bulk.bytes }

// Push queues a copy of p in lane at time now (unix ns), unless the lane's
// budget is spent.
func (q *Queue) Push(p []byte, lane Lane, now int64) Verdict {
	r, budget := &q.bulk, q.budget()
	if lane == Priority {
		r, budget = &q.prio, q.priorityBudget()
	}
	if r.bytes+len(p) > budget {
		q.drops.Full++
		return Full
	}
	buf := getBuffer(len(p))
	copy(*buf, p)
	r.push(entry{buf: buf, n: len(p), at: now, lane: lane})
	return Queued
}

// Pop takes what is to be sent next, at time now, up to max datagrams and
// about maxBytes (at least one datagram if any waits): the priority lane
// first, then the bulk lane, whose late datagrams it drops on the way
// once the queue stands (see the package doc). It
// appends them to dst and returns it; they stay valid until Release.
func (q *Queue) Pop(dst [][]byte, max, maxBytes int, now int64) [][]byte {
	q.poppedAt = now
	bytes := 0
	for len(dst) < max && q.prio.len() > 0 && (bytes == 0 || bytes+q.prio.peek().n <= maxBytes) {
		e := q.prio.pop()
		bytes += e.n
		q.popped = append(q.popped, e)
		dst = append(dst, (*e.buf)[:e.n])
	}
	for len(dst) < max && q.bulk.len() > 0 {
		head := q.bulk.peek()
		if head.n > SmallESP && q.late(head.at, now) {
			putBuffer(q.bulk.pop().buf)
			q.drops.Late++
			continue
		}
		if bytes > 0 && bytes+head.n > maxBytes {
			break
		}
		e := q.bulk.pop()
		bytes += e.n
		q.popped = append(q.popped, e)
		dst = append(dst, (*e.buf)[:e.n])
	}
	return dst
}

// Requeue puts the last n datagrams of the last Pop back at the heads of
// their lanes, in order, as they were: the link could not send them yet.
// Their buffers stay theirs (Release skips them); the slices Pop returned
// for them must not be used again.
func (q *Queue) Requeue(n int) {
	for i := len(q.popped) - 1; i >= len(q.popped)-n && i >= 0; i-- {
		e := q.popped[i]
		r := &q.bulk
		if e.lane == Priority {
			r = &q.prio
		}
		r.pushFront(e)
		q.popped[i] = entry{}
	}
	q.popped = q.popped[:max(len(q.popped)-n, 0)]
}

// Release returns the buffers of the last Pop to the pool: their
// datagrams are sent.
func (q *Queue) Release() {
	for i, e := range q.popped {
		if q.Delays != nil {
			q.Delays[e.lane].Observe(q.poppedAt - e.at)
		}
		putBuffer(e.buf)
		q.popped[i] = entry{}
	}
	q.popped = q.popped[:0]
}

// Reset drops everything waiting (the link is gone) and releases the
// last Pop; it returns how many datagrams were waiting.
func (q *Queue) Reset() int {
	q.Release()
	n := q.prio.len() + q.bulk.len()
	for _, r := range []*ring{&q.prio, &q.bulk} {
		for r.len() > 0 {
			e := r.pop()
			putBuffer(e.buf)
		}
		*r = ring{}
	}
	q.popped = nil
	return n
}

// TakeDrops returns what the queue dropped since the last call.
func (q *Queue) TakeDrops() Drops {
	d := q.drops
	q.drops = Drops{}
	return d
}

// DelayBounds are the upper bounds of a Histogram's buckets; a last
// bucket takes what is longer.
var DelayBounds = [...]time.Duration{
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond,
}

// Histogram counts how long datagrams waited, in the buckets of
// DelayBounds. It is safe for concurrent use and never allocates.
type Histogram struct {
	buckets [len(DelayBounds) + 1]atomic.Uint64 // not cumulative
	sum     atomic.Int64                        // ns
}

// Observe counts one datagram that waited ns nanoseconds.
func (h *Histogram) Observe(ns int64) {
	i := 0
	for i < len(DelayBounds) && ns > int64(DelayBounds[i]) {
		i++
	}
	h.buckets[i].Add(1)
	h.sum.Add(ns)
}

// Snapshot returns the count of each bucket (the last: longer than every
// bound), the total count, and the sum of the waits.
func (h *Histogram) Snapshot() (buckets [len(DelayBounds) + 1]uint64, count uint64, sum time.Duration) {
	for i := range h.buckets {
		buckets[i] = h.buckets[i].Load()
		count += buckets[i]
	}
	return buckets, count, time.Duration(h.sum.Load())
}

// ring is a FIFO of entries that grows by doubling.
type ring struct {
	buf     []entry
	head, n int
	bytes   int
}

func (r *ring) len() int     { return r.n }
func (r *ring) peek() *entry { return &r.buf[r.head] }
func (r *ring) push(e entry) {
	r.grow()
	r.buf[(r.head+r.n)%len(r.buf)] = e
	r.n++
	r.bytes += e.n
}

func (r *ring) pushFront(e entry) {
	r.grow()
	r.head = (r.head - 1 + len(r.buf)) % len(r.buf)
	r.buf[r.head] = e
	r.n++
	r.bytes += e.n
}

func (r *ring) grow() {
	if r.n < len(r.buf) {
		return
	}
	grown := make([]entry, max(16, 2*len(r.buf)))
	for i := range r.n {
		grown[i] = r.buf[(r.head+i)%len(r.buf)]
	}
	r.buf, r.head = grown, 0
}

func (r *ring) pop() entry {
	e := r.buf[r.head]
	r.buf[r.head] = entry{}
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	r.bytes -= e.n
	return e
}

// Buffers come in power-of-two size classes from 256 bytes to 64 KiB,
// each with its pool.
const (
	minClassShift = 8
	numClasses    = 17 - minClassShift
)

var pools [numClasses]sync.Pool

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuffer returns a buffer of at least n bytes.
func getBuffer(n int) *[]byte {
	c := classOf(n)
	if c >= numClasses {
		b := make([]byte, n)
		return &b
	}
	if b, ok := pools[c].Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 1<<(c+minClassShift))
	return &b
}

func putBuffer(b *[]byte) {
	c := classOf(cap(*b))
	if c < numClasses && cap(*b) == 1<<(c+minClassShift) {
		*b = (*b)[:cap(*b)]
		pools[c].Put(b)
	}
}
