package faketcp

import (
	"fmt"
	"math"
	"time"
)

// connState is where a connection is in its (simplified) TCP life. A
// listener's conn has no half-open state (no SYN_RECEIVED): the listener
// answers a SYN with a SYN cookie and keeps nothing, and the conn starts
// ESTABLISHED when the cookie comes back (see cookie.go).
type connState uint8

const (
	stateClosed      connState = iota // forgotten, or never opened
	stateSynSent                      // Dial sent a SYN, waits for the SYN-ACK
	stateEstablished                  // data flows
	// The closing states: the connection has ended for its user (Done is
	// closed), and the stack keeps its 4-tuple for a short linger to
	// answer the peer's FIN and absorb stragglers, as FIN_WAIT, LAST_ACK
	// and TIME_WAIT do, without their timers.
	stateFinWait  // we sent a FIN, the peer has not
	stateLastAck  // the peer sent a FIN, we answered with ours
	stateTimeWait // both FINs are done
)

var stateNames = [...]string{
	stateClosed:      "CLOSED",
	stateSynSent:     "SYN_SENT",
	stateEstablished: "ESTABLISHED",
	stateFinWait:     "FIN_WAIT",
	stateLastAck:     "LAST_ACK",
	stateTimeWait:    "TIME_WAIT",
}

func (s connState) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Timing constants of the state machine that Config does not set.
const (
	// synRetry is how often Dial's unanswered SYN is sent again. A
	// listener never sends its SYN-ACK again: the peer's SYN, sent again,
	// gets one answer each time.
	synRetry = time.Second
	// delayedACK is the longest received data waits for an ACK when the
	// connection sends nothing itself; Linux's delayed-ACK ceiling.
	delayedACK = 200 * time.Millisecond
	// linger is how long a closed connection's 4-tuple is kept to answer
	// the peer's FIN and absorb its stragglers.
	linger = 2 * time.Second
	// deadAfter is how many keepalive intervals of silence end a
	// connection: probes go out after 1, 2 and 3.
	deadAfter = 4
)

// tcbConfig is what a state machine is told when it is made.
type tcbConfig struct {
	mode             SeqMode
	mss              uint16 // the MSS this side advertises, and the largest payload it accepts
	maxSendMSS       uint16 // the largest payload one IP packet of this family can carry
	defaultPeerMSS   uint16 // the peer's MSS when its SYN has none
	window           uint16 // the window field of every segment
	keepAlive        time.Duration
	handshakeTimeout time.Duration
}

// emit is a segment without payload that the state machine wants sent;
// flags 0 means none.
type emit struct {
	flags    uint8
	seq, ack uint32
	// synOptions: a SYN or SYN-ACK with the options of makeSYNOptions;
	// windowScale and sackPermitted say which of them to include.
	synOptions    bool
	windowScale   bool
	sackPermitted bool
}

// dropReason says why a conn's segment did not reach the handler.
type dropReason uint8

const (
	dropNone         dropReason = iota
	dropOversize                // payload larger than the MSS this side advertised
	dropAfterClose              // data after the conn ended for its user
	dropUnacceptable            // not valid in the state: a bad SYN-ACK, no ACK flag, an RST outside the window, a SYN inside the conn
)

// verdict is what the state machine decided about one received segment.
type verdict struct {
	reply       emit
	deliver     bool       // the payload goes to the handler
	drop        dropReason // why the segment (its payload, if it had one) was dropped
	established bool       // the handshake completed with this segment
	ended       bool       // the conn ended for its user with this segment; tcb.err says why
	remove      bool       // forget the 4-tuple now
	// reopen: a SYN for a 4-tuple whose conn is closing: forget the old
	// conn and treat the SYN as new.
	reopen bool
}

