// Package reorder restores the order of ESP that an aggregate's members
// delivered out of order, before it reaches the IKE daemon, whose
// anti-replay window drops what arrives too far behind the newest.
//
// A Buffer sits where an aggregate's datagrams leave for the daemon (one
// per IKE SA and direction). It tracks, per ESP SPI, the next sequence
// number it expects. A datagram with that number goes at once, with any
// held ones that follow it; one from beyond a gap is copied and held
// until the gap fills, or is known never to fill, or its hold time
// passes, whichever comes first. Datagrams that are not ESP, or come
// behind the expected number (late, or repeated), go at once: the daemon
// decides. In-order traffic passes without a copy or a hand-off to
// another goroutine; a timer releases what waited too long.
//
// A gap is known never to fill once every live member that carries ESP
// has brought a datagram of the SPI from beyond it: a member is one TCP-like
// link, so what it carries comes in the order it was sent, and the far
// end sends each SPI's datagrams on its members in the order the daemon
// numbered them. Such a gap was lost before the members (or on a member
// that died): it is given up after a short grace (Stats.Passed), for
// what the far end's daemon itself swapped. A gap that some live
// member may still bring waits, for at most the hold time: bounded in
// time, not in packets, sized from the members' measured one-way delay
// difference and from how long gaps took to fill (it starts at the cap
// and learns), with a cap (SetHold). MaxHeld bounds the datagrams one
// Buffer holds, and a Budget shared by several (a server's) the memory
// their copies take together.
//
// A Buffer also measures what it delivers: how many ESP datagrams left
// behind a higher sequence number of their SPI (out of order, as the
// daemon sees them) and how far behind the newest at most, which is the
// anti-replay window the daemon needs (strongSwan's replay_window).
package reorder

import (
	"encoding/binary"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
)

const (
	// MaxHeld bounds the datagrams held at once, over every SPI; past it,
	// the gap of the SPI whose held datagram waited longest is given up.
	MaxHeld = 4096
	// MaxMembers is the most members a Buffer tells apart: Receive's
	// member is below it.
	MaxMembers = 16
	// maxSPIs bounds the SPIs tracked; the least recently seen makes room.
	maxSPIs = 16
	// heldSize is the size of a held datagram's copy, headroom included,
	// unless the datagram needs more; maxFree bounds the copies kept for
	// reuse, so an idle buffer holds at most maxFree*heldSize.
	heldSize = 2048
	maxFree  = 64
	// passGrace is how long a gap that every member is past still waits:
	// what the far end's daemon or its reader swapped by a little comes
	// within it.
	passGrace = 3 * time.Millisecond
)

// Budget bounds the memory that the held copies of several Buffers take
// together (a server's, whichever clients its aggregates serve): a Buffer
// that finds it spent holds no more, and what it would have held goes to
// the daemon at once, a gap the daemon sees. Its zero value has no room;
// a nil *Budget bounds nothing.
type Budget struct {
	Limit int64 // bytes
	used  atomic.Int64
}

// take books n bytes, if there is room.
func (g *Budget) take(n int) bool {
	if g == nil {
		return true
	}
	if g.used.Add(int64(n)) > g.Limit {
		g.used.Add(-int64(n))
		return false
	}
	return true
}

// give returns n bytes.
func (g *Budget) give(n int) {
	if g != nil {
		g.used.Add(-int64(n))
	}
}

// Used is how many bytes the Buffers hold now.
func (g *Budget) Used() int64 { return g.used.Load() }

