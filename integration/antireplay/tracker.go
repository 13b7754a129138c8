package antireplay

import (
	"net/netip"
	"sync"
	"time"
)

// Reasons a [Verdict] gives; the Stats counters are named after them.
const (
	ReasonAccepted  = "accepted"   // a TCP segment that passed every check
	ReasonNotTCP    = "not_tcp"    // not TCP (or a non-first fragment): not checked, accepted
	ReasonRepeat    = "repeat"     // data segment with the same seq as the previous data segment in its direction
	ReasonBackwards = "backwards"  // data segment more than Window bytes before the highest seq of its direction
	ReasonNoSession = "no_session" // segment of a flow whose SYN the box has not seen (or that expired or was reset)
	ReasonBadFlags  = "bad_flags"  // two or more of SYN, FIN and RST in one segment
	ReasonMalformed = "malformed"  // truncated or inconsistent IP or TCP header
	ReasonTableFull = "table_full" // SYN of a new flow while MaxFlows flows are tracked
)

// Defaults for the zero fields of [Config].
const (
	// DefaultIdleTimeout is how long an established flow lives without
	// traffic: FortiOS's default session TTL.
	DefaultIdleTimeout = time.Hour
	// DefaultClosingTimeout is how long a flow lives without traffic once
	// a FIN was seen, or while its SYN has had no answer.
	DefaultClosingTimeout = 10 * time.Second
	// DefaultMaxFlows bounds the flow table.
	DefaultMaxFlows = 65536
)

// Config configures a [Tracker]. The zero value is strict.
type Config struct {
	// Window is how many bytes a data segment's sequence number may lie
	// before the highest one seen in its direction (reordering allowed).
	// 0 is strict: every data segment must start at or after the highest
	// sequence number seen so far. A segment that repeats the previous
	// data segment's sequence number is dropped whatever the window.
	Window uint32
	// AcceptMidstream lets segments of flows whose SYN the box did not see
	// through and starts tracking them there. False, the default, is a
	// stateful firewall: such segments are dropped as "no_session".
	AcceptMidstream bool
	// IdleTimeout ends an established flow after this long without
	// traffic (0: DefaultIdleTimeout). Later segments are "no_session".
	IdleTimeout time.Duration
	// ClosingTimeout ends, after this long without traffic, a flow that
	// has seen a FIN or whose SYN was never answered (0:
	// DefaultClosingTimeout). Segments after a FIN pass, checked as
	// before, until then.
	ClosingTimeout time.Duration
	// MaxFlows bounds how many flows are tracked (0: DefaultMaxFlows). A
	// new SYN beyond it is dropped as "table_full" unless expired flows
	// make room.
	MaxFlows int
}

// Verdict is the Tracker's answer for one packet.
type Verdict struct {
	Accept bool
	// Reason is one of the Reason constants.
	Reason string
}

// Stats counts a Tracker's verdicts by reason.
type Stats struct {
	Accepted         uint64 // TCP segments accepted
	NotTCP           uint64 // other packets, accepted unchecked
	DroppedRepeat    uint64
	DroppedBackwards uint64
	DroppedNoSession uint64
	DroppedBadFlags  uint64
	DroppedMalformed uint64
	DroppedTableFull uint64
	// Flows is how many flows the table holds now (expired ones included
	// until the next sweep).
	Flows int
}

// Dropped is the total of every drop counter.
func (s Stats) Dropped() uint64 {
	return s.DroppedRepeat + s.DroppedBackwards + s.DroppedNoSession + s.DroppedBadFlags + s.DroppedMalformed + s.DroppedTableFull
}

// Map returns the counters keyed "accepted", "not_tcp" and "dropped_"
// followed by a drop reason.
func (s Stats) Map() map[string]uint64 {
	return map[string]uint64{
		ReasonAccepted:               s.Accepted,
		ReasonNotTCP:                 s.NotTCP,
		"dropped_" + ReasonRepeat:    s.DroppedRepeat,
		"dropped_" + ReasonBackwards: s.DroppedBackwards,
		"dropped_" + ReasonNoSession: s.DroppedNoSession,
		"dropped_" + ReasonBadFlags:  s.DroppedBadFlags,
		"dropped_" + ReasonMalformed: s.DroppedMalformed,
		"dropped_" + ReasonTableFull: s.DroppedTableFull,
	}
}