// tcb is one connection's state machine (a transmission control block).
// It is pure: no I/O, no clock of its own (every call is told the time),
// no locking (its Conn locks). It says what to send; the stack sends it.
//
// Sequence numbers: sndNxt is the next sequence number to send, rcvNxt
// the ack to send: the highest seq+len seen from the peer, never going
// back. There is no retransmission, so a gap (a lost segment) is simply
// acknowledged past. In SeqFrozen mode data never moves either: every
// data segment carries seq iss+1 and ack irs+1.
type tcb struct {
	cfg tcbConfig

	// passive: a listener's SYN cookie made it. Its first keepalive waits
	// half an interval longer than the dialling side's, so that on an
	// idle conn the dialler probes and the listener only answers, as when
	// only a client enables keepalives, instead of both probing in step.
	passive bool

	state    connState
	iss, irs uint32
	sndNxt   uint32
	rcvNxt   uint32
	ackSent  uint32 // the ack of the last segment sent
	// windowShown is set once the conn has sent a segment other than its
	// SYN or SYN-ACK. Until then the peer, and every stateful middlebox
	// on the way (Linux conntrack among them), knows only the window field
	// of our SYN-ACK, which is never scaled: they hold the sender to that
	// many bytes past our ack. So the first data is acknowledged at once,
	// which shows the scaled window. A conn that a cookie opened has sent
	// only its SYN-ACK, so it starts with windowShown false, as Dial's
	// conn does until its handshake ACK.
	windowShown bool
	peerMSS     uint16
	peerWScale  bool // the peer's SYN offered window scaling
	peerSACK    bool // the peer's SYN offered SACK
	// sndWndEnd is where the window the peer advertised ends: the
	// furthest ack + window (scaled by peerShift, but a SYN-ACK's) of the
	// peer's segments that acknowledged nothing this side never sent.
	// Data past it is what a stateful middlebox, Linux conntrack among
	// them, finds invalid and drops; Send sends none (see sendRoom).
	sndWndEnd uint32
	// peerShift is the peer's window scale shift: its SYN-ACK's, for a
	// dialled conn; for one that a cookie opened, which keeps only
	// whether the SYN offered scaling, this stack's own, which iketcp
	// peers offer.
	peerShift    uint8
	opened       time.Time
	lastSyn      time.Time // when Dial's last SYN went out
	lastHeard    time.Time // when the last acceptable segment arrived
	lastProbe    time.Time // when the last keepalive went out
	unackedSince time.Time // when rcvNxt first moved past ackSent; zero when all is acknowledged
	closedAt     time.Time // when a closing state began
	err          error     // why the conn ended; nil while it lives
}

// newActiveTCB is Dial's state machine: SYN_SENT, with the SYN to send.
func newActiveTCB(cfg tcbConfig, now time.Time, iss uint32) (tcb, emit) {
	t := tcb{cfg: cfg, state: stateSynSent, iss: iss, sndNxt: iss + 1, sndWndEnd: iss + 1, opened: now, lastSyn: now}
	return t, t.synEmit()
}

// synAckEmit is a listener's answer to syn: a SYN-ACK with the ISN iss
// (a cookie), acknowledging the SYN, with window scale and SACK permitted
// when the SYN offered them. Nothing sends it again.
func synAckEmit(syn *segment, iss uint32) emit {
	return emit{flags: flagSYN | flagACK, seq: iss, ack: syn.seq + 1, synOptions: true,
		windowScale: syn.windowScale, sackPermitted: syn.sackPermitted}
}

// newPassiveTCB is a listener's state machine for a handshake that the
// cookie c completed, at now, with the peer whose ISN was irs:
// ESTABLISHED, with the peer's options that the cookie kept. The segment
// that returned the cookie is then received as any other.
func newPassiveTCB(cfg tcbConfig, now time.Time, c synCookie, irs uint32) tcb {
	t := tcb{
		cfg:        cfg,
		passive:    true,
		state:      stateEstablished,
		iss:        c.iss,
		sndNxt:     c.iss + 1,
		sndWndEnd:  c.iss + 1, // the segment that returned the cookie moves it
		irs:        irs,
		rcvNxt:     irs + 1,
		ackSent:    irs + 1,
		peerWScale: c.windowScale,
		peerSACK:   c.sackPermitted,
		opened:     now,
		lastHeard:  now,
	}
	if c.windowScale {
		t.peerShift = windowScale
	}
	t.setPeerMSS(c.peerMSS)
	return t
}

func (t *tcb) setPeerMSS(mss uint16) {
	if mss == 0 {
		mss = t.cfg.defaultPeerMSS
	}
	t.peerMSS = min(mss, t.cfg.maxSendMSS)
}