// Buffer restores ESP order for one direction of one aggregate. Its zero
// value holds nothing until SetHold; Deliver must be set before use.
type Buffer struct {
	// Deliver hands datagrams on to the daemon, in order. It is called
	// with the buffer's lock held, from Receive's caller or the timer,
	// and must not keep the datagrams.
	Deliver func(dgs []relay.Datagram)
	// Budget, if set before use, bounds the held copies of this and
	// other Buffers together: every copy it makes, held or kept for
	// reuse, counts.
	Budget *Budget

	mu    sync.Mutex // guards the following
	hold  time.Duration
	limit time.Duration // the cap SetHold was given
	// learned is the hold that what arrived lately asked for: it starts
	// at the cap, grows to cover a gap that took long to fill (half as
	// long again) or a datagram that came after its gap was given up, and
	// decays by a sixteenth a second toward what the delays ask.
	learned   time.Duration
	learnedAt int64
	started   bool
	filling   int64         // while a gap fills: now, for takeLocked; else 0
	sized     time.Duration // what the delays asked for at the last SetHold
	dead      uint32        // members not live, by bit (SetLive)
	carried   uint32        // members that brought ESP, by bit
	spis      [maxSPIs]spiState
	nheld     int
	free      [][]byte
	out       []relay.Datagram
	done      [][]byte // held copies delivered in this call, to free after Deliver
	timer     *time.Timer
	armed     int64 // unix ns the timer fires at; 0: not armed
	closed    bool
	stats     Stats
}

type spiState struct {
	spi     uint32
	next    uint32 // the next sequence number expected
	highest uint32 // the highest delivered
	seen    int64  // unix ns, for eviction
	used    bool
	// The last gap given up for its hold time, [skipFrom, skipTo), and
	// when: a datagram of it that comes after all says how much longer it
	// needed.
	skipFrom, skipTo uint32
	skippedAt        int64
	held             []heldDG // beyond next, by sequence number
	// via is the highest sequence number each member brought, by bit of
	// carried.
	via     [MaxMembers]uint32
	carried uint32
}

type heldDG struct {
	seq      uint32
	at       int64 // unix ns it came
	deadline int64
	buf      []byte
	n        int
}

// Stats are what a Buffer counted.
type Stats struct {
	Hold         time.Duration // the hold time now
	Delivered    uint64        // ESP datagrams delivered
	Held         uint64        // ESP datagrams held for a while
	Expired      uint64        // gaps given up when their hold time passed (or the buffer, or its Budget, filled)
	Passed       uint64        // gaps given up because every live member had brought what followed them
	OutOfOrder   uint64        // ESP delivered behind a higher sequence number of its SPI
	MaxBehind    uint32        // the farthest behind the highest that one was delivered
	HeldNow      int
	LateOrRepeat uint64 // ESP that came behind the expected number
	Unheld       uint64 // ESP that went past a gap at once: the Budget was spent
}

// SetHold sets how long a datagram may wait for a gap before it, as the
// members' delays ask, at most limit: 0 turns holding off (what waits
// goes at once). What late datagrams taught the buffer since (a gap
// given up too soon) raises it up to limit.
func (b *Buffer) SetHold(d, limit time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now().UnixNano()
	b.sized, b.limit = max(d, 0), max(limit, 0)
	if !b.started && b.limit > 0 && b.sized > 0 {
		b.started = true
		b.learned, b.learnedAt = b.limit, now // until the paths have shown what they need
	}
	b.resizeLocked(now)
	if b.hold == 0 {
		b.releaseLocked(func(*heldDG) bool { return true })
		b.flushLocked()
	}
}

// SetLive says which members are live, by bit (member i is 1<<i): a gap
// waits only for live members. Until the first call, every member is.
func (b *Buffer) SetLive(members uint32) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.dead = ^members
	b.releasePassedLocked(time.Now().UnixNano())
	b.flushLocked()
}

// resizeLocked sets the hold from what the delays ask and what was
// learned.
func (b *Buffer) resizeLocked(now int64) {
	if b.limit == 0 || b.sized == 0 {
		b.hold = 0
		return
	}
	if b.learned > 0 {
		b.learned = max(b.learned-time.Duration(float64(b.learned)/16*float64(now-b.learnedAt)/float64(time.Second)), 0)
		b.learnedAt = now
	}
	b.hold = min(max(b.sized, b.learned), b.limit)
}

// lateLocked learns from a datagram of st that came behind the expected
// number at now: if its gap was given up for its hold time, the hold was
// short by the time since.
func (b *Buffer) lateLocked(st *spiState, seq uint32, now int64) {
	if st.skippedAt == 0 || int32(seq-st.skipFrom) < 0 || int32(seq-st.skipTo) >= 0 {
		return
	}
	need := b.hold + time.Duration(now-st.skippedAt) + time.Millisecond
	if need > 2*b.limit {
		return // no hold within the cap would have done: a member that was cut off, come back with what it held
	}
	if need > b.learned {
		b.learned, b.learnedAt = need, now
		b.resizeLocked(now)
	}
}