// Tracker checks TCP sequence numbers flow by flow. It is pure: the caller
// passes the time with every packet, and it does no I/O. Its methods are
// safe for concurrent use.
//
// Rules, per flow (the 4-tuple; its two directions are checked each on its
// own, with the sequence numbers of that direction):
//   - A SYN (without ACK) starts the flow, or restarts it if the 4-tuple is
//     tracked already. The SYN-ACK (re)starts the answering direction.
//   - A segment of a flow the table does not hold is dropped as
//     "no_session", unless Config.AcceptMidstream.
//   - A data segment (TCP payload > 0) is dropped as "repeat" when its
//     seq equals that of the previous accepted data segment in its
//     direction, and as "backwards" when it lies more than Config.Window
//     bytes before the highest seq accepted in its direction (SYN or
//     data; sequence-number arithmetic, so the 32-bit space wraps).
//   - Segments without payload (pure ACKs, keepalives, window probes) are
//     never dropped for their seq and do not move the reference.
//   - SYN, FIN and RST together (any two) are dropped as "bad_flags".
//   - An RST ends the flow at once; a FIN makes it expire after
//     Config.ClosingTimeout without traffic.
//
// Dropped segments change no state, so a replay cannot move a flow.
type Tracker struct {
	cfg Config // defaults filled in; read-only

	mu        sync.Mutex // guards everything below
	flows     map[flowKey]flow
	nextSweep time.Time
	stats     Stats
}

// flowKey names a flow by its two endpoints in a fixed order (the lesser
// first), so that both directions find the same entry.
type flowKey struct {
	a, b netip.AddrPort
}

// flow is one tracked TCP flow. dir[0] is the direction from key.a to
// key.b, dir[1] the other.
type flow struct {
	dir      [2]direction
	lastSeen time.Time
}

// direction is what the tracker knows about one direction of a flow.
type direction struct {
	seen     bool   // a segment in this direction was accepted: highest is set
	hasData  bool   // a data segment was accepted: lastData is set
	fin      bool   // a FIN was accepted
	highest  uint32 // highest seq of an accepted SYN or data segment (or the first segment's seq)
	lastData uint32 // seq of the last accepted data segment
}

// NewTracker returns a Tracker with cfg's zero fields set to the defaults.
func NewTracker(cfg Config) *Tracker {
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.ClosingTimeout <= 0 {
		cfg.ClosingTimeout = DefaultClosingTimeout
	}
	if cfg.MaxFlows <= 0 {
		cfg.MaxFlows = DefaultMaxFlows
	}
	return &Tracker{cfg: cfg, flows: make(map[flowKey]flow)}
}

// Config returns the configuration in force, defaults filled in.
func (t *Tracker) Config() Config { return t.cfg }

// Stats returns the counters so far.
func (t *Tracker) Stats() Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.stats
	s.Flows = len(t.flows)
	return s
}

// Check decides on one packet, an IPv4 or IPv6 packet starting with its IP
// header, seen at now. The packet may be truncated after the TCP header:
// the payload length is taken from the IP header. Check does not keep pkt.
func (t *Tracker) Check(now time.Time, pkt []byte) Verdict {
	seg, res := parseTCP(pkt)
	t.mu.Lock()
	defer t.mu.Unlock()
	switch res {
	case parseNotTCP:
		return t.count(ReasonNotTCP)
	case parseMalformed:
		return t.count(ReasonMalformed)
	}
	if !now.Before(t.nextSweep) {
		t.sweepLocked(now)
	}
	return t.count(t.checkLocked(now, &seg))
}

// TCP flag bits.
const (
	FlagFIN = 0x01
	FlagSYN = 0x02
	FlagRST = 0x04
	FlagPSH = 0x08
	FlagACK = 0x10
)

