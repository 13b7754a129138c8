// Package reorder restores the order of ESP that an aggregate's members
// delivered out of order, before it reaches the IKE daemon, whose
// anti-replay window drops what arrives too far behind the newest.
//
// A Buffer sits where an aggregate's datagrams leave for the daemon (one
// per IKE SA and direction). It tracks, per ESP SPI, the next sequence
// number it expects. A datagram with that number goes at once, with any
// held ones that follow it; one from beyond a gap is copied and held
// until the gap fills or its hold time passes, whichever comes first; the
// hold is bounded in time, not in packets, and sized from the members'
// measured one-way delay difference, and from how long gaps took to fill
// (it starts at the cap and learns), with a cap (SetHold). Datagrams
// that are not ESP, or come behind the expected number (late, or
// repeated), go at once: the daemon decides. In-order traffic passes
// without a copy or a hand-off to another goroutine; a timer releases
// what waited too long.
//
// A Buffer also measures what it delivers: how many ESP datagrams left
// behind a higher sequence number of their SPI (out of order, as the
// daemon sees them) and how far behind the newest at most, which is the
// anti-replay window the daemon needs (strongSwan's replay_window).
package reorder

import (
	"encoding/binary"
	"sync"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
)

const (
	// MaxHeld bounds the datagrams held at once; past it, the oldest
	// gap is given up.
	MaxHeld = 512
	// maxSPIs bounds the SPIs tracked; the least recently seen makes room.
	maxSPIs = 16
	// heldSize is the size of a held datagram's copy, headroom included,
	// unless the datagram needs more; maxFree bounds the copies kept for
	// reuse, so an idle buffer holds at most maxFree*heldSize.
	heldSize = 2048
	maxFree  = 64
)

// Buffer restores ESP order for one direction of one aggregate. Its zero
// value holds nothing until SetHold; Deliver must be set before use.
type Buffer struct {
	// Deliver hands datagrams on to the daemon, in order. It is called
	// with the buffer's lock held, from Receive's caller or the timer,
	// and must not keep the datagrams.
	Deliver func(dgs []relay.Datagram)

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
	spis      [maxSPIs]spiState
	held      []heldDG // in arrival order
	free      [][]byte
	out       []relay.Datagram
	done      [][]byte // held copies delivered in this call, to free after Deliver
	timer     *time.Timer
	armed     int64 // unix ns the timer fires at; 0: not armed
	stats     Stats
}

type spiState struct {
	spi     uint32
	next    uint32 // the next sequence number expected
	highest uint32 // the highest delivered
	seen    int64  // unix ns, for eviction
	used    bool
	// The last gap given up, [skipFrom, skipTo), and when: a datagram of
	// it that comes after all says how much longer it needed.
	skipFrom, skipTo uint32
	skippedAt        int64
}

type heldDG struct {
	st       *spiState
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
	Expired      uint64        // gaps given up when their hold time passed (or the buffer filled)
	OutOfOrder   uint64        // ESP delivered behind a higher sequence number of its SPI
	MaxBehind    uint32        // the farthest behind the highest that one was delivered
	HeldNow      int
	LateOrRepeat uint64 // ESP that came behind the expected number
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
// number at now: if its gap was given up, the hold was short by the
// time since.
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
	s.Hold, s.HeldNow = b.hold, len(b.held)
	return s
}

// Receive takes a burst of datagrams that came from the aggregate's
// members and delivers them, and whatever they release, in order.
func (b *Buffer) Receive(burst []relay.Datagram, now int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, d := range burst {
		p := d.Bytes()
		if framing.Classify(p) != framing.KindESP || len(p) < 8 {
			b.out = append(b.out, d)
			continue
		}
		spi, seq := binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])
		st := b.stateLocked(spi, seq, now)
		if int32(seq-st.next) > 0 && b.hold > 0 && len(b.held) >= MaxHeld {
			b.skipGapLocked(b.held[0].st) // full: the oldest gap is given up
		}
		switch {
		case seq == st.next:
			b.emitLocked(st, d, seq)
			b.filling = now
			b.releaseNextLocked(st)
			b.filling = 0
		case int32(seq-st.next) > 0 && b.hold > 0:
			b.holdLocked(st, p, seq, now)
		case int32(seq-st.next) > 0: // not holding: a gap the daemon sees
			b.emitLocked(st, d, seq)
		default:
			b.stats.LateOrRepeat++
			b.lateLocked(st, seq, now)
			b.emitLocked(st, d, seq)
		}
	}
	b.flushLocked()
	b.armLocked(now)
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
	if oldest.used {
		b.releaseLocked(func(h *heldDG) bool { return h.st == oldest })
	}
	*oldest = spiState{spi: spi, next: seq, highest: seq - 1, seen: now, used: true}
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