// Stats returns what the buffer counted.
func (b *Buffer) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.stats
	s.Hold, s.HeldNow = b.hold, b.nheld
	return s
}

// Receive takes a burst of datagrams that member (below MaxMembers)
// brought, in the order it brought them, and delivers them, and whatever
// they release, in order.
func (b *Buffer) Receive(member int, burst []relay.Datagram, now int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	bit := uint32(1) << (uint(member) % MaxMembers)
	for _, d := range burst {
		p := d.Bytes()
		if framing.Classify(p) != framing.KindESP || len(p) < 8 {
			b.out = append(b.out, d)
			continue
		}
		spi, seq := binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])
		st := b.stateLocked(spi, seq, now)
		b.carried |= bit
		if m := uint(member) % MaxMembers; st.carried&bit == 0 || int32(seq-st.via[m]) > 0 {
			st.via[m] = seq
			st.carried |= bit
		}
		if int32(seq-st.next) > 0 && b.hold > 0 && b.nheld >= MaxHeld {
			b.skipGapLocked(b.longestWaitingLocked(), now) // full
		}
		switch {
		case seq == st.next:
			b.emitLocked(st, d, seq)
			b.filling = now
			b.releaseNextLocked(st)
			b.filling = 0
		case int32(seq-st.next) > 0 && b.hold > 0:
			if !b.holdLocked(st, p, seq, now) {
				b.stats.Unheld++
				b.emitLocked(st, d, seq)
				b.releaseNextLocked(st)
			}
		case int32(seq-st.next) > 0: // not holding: a gap the daemon sees
			b.emitLocked(st, d, seq)
		default:
			b.stats.LateOrRepeat++
			b.lateLocked(st, seq, now)
			b.emitLocked(st, d, seq)
		}
	}
	if b.nheld > 0 {
		b.releasePassedLocked(now)
	}
	b.flushLocked()
}

// stateLocked returns the state of spi, starting it at seq if new.
func (b *Buffer) stateLocked(spi, seq uint32, now int64) *spiState {
	var oldest *spiState
	for i := range b.spis {
		st := &b.spis[i]
		if st.used && st.spi == spi {
			st.seen = now
			return st
		}
		if oldest == nil || !st.used || oldest.used && st.seen < oldest.seen {
			oldest = st
		}
	}
	for len(oldest.held) > 0 {
		b.skipGapLocked(oldest, 0)
	}
	held := oldest.held[:0]
	*oldest = spiState{spi: spi, next: seq, highest: seq - 1, seen: now, used: true, held: held}
	return oldest
}

// emitLocked adds d to what goes now, and measures its order.
func (b *Buffer) emitLocked(st *spiState, d relay.Datagram, seq uint32) {
	b.out = append(b.out, d)
	b.stats.Delivered++
	if behind := st.highest - seq; int32(behind) > 0 {
		b.stats.OutOfOrder++
		b.stats.MaxBehind = max(b.stats.MaxBehind, behind)
	} else {
		st.highest = seq
	}
	if int32(seq+1-st.next) > 0 {
		st.next = seq + 1
	}
}

// holdLocked keeps a copy of p until the gap before it fills. It reports
// false when p is to go now: the Budget is spent and nothing held here
// can be given up for room, or giving up room gave up p's own gap.
func (b *Buffer) holdLocked(st *spiState, p []byte, seq uint32, now int64) bool {
	i := sort.Search(len(st.held), func(i int) bool { return int32(st.held[i].seq-seq) >= 0 })
	if i < len(st.held) && st.held[i].seq == seq {
		b.stats.LateOrRepeat++ // a repeat of one held: the daemon would drop it
		return true
	}
	buf := b.copyLocked(len(p), now)
	if buf == nil {
		return false
	}
	if int32(seq-st.next) <= 0 { // making room gave up st's own gap: seq goes now
		b.free = append(b.free, buf)
		return false
	}
	i = sort.Search(len(st.held), func(i int) bool { return int32(st.held[i].seq-seq) >= 0 })
	copy(buf[relay.Headroom:], p)
	h := heldDG{seq: seq, at: now, deadline: now + int64(b.hold), buf: buf, n: len(p)}
	st.held = append(st.held, heldDG{})
	copy(st.held[i+1:], st.held[i:])
	st.held[i] = h
	b.nheld++
	b.stats.Held++
	if b.armed == 0 || h.deadline < b.armed {
		b.armLocked(h.deadline, now)
	}
	return true
}