// synEmit is Dial's SYN, sent first and on every retry.
func (t *tcb) synEmit() emit {
	return emit{flags: flagSYN, seq: t.iss, synOptions: true, windowScale: true, sackPermitted: true}
}

// ackEmit is a segment that carries the current ack: a pure ACK (flags
// flagACK), a FIN or an RST with it. It notes the ack as sent.
func (t *tcb) ackEmit(flags uint8, seq uint32) emit {
	t.ackSent, t.unackedSince, t.windowShown = t.rcvNxt, time.Time{}, true
	return emit{flags: flags | flagACK, seq: seq, ack: t.rcvNxt}
}

// probeAfter is how long the conn stays idle before its first keepalive.
func (t *tcb) probeAfter() time.Duration {
	if t.passive {
		return t.cfg.keepAlive + t.cfg.keepAlive/2
	}
	return t.cfg.keepAlive
}

// windowBytes is the receive window the peer reads from our window field.
func (t *tcb) windowBytes() uint32 {
	if t.peerWScale {
		return uint32(t.cfg.window) << windowScale
	}
	return uint32(t.cfg.window)
}

// ackEvery is how much received data makes the receiver send a pure ACK
// at once rather than waiting for delayedACK: a quarter of its window, so
// that a stateful middlebox never sees the sender run past the window
// the receiver advertised.
func (t *tcb) ackEvery() uint32 { return t.windowBytes() / 4 }

// inWindow reports whether seq lies within a window of rcvNxt, the test
// an RST must pass (RFC 9293 §3.10.7.4, without RFC 5961's challenge).
func (t *tcb) inWindow(seq uint32) bool {
	d := int64(int32(seq - t.rcvNxt))
	w := int64(t.windowBytes())
	return -w <= d && d <= w
}

// end ends the conn for its user with err, once.
func (t *tcb) end(err error) {
	if t.err == nil {
		t.err = err
	}
}

// receive runs seg, which arrived at now for this conn's 4-tuple, through
// the state machine.
func (t *tcb) receive(now time.Time, seg *segment) verdict {
	switch t.state {
	case stateSynSent:
		return t.receiveSynSent(now, seg)
	case stateEstablished:
		return t.receiveEstablished(now, seg)
	case stateFinWait, stateLastAck, stateTimeWait:
		return t.receiveClosing(seg)
	}
	return verdict{drop: dropUnacceptable}
}

// resetFor is the RST that answers seg when no conn owns its 4-tuple
// (RFC 9293 §3.10.7.1): with seq taken from its ack, or, when it has
// none, acknowledging it. It returns no emit for an RST.
func resetFor(seg *segment) emit {
	if seg.has(flagRST) {
		return emit{}
	}
	if seg.has(flagACK) {
		return emit{flags: flagRST, seq: seg.ack}
	}
	ack := seg.seq + uint32(seg.payloadLen)
	if seg.has(flagSYN) {
		ack++
	}
	if seg.has(flagFIN) {
		ack++
	}
	return emit{flags: flagRST | flagACK, ack: ack}
}

func (t *tcb) receiveSynSent(now time.Time, seg *segment) verdict {
	if seg.has(flagACK) && seg.ack != t.iss+1 {
		if seg.has(flagRST) {
			return verdict{drop: dropUnacceptable}
		}
		return verdict{reply: emit{flags: flagRST, seq: seg.ack}, drop: dropUnacceptable}
	}
	if seg.has(flagRST) {
		if !seg.has(flagACK) {
			return verdict{drop: dropUnacceptable}
		}
		t.end(fmt.Errorf("%w: the peer refused the connection", ErrReset))
		t.state = stateClosed
		return verdict{ended: true, remove: true}
	}
	if !seg.has(flagSYN | flagACK) {
		// A SYN alone would be a simultaneous open, which this stack does
		// not do; anything else has no place here.
		return verdict{drop: dropUnacceptable}
	}
	t.irs, t.rcvNxt = seg.seq, seg.seq+1
	t.peerWScale, t.peerSACK = seg.windowScale, seg.sackPermitted
	if seg.windowScale {
		t.peerShift = seg.wsShift
	}
	t.sndWndEnd = seg.ack + uint32(seg.window) // a SYN-ACK's window is never scaled
	t.setPeerMSS(seg.mss)
	t.state = stateEstablished
	t.lastHeard = now
	return verdict{reply: t.ackEmit(0, t.sndNxt), established: true}
}