func (t *Tracker) checkLocked(now time.Time, seg *tcpSegment) string {
	n := 0
	for _, f := range [...]uint8{FlagSYN, FlagFIN, FlagRST} {
		if seg.flags&f != 0 {
			n++
		}
	}
	if n > 1 {
		return ReasonBadFlags
	}
	key, d := makeKey(seg.src, seg.dst)
	fl, ok := t.flows[key]
	if ok && t.expired(&fl, now) {
		delete(t.flows, key)
		ok = false
	}
	syn, ack := seg.flags&FlagSYN != 0, seg.flags&FlagACK != 0
	if syn && !ack {
		if !ok && len(t.flows) >= t.cfg.MaxFlows {
			t.sweepLocked(now)
			if len(t.flows) >= t.cfg.MaxFlows {
				return ReasonTableFull
			}
		}
		fl = flow{lastSeen: now}
		fl.dir[d] = direction{seen: true, highest: seg.seq}
		t.flows[key] = fl
		return ReasonAccepted
	}
	if !ok {
		if !t.cfg.AcceptMidstream {
			return ReasonNoSession
		}
		if seg.flags&FlagRST != 0 {
			return ReasonAccepted // nothing to end
		}
		if len(t.flows) >= t.cfg.MaxFlows {
			t.sweepLocked(now)
			if len(t.flows) >= t.cfg.MaxFlows {
				return ReasonTableFull
			}
		}
		fl = flow{}
	}
	if seg.flags&FlagRST != 0 {
		delete(t.flows, key)
		return ReasonAccepted
	}
	h := &fl.dir[d]
	switch {
	case syn: // SYN-ACK: the answering direction starts
		*h = direction{seen: true, highest: seg.seq}
	case seg.payload > 0:
		if h.hasData && seg.seq == h.lastData {
			return ReasonRepeat
		}
		if h.seen && seqBefore(seg.seq, h.highest) && h.highest-seg.seq > t.cfg.Window {
			return ReasonBackwards
		}
		if !h.seen || seqBefore(h.highest, seg.seq) {
			h.highest = seg.seq
		}
		h.seen, h.hasData, h.lastData = true, true, seg.seq
	case !h.seen:
		h.seen, h.highest = true, seg.seq
	}
	if seg.flags&FlagFIN != 0 {
		h.fin = true
	}
	fl.lastSeen = now
	t.flows[key] = fl
	return ReasonAccepted
}

// count records a verdict for reason and returns it.
func (t *Tracker) count(reason string) Verdict {
	s := &t.stats
	switch reason {
	case ReasonAccepted:
		s.Accepted++
		return Verdict{Accept: true, Reason: reason}
	case ReasonNotTCP:
		s.NotTCP++
		return Verdict{Accept: true, Reason: reason}
	case ReasonRepeat:
		s.DroppedRepeat++
	case ReasonBackwards:
		s.DroppedBackwards++
	case ReasonNoSession:
		s.DroppedNoSession++
	case ReasonBadFlags:
		s.DroppedBadFlags++
	case ReasonMalformed:
		s.DroppedMalformed++
	case ReasonTableFull:
		s.DroppedTableFull++
	}
	return Verdict{Reason: reason}
}

// expired reports whether fl has outlived its timeout at now.
func (t *Tracker) expired(fl *flow, now time.Time) bool {
	timeout := t.cfg.IdleTimeout
	if fl.dir[0].fin || fl.dir[1].fin || !fl.dir[0].seen || !fl.dir[1].seen {
		timeout = t.cfg.ClosingTimeout
	}
	return now.Sub(fl.lastSeen) > timeout
}

// sweepLocked removes expired flows and schedules the next sweep.
func (t *Tracker) sweepLocked(now time.Time) {
	for k, fl := range t.flows {
		if t.expired(&fl, now) {
			delete(t.flows, k)
		}
	}
	interval := min(t.cfg.ClosingTimeout, t.cfg.IdleTimeout) / 2
	t.nextSweep = now.Add(max(interval, time.Millisecond))
}

// seqBefore reports whether a comes before b in TCP sequence-number
// arithmetic (RFC 9293 section 3.4): within 2^31 behind it.
func seqBefore(a, b uint32) bool { return int32(a-b) < 0 }

// makeKey orders the endpoints and returns the index of the direction
// src -> dst in flow.dir.
func makeKey(src, dst netip.AddrPort) (flowKey, int) {
	if src.Compare(dst) <= 0 {
		return flowKey{src, dst}, 0
	}
	return flowKey{dst, src}, 1
}