// copyLocked returns a buffer for a held copy of n bytes: one kept for
// reuse, or a new one if the Budget has room, or, when it has none, one
// freed by giving up the gap that waited longest here. Nil: nothing here
// to give up.
func (b *Buffer) copyLocked(n int, now int64) []byte {
	if b.closed {
		return nil // what comes after Close is not held: nothing would give its copy back
	}
	for {
		if k := len(b.free); k > 0 && len(b.free[k-1]) >= relay.Headroom+n {
			buf := b.free[k-1]
			b.free = b.free[:k-1]
			return buf
		}
		if size := max(heldSize, relay.Headroom+n); b.Budget.take(size) {
			return make([]byte, size)
		}
		if b.nheld == 0 {
			return nil
		}
		b.skipGapLocked(b.longestWaitingLocked(), now)
		b.flushLocked() // what the gap released goes, and its copies are free for reuse
	}
}

// releaseNextLocked delivers the held datagrams of st that now follow in
// order.
func (b *Buffer) releaseNextLocked(st *spiState) {
	for len(st.held) > 0 && st.held[0].seq == st.next {
		b.takeLocked(st)
	}
}

// takeLocked delivers st's first held datagram.
func (b *Buffer) takeLocked(st *spiState) {
	h := st.held[0]
	copy(st.held, st.held[1:])
	st.held[len(st.held)-1] = heldDG{}
	st.held = st.held[:len(st.held)-1]
	b.nheld--
	if now := b.filling; now != 0 {
		// Its gap filled after it waited this long: a hold half as long
		// again covers the next.
		if need := time.Duration(now-h.at)*3/2 + time.Millisecond; need > b.learned && need <= 2*b.limit {
			b.learned, b.learnedAt = need, now
			b.resizeLocked(now)
		}
	}
	b.emitLocked(st, relay.Datagram{Buf: h.buf, Off: relay.Headroom, N: h.n}, h.seq)
	b.done = append(b.done, h.buf)
}

// skipGapLocked gives up st's gap: its lowest held datagram becomes the
// next expected, and what follows it in order goes. at, if not 0, is when
// the gap was given up for its hold time, to learn from what of it comes
// late.
func (b *Buffer) skipGapLocked(st *spiState, at int64) {
	if st == nil || len(st.held) == 0 {
		return
	}
	low := st.held[0].seq
	if at != 0 {
		b.stats.Expired++
		st.skipFrom, st.skipTo, st.skippedAt = st.next, low, at
	}
	st.next = low
	b.releaseNextLocked(st)
}

// passedLocked reports whether every live member that carries ESP has
// brought a datagram of st from beyond its gap: nothing of the gap can
// come. A member that has carried other SPIs but not st yet may still
// bring the gap as its first.
func (b *Buffer) passedLocked(st *spiState) bool {
	waitFor := b.carried &^ b.dead
	if waitFor == 0 {
		return false // no live member carries ESP: the hold decides
	}
	for m := range MaxMembers {
		if waitFor&(1<<m) != 0 && (st.carried&(1<<m) == 0 || int32(st.via[m]-st.next) <= 0) {
			return false
		}
	}
	return true
}

// releasePassedLocked gives up every gap that cannot fill and waited
// passGrace, and sets the timer for those that wait still.
func (b *Buffer) releasePassedLocked(now int64) {
	for i := range b.spis {
		st := &b.spis[i]
		for len(st.held) > 0 && b.passedLocked(st) {
			if at := st.held[0].at + int64(passGrace); at > now {
				if b.armed == 0 || at < b.armed {
					b.armLocked(at, now)
				}
				break
			}
			b.stats.Passed++
			b.skipGapLocked(st, 0)
		}
	}
}