func (t *tcb) receiveEstablished(now time.Time, seg *segment) verdict {
	if seg.has(flagRST) {
		if !t.inWindow(seg.seq) {
			return verdict{drop: dropUnacceptable}
		}
		t.end(ErrReset)
		t.state = stateClosed
		return verdict{ended: true, remove: true}
	}
	if seg.has(flagSYN) {
		if seg.has(flagACK) && seg.seq == t.irs {
			// The peer's SYN-ACK again: our ACK of it was lost.
			t.lastHeard = now
			return verdict{reply: t.ackEmit(0, t.sndNxt)}
		}
		// A SYN inside a live conn: answer with a challenge ACK (RFC 5961
		// §4), which a peer that restarted answers with an RST.
		return verdict{reply: t.ackEmit(0, t.sndNxt), drop: dropUnacceptable}
	}
	if !seg.has(flagACK) {
		return verdict{drop: dropUnacceptable}
	}
	t.lastHeard = now
	t.noteWindow(seg)
	var v verdict
	end := seg.seq + uint32(seg.payloadLen)
	if seg.payloadLen > 0 {
		if seg.payloadLen > int(t.cfg.mss) {
			v.drop = dropOversize
		} else {
			v.deliver = true
		}
	}
	if seg.has(flagFIN) {
		if seqBefore(t.rcvNxt, end+1) {
			t.rcvNxt = end + 1
		}
		if t.cfg.mode == SeqFrozen {
			t.rcvNxt = end + 1 // a frozen peer's FIN sits where its data does
		}
		v.reply = t.ackEmit(flagFIN, t.sndNxt)
		t.sndNxt++
		t.state, t.closedAt = stateLastAck, now
		t.end(ErrPeerClosed)
		v.ended = true
		return v
	}
	before := t.rcvNxt
	if t.cfg.mode == SeqLive && seqBefore(t.rcvNxt, end) {
		t.rcvNxt = end
		if t.ackSent == before {
			t.unackedSince = now
		}
	}
	switch {
	case seg.payloadLen == 0 && seg.seq != before:
		// A keepalive probe (seq one before what we expect, as Linux
		// sends them), or a segment after a gap: acknowledge, as TCP does
		// for any segment that is not the next in order. Our answer
		// carries our sndNxt, which the peer expects, so it does not
		// answer in turn.
		v.reply = t.ackEmit(0, t.sndNxt)
	case t.cfg.mode == SeqLive && seg.payloadLen > 0 && !t.windowShown:
		v.reply = t.ackEmit(0, t.sndNxt) // shows our scaled window: see windowShown
	case t.cfg.mode == SeqLive && t.rcvNxt-t.ackSent >= t.ackEvery():
		v.reply = t.ackEmit(0, t.sndNxt)
	}
	return v
}

// noteWindow moves sndWndEnd to the end of the window seg advertises, if
// that is further and seg acknowledges nothing this side never sent
// (which a middlebox would refuse, not believe).
func (t *tcb) noteWindow(seg *segment) {
	if seqBefore(t.sndNxt, seg.ack) {
		return
	}
	if end := seg.ack + uint32(seg.window)<<t.peerShift; seqBefore(t.sndWndEnd, end) {
		t.sndWndEnd = end
	}
}

// sendRoom is how many bytes of data the conn may send now without
// running past the window the peer advertised: none once sndNxt is at or
// past its end. SeqFrozen data does not move through the sequence space,
// so it is never held back.
func (t *tcb) sendRoom() int64 {
	if t.cfg.mode == SeqFrozen {
		return math.MaxInt64
	}
	return max(int64(int32(t.sndWndEnd-t.sndNxt)), 0)
}