// holdLocked keeps a copy of p until the gap before it fills.
func (b *Buffer) holdLocked(st *spiState, p []byte, seq uint32, now int64) {
	for i := range b.held {
		if h := &b.held[i]; h.st == st && h.seq == seq {
			b.stats.LateOrRepeat++ // a repeat of one held: the daemon would drop it
			return
		}
	}
	var buf []byte
	if n := len(b.free); n > 0 && len(b.free[n-1]) >= relay.Headroom+len(p) {
		buf, b.free = b.free[n-1], b.free[:n-1]
	} else {
		buf = make([]byte, max(heldSize, relay.Headroom+len(p)))
	}
	copy(buf[relay.Headroom:], p)
	b.held = append(b.held, heldDG{st: st, seq: seq, at: now, deadline: now + int64(b.hold), buf: buf, n: len(p)})
	b.stats.Held++
}

// releaseNextLocked delivers the held datagrams of st that now follow in
// order.
func (b *Buffer) releaseNextLocked(st *spiState) {
	for {
		i := b.findLocked(st, st.next)
		if i < 0 {
			return
		}
		b.takeLocked(i)
	}
}

func (b *Buffer) findLocked(st *spiState, seq uint32) int {
	for i := range b.held {
		if b.held[i].st == st && b.held[i].seq == seq {
			return i
		}
	}
	return -1
}

// takeLocked delivers held datagram i.
func (b *Buffer) takeLocked(i int) {
	h := b.held[i]
	b.held = append(b.held[:i], b.held[i+1:]...)
	if now := b.filling; now != 0 {
		// Its gap filled after it waited this long: a hold half as long
		// again covers the next.
		if need := time.Duration(now-h.at)*3/2 + time.Millisecond; need > b.learned && need <= 2*b.limit {
			b.learned, b.learnedAt = need, now
			b.resizeLocked(now)
		}
	}
	b.emitLocked(h.st, relay.Datagram{Buf: h.buf, Off: relay.Headroom, N: h.n}, h.seq)
	b.done = append(b.done, h.buf)
}

// skipGapLocked gives up st's gap: the lowest held datagram of st becomes
// the next expected, and what follows it in order goes.
func (b *Buffer) skipGapLocked(st *spiState) {
	low, found := uint32(0), false
	for _, h := range b.held {
		if h.st == st && (!found || int32(h.seq-low) < 0) {
			low, found = h.seq, true
		}
	}
	if !found {
		return
	}
	b.stats.Expired++
	st.skipFrom, st.skipTo, st.skippedAt = st.next, low, time.Now().UnixNano()
	st.next = low
	b.releaseNextLocked(st)
}

// releaseLocked gives up the gaps of every SPI with a held datagram
// that match says.
func (b *Buffer) releaseLocked(match func(*heldDG) bool) {
	for {
		var st *spiState
		for i := range b.held {
			if match(&b.held[i]) {
				st = b.held[i].st
				break
			}
		}
		if st == nil {
			return
		}
		b.skipGapLocked(st)
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
		}
	}
	clear(b.done)
	b.done = b.done[:0]
}

// armLocked sets the timer for the earliest deadline held.
func (b *Buffer) armLocked(now int64) {
	if len(b.held) == 0 {
		return
	}
	first := b.held[0].deadline
	for _, h := range b.held[1:] {
		first = min(first, h.deadline)
	}
	if b.armed != 0 && b.armed <= first {
		return
	}
	b.armed = first
	d := time.Duration(max(first-now, 0))
	if b.timer == nil {
		b.timer = time.AfterFunc(d, b.expire)
	} else {
		b.timer.Reset(d)
	}
}

// expire gives up the gaps whose datagrams waited their hold time.
func (b *Buffer) expire() {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now().UnixNano()
	b.armed = 0
	b.releaseLocked(func(h *heldDG) bool { return h.deadline <= now })
	b.flushLocked()
	b.armLocked(now)
}

// Close stops the timer and drops what is held.
func (b *Buffer) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.timer != nil {
		b.timer.Stop()
	}
	b.held = b.held[:0]
}

// DefaultMax is the default cap of the hold time.
const DefaultMax = 50 * time.Millisecond

// Status returns the buffer's figures for Status.
func (b *Buffer) Status() relay.ReorderStatus {
	s := b.Stats()
	return relay.ReorderStatus{
		HoldMs: float64(s.Hold.Microseconds()) / 1000, Delivered: s.Delivered, Held: s.Held, Expired: s.Expired,
		OutOfOrder: s.OutOfOrder, MaxBehind: s.MaxBehind,
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