// longestWaitingLocked returns the SPI whose held datagram came first.
func (b *Buffer) longestWaitingLocked() *spiState {
	var first *spiState
	var at int64
	for i := range b.spis {
		for _, h := range b.spis[i].held {
			if first == nil || h.at < at {
				first, at = &b.spis[i], h.at
			}
		}
	}
	return first
}

// releaseLocked gives up, for their hold time, the gaps of every SPI
// with a held datagram that match says.
func (b *Buffer) releaseLocked(match func(*heldDG) bool) {
	now := time.Now().UnixNano()
	for i := range b.spis {
		st := &b.spis[i]
		for {
			found := false
			for k := range st.held {
				if match(&st.held[k]) {
					found = true
					break
				}
			}
			if !found {
				break
			}
			b.skipGapLocked(st, now)
		}
	}
}

// flushLocked delivers what goes now and frees the held copies among it.
func (b *Buffer) flushLocked() {
	if len(b.out) > 0 {
		b.Deliver(b.out)
	}
	clear(b.out)
	b.out = b.out[:0]
	for _, buf := range b.done {
		if len(b.free) < maxFree {
			b.free = append(b.free, buf)
		} else {
			b.Budget.give(len(buf))
		}
	}
	clear(b.done)
	b.done = b.done[:0]
}

// armLocked sets the timer to fire at the unix ns deadline.
func (b *Buffer) armLocked(deadline, now int64) {
	b.armed = deadline
	d := time.Duration(max(deadline-now, 0))
	if b.timer == nil {
		b.timer = time.AfterFunc(d, b.expire)
	} else {
		b.timer.Reset(d)
	}
}

// expire gives up the gaps whose datagrams waited their hold time, and
// sets the timer for the next deadline.
func (b *Buffer) expire() {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now().UnixNano()
	b.armed = 0
	b.releaseLocked(func(h *heldDG) bool { return h.deadline <= now })
	b.releasePassedLocked(now)
	b.flushLocked()
	var first int64
	for i := range b.spis {
		for _, h := range b.spis[i].held {
			if first == 0 || h.deadline < first {
				first = h.deadline
			}
		}
	}
	if first != 0 && (b.armed == 0 || first < b.armed) {
		b.armLocked(first, now)
	}
}

// Close stops the timer and drops what is held; what comes after goes at
// once.
func (b *Buffer) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	if b.timer != nil {
		b.timer.Stop()
	}
	for i := range b.spis {
		for _, h := range b.spis[i].held {
			b.Budget.give(len(h.buf))
		}
		clear(b.spis[i].held)
		b.spis[i].held = b.spis[i].held[:0]
	}
	for _, buf := range b.free {
		b.Budget.give(len(buf))
	}
	b.free = nil
	b.nheld = 0
}

// DefaultMax is the default cap of the hold time.
const DefaultMax = 200 * time.Millisecond

// Status returns the buffer's figures for Status.
func (b *Buffer) Status() relay.ReorderStatus {
	s := b.Stats()
	return relay.ReorderStatus{
		HoldMs: float64(s.Hold.Microseconds()) / 1000, Delivered: s.Delivered, Held: s.Held, Expired: s.Expired,
		Passed: s.Passed, OutOfOrder: s.OutOfOrder, MaxBehind: s.MaxBehind,
	}
}

// Limit turns a configured cap into the one to use: zero means
// DefaultMax, negative means off.
func Limit(configured time.Duration) time.Duration {
	switch {
	case configured == 0:
		return DefaultMax
	case configured < 0:
		return 0
	}
	return configured
}

// HoldFor returns the hold time for members whose one-way delays are
// oneWay (their measured round trips halved; zero for unmeasured): the
// difference between the slowest and the fastest, twice over (a queue
// that grows between two probes adds to it), plus a margin of 5 ms for
// scheduling, at most limit. Zero limit turns holding off.
func HoldFor(oneWay []time.Duration, limit time.Duration) time.Duration {
	if limit <= 0 {
		return 0
	}
	lo, hi := time.Duration(-1), time.Duration(0)
	for _, d := range oneWay {
		if d <= 0 {
			continue
		}
		if lo < 0 || d < lo {
			lo = d
		}
		hi = max(hi, d)
	}
	if lo < 0 {
		return min(5*time.Millisecond, limit)
	}
	return min(2*(hi-lo)+5*time.Millisecond, limit)
}