func (t *tcb) receiveClosing(seg *segment) verdict {
	switch {
	case seg.has(flagSYN) && !seg.has(flagACK):
		return verdict{reopen: true}
	case seg.has(flagRST):
		t.state = stateClosed
		return verdict{remove: true}
	case seg.has(flagFIN):
		t.rcvNxt = seg.seq + uint32(seg.payloadLen) + 1
		if t.state == stateFinWait {
			t.state = stateTimeWait
		}
		v := verdict{reply: t.ackEmit(0, t.sndNxt)}
		if seg.payloadLen > 0 {
			v.drop = dropAfterClose
		}
		return v
	case t.state == stateLastAck && seg.has(flagACK) && seg.ack == t.sndNxt:
		t.state = stateClosed // our FIN is acknowledged: nothing is left to do
		return verdict{remove: true}
	case seg.payloadLen > 0:
		return verdict{drop: dropAfterClose}
	}
	return verdict{}
}

// tickResult is what the state machine decided at a tick.
type tickResult struct {
	send   emit
	ended  bool // the conn ended for its user now; tcb.err says why
	remove bool // forget the 4-tuple now
}

// tick runs the state machine's timers at now: Dial's SYN retries and
// handshake timeout, keepalives and the dead-peer timeout, delayed ACKs, and the
// end of a closing conn's linger.
func (t *tcb) tick(now time.Time) tickResult {
	switch t.state {
	case stateSynSent:
		if now.Sub(t.opened) >= t.cfg.handshakeTimeout {
			t.end(fmt.Errorf("%w: no handshake within %v", ErrTimeout, t.cfg.handshakeTimeout))
			t.state = stateClosed
			return tickResult{ended: true, remove: true}
		}
		if now.Sub(t.lastSyn) >= synRetry {
			t.lastSyn = now
			return tickResult{send: t.synEmit()}
		}
	case stateEstablished:
		idle := now.Sub(t.lastHeard)
		switch {
		case idle >= deadAfter*t.cfg.keepAlive:
			t.end(fmt.Errorf("%w: nothing heard from the peer for %v", ErrTimeout, idle.Round(time.Millisecond)))
			t.state = stateClosed
			// As Linux does when its keepalive gives up: tell the peer,
			// should only this direction have died.
			return tickResult{send: t.ackEmit(flagRST, t.sndNxt), ended: true, remove: true}
		case idle >= t.probeAfter() && now.Sub(t.lastProbe) >= t.cfg.keepAlive:
			t.lastProbe = now
			return tickResult{send: t.ackEmit(0, t.sndNxt-1)}
		case !t.unackedSince.IsZero() && now.Sub(t.unackedSince) >= delayedACK:
			return tickResult{send: t.ackEmit(0, t.sndNxt)}
		}
	case stateFinWait, stateLastAck, stateTimeWait:
		if now.Sub(t.closedAt) >= linger {
			t.state = stateClosed
			return tickResult{remove: true}
		}
	}
	return tickResult{}
}

// dataFields reserves sequence space for a batch of data segments
// carrying total bytes and returns the seq of the first and the ack they
// all carry. In SeqFrozen mode nothing moves: every segment carries iss+1
// and irs+1.
func (t *tcb) dataFields(total int) (seq, ack uint32) {
	t.windowShown = true
	if t.cfg.mode == SeqFrozen {
		return t.iss + 1, t.irs + 1
	}
	seq = t.sndNxt
	t.sndNxt += uint32(total)
	t.ackSent, t.unackedSince = t.rcvNxt, time.Time{}
	return seq, t.rcvNxt
}

// close ends the conn for its user with err: an established conn sends a
// FIN and lingers, Dial's half-open one sends nothing and is forgotten. A
// conn that has already ended does nothing.
func (t *tcb) close(now time.Time, err error) (send emit, ended, remove bool) {
	switch t.state {
	case stateEstablished:
		send = t.ackEmit(flagFIN, t.sndNxt)
		t.sndNxt++
		t.state, t.closedAt = stateFinWait, now
		t.end(err)
		return send, true, false
	case stateSynSent:
		t.state = stateClosed
		t.end(err)
		return emit{}, true, true
	}
	return emit{}, false, false
}

// abort ends the conn for its user with err and sends an RST, for a conn
// the stack cannot keep (an accept queue that is full).
func (t *tcb) abort(err error) (send emit, ended bool) {
	if t.state != stateEstablished {
		return emit{}, false
	}
	t.state = stateClosed
	t.end(err)
	return t.ackEmit(flagRST, t.sndNxt), true
}
