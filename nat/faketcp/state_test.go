package faketcp

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// The state machine's tests run two tcbs, a client and a server, over a
// modelled wire: each side's segments queue toward the other, and each
// step delivers, loses or injects one, runs a side's timers at a given
// time, or has a side dial, send or close. Every step checks what the
// acting side emitted and where it ended up.

type side int

const (
	client side = iota
	server
)

func (s side) String() string { return [...]string{"client", "server"}[s] }

type action int

const (
	dial    action = iota // the side opens: SYN_SENT (iss: step.iss, else the side's default)
	deliver               // the oldest segment in flight toward the side arrives
	lose                  // the oldest segment in flight toward the side is lost
	inject                // step.seg arrives at the side
	tick                  // the side's timers run
	send                  // the side sends step.n bytes of data
	closeIt               // the side closes
	restart               // the side forgets its conn and its cookie key, as a restarted stack does
	swap                  // the two oldest segments in flight toward the side change places
)

// The client's default ISN wraps around 2^32 within a few segments. The
// server's is the cookie that answers the client's default SYN at the
// harness's start.
const clientISS uint32 = 0xffffff00

var serverISS = func() uint32 {
	jar := harnessJar(0)
	syn := segment{flags: flagSYN, seq: clientISS, mss: 1460, windowScale: true, sackPermitted: true}
	return jar.make(harnessStart, harnessAddrs[server], harnessAddrs[client], &syn, defaultIPv4PeerMSS).iss
}()

// harnessStart is time 0 of the steps: the start of a cookie slot.
var harnessStart = time.Unix(1_700_000_000, 0)

// harnessAddrs are the sides' addresses, which the cookies cover.
var harnessAddrs = [2]netip.AddrPort{
	client: netip.AddrPortFrom(addr4A, 40000),
	server: netip.AddrPortFrom(addr4B, testPort),
}

// harnessJar is a side's cookie jar; a restart makes the next
// generation's, with another key.
func harnessJar(generation byte) cookieJar {
	key := [cookieKeyLen]byte{0: 0x5e, 1: generation}
	return newCookieJar(key[:])
}

type want struct {
	emit    string  // what the acting side emitted in the step, flags joined by "|", segments by ","; "" none
	state   string  // the acting side's state after; "" unchecked; "-" no conn
	seq     *uint32 // seq of the first segment emitted, if checked
	ack     *uint32
	ended   error // what the acting side's conn ended with, if checked
	deliver bool  // the delivered segment's payload goes to the handler
	drop    dropReason
}

type step struct {
	at   time.Duration
	act  action
	side side
	n    int      // send: payload length
	iss  uint32   // dial: ISN, 0 for the side's default
	seg  *segment // inject
	want want
}

func u32(v uint32) *uint32 { return &v }

// harness runs a scripted exchange between two tcbs.
type harness struct {
	t         *testing.T
	cfg       tcbConfig
	start     time.Time
	conn      [2]*tcb
	gone      [2]*tcb      // each side's last conn forgotten, to check why it ended
	listening [2]bool      // a side with no conn answers a SYN with a cookie, and opens a conn when it comes back
	jars      [2]cookieJar // each side's cookies
	restarts  [2]byte
	wire      [2][]segment // wire[s]: in flight toward s
	nextISS   [2]uint32    // the ISN a passive open or a default dial uses
	emitted   [2][]segment // what each side emitted in the current step
	verdict   verdict      // of the current step's delivery
}

func newHarness(t *testing.T, cfg tcbConfig) *harness {
	return &harness{
		t: t, cfg: cfg, start: harnessStart,
		listening: [2]bool{false, true},
		jars:      [2]cookieJar{harnessJar(0), harnessJar(0)},
		nextISS:   [2]uint32{clientISS, serverISS},
	}
}

func defaultTCBConfig() tcbConfig {
	return tcbConfig{
		mode: SeqLive, mss: 1460, maxSendMSS: maxIPv4MSS, defaultPeerMSS: defaultIPv4PeerMSS,
		window: DefaultWindow, keepAlive: 15 * time.Second, handshakeTimeout: 5 * time.Second,
	}
}

func other(s side) side { return 1 - s }

// put queues e, emitted by from, toward the other side.
func (h *harness) put(from side, e emit, payloadLen int) {
	if e.flags == 0 {
		return
	}
	seg := segment{seq: e.seq, ack: e.ack, flags: e.flags, window: h.cfg.window, payloadLen: payloadLen}
	if e.synOptions {
		seg.mss, seg.windowScale, seg.sackPermitted = h.cfg.mss, e.windowScale, e.sackPermitted
	}
	h.emitted[from] = append(h.emitted[from], seg)
	h.wire[other(from)] = append(h.wire[other(from)], seg)
}

// arrive runs seg through side s, as the stack does: its conn, or a
// listener (a SYN gets a cookie; a segment that returns a valid one opens
// a conn, which then receives it), or an RST for no conn.
func (h *harness) arrive(s side, seg segment, now time.Time) {
	if c := h.conn[s]; c != nil {
		h.receive(s, c, seg, now)
		if h.verdict.reopen {
			h.arriveUnknown(s, seg, now)
		}
		return
	}
	h.arriveUnknown(s, seg, now)
}

func (h *harness) receive(s side, c *tcb, seg segment, now time.Time) {
	v := c.receive(now, &seg)
	h.verdict = v
	h.put(s, v.reply, 0)
	if v.remove || v.reopen {
		h.forget(s)
	}
}

func (h *harness) arriveUnknown(s side, seg segment, now time.Time) {
	if h.listening[s] {
		local, remote := harnessAddrs[s], harnessAddrs[other(s)]
		switch seg.flags & (flagSYN | flagACK | flagRST) {
		case flagSYN:
			ck := h.jars[s].make(now, local, remote, &seg, h.cfg.defaultPeerMSS)
			h.put(s, synAckEmit(&seg, ck.iss), 0)
			return
		case flagACK:
			if ck, ok := h.jars[s].check(now, local, remote, &seg); ok {
				c := newPassiveTCB(h.cfg, now, ck, seg.seq-1)
				h.conn[s] = &c
				h.receive(s, &c, seg, now)
				return
			}
		}
	}
	h.put(s, resetFor(&seg), 0)
}

func (h *harness) run(steps []step) {
	t := h.t
	for i, st := range steps {
		now := h.start.Add(st.at)
		h.emitted = [2][]segment{}
		h.verdict = verdict{}
		s := st.side
		switch st.act {
		case dial:
			iss := st.iss
			if iss == 0 {
				iss = h.nextISS[s]
			}
			c, syn := newActiveTCB(h.cfg, now, iss)
			h.conn[s] = &c
			h.put(s, syn, 0)
		case deliver, lose:
			if len(h.wire[s]) == 0 {
				t.Fatalf("step %d: nothing in flight toward the %v", i, s)
			}
			seg := h.wire[s][0]
			h.wire[s] = h.wire[s][1:]
			if st.act == deliver {
				h.arrive(s, seg, now)
			}
		case inject:
			h.arrive(s, *st.seg, now)
		case tick:
			if c := h.conn[s]; c != nil {
				r := c.tick(now)
				h.put(s, r.send, 0)
				if r.remove {
					h.forget(s)
				}
			}
		case send:
			c := h.conn[s]
			if c == nil || c.state != stateEstablished {
				t.Fatalf("step %d: the %v cannot send: no established conn", i, s)
			}
			seq, ack := c.dataFields(st.n)
			flags := uint8(flagACK | flagPSH)
			if h.cfg.mode == SeqFrozen {
				flags = flagACK
			}
			h.put(s, emit{flags: flags, seq: seq, ack: ack}, st.n)
		case closeIt:
			if c := h.conn[s]; c != nil {
				e, _, remove := c.close(now, ErrClosed)
				h.put(s, e, 0)
				if remove {
					h.forget(s)
				}
			}
		case swap:
			w := h.wire[s]
			w[0], w[1] = w[1], w[0]
		case restart:
			h.conn[s], h.gone[s] = nil, nil
			h.restarts[s]++
			h.jars[s] = harnessJar(h.restarts[s])
		}
		h.check(i, st)
	}
}

func (h *harness) check(i int, st step) {
	t := h.t
	t.Helper()
	em := h.emitted[st.side]
	var names []string
	for _, seg := range em {
		names = append(names, flagString(seg.flags))
	}
	if got := strings.Join(names, ","); got != st.want.emit {
		t.Errorf("step %d (%v at %v): emitted %q, want %q", i, st.side, st.at, got, st.want.emit)
	}
	if len(em) > 0 {
		if st.want.seq != nil && em[0].seq != *st.want.seq {
			t.Errorf("step %d: seq %d, want %d", i, em[0].seq, *st.want.seq)
		}
		if st.want.ack != nil && em[0].ack != *st.want.ack {
			t.Errorf("step %d: ack %d, want %d", i, em[0].ack, *st.want.ack)
		}
	} else if st.want.seq != nil || st.want.ack != nil {
		t.Errorf("step %d: nothing emitted to check seq and ack on", i)
	}
	c := h.conn[st.side]
	state := "-"
	if c != nil {
		state = c.state.String()
	}
	if st.want.state != "" && state != st.want.state {
		t.Errorf("step %d: %v in %s, want %s", i, st.side, state, st.want.state)
	}
	if st.want.ended != nil {
		if c == nil {
			c = h.gone[st.side]
		}
		var err error
		if c != nil {
			err = c.err
		}
		if !errors.Is(err, st.want.ended) {
			t.Errorf("step %d: %v ended with %v, want %v", i, st.side, err, st.want.ended)
		}
	}
	if (st.act == deliver || st.act == inject) && (h.verdict.deliver != st.want.deliver || h.verdict.drop != st.want.drop) {
		t.Errorf("step %d: deliver %v drop %d, want deliver %v drop %d", i, h.verdict.deliver, h.verdict.drop, st.want.deliver, st.want.drop)
	}
}

func (h *harness) forget(s side) { h.conn[s], h.gone[s] = nil, h.conn[s] }

func flagString(f uint8) string {
	var parts []string
	for _, fl := range []struct {
		bit  uint8
		name string
	}{{flagSYN, "SYN"}, {flagFIN, "FIN"}, {flagRST, "RST"}, {flagACK, "ACK"}, {flagPSH, "PSH"}} {
		if f&fl.bit != 0 {
			parts = append(parts, fl.name)
		}
	}
	return strings.Join(parts, "|")
}

// cs and ss are sequence numbers relative to the default ISNs, in
// modulo-2^32 arithmetic.
func cs(n uint32) *uint32 { return u32(clientISS + n) }
func ss(n uint32) *uint32 { return u32(serverISS + n) }

// handshake is the three-way handshake at time 0, checked.
func handshake() []step {
	return []step{
		{act: dial, side: client, want: want{emit: "SYN", state: "SYN_SENT", seq: cs(0)}},
		{act: deliver, side: server, want: want{emit: "SYN|ACK", state: "-", seq: ss(0), ack: cs(1)}},
		{act: deliver, side: client, want: want{emit: "ACK", state: "ESTABLISHED", seq: cs(1), ack: ss(1)}},
		{act: deliver, side: server, want: want{state: "ESTABLISHED"}},
	}
}

func then(parts ...[]step) []step {
	var all []step
	for _, p := range parts {
		all = append(all, p...)
	}
	return all
}

func TestStateMachine(t *testing.T) {
	frozen := defaultTCBConfig()
	frozen.mode = SeqFrozen
	smallWindow := defaultTCBConfig()
	smallWindow.window = 64 // 8192 bytes scaled: a pure ACK every 2048

	tests := []struct {
		name  string
		cfg   *tcbConfig // nil: defaultTCBConfig
		steps []step
	}{
		{name: "handshake", steps: handshake()},
		{name: "lost SYN is sent again after a second", steps: []step{
			{act: dial, side: client, want: want{emit: "SYN", state: "SYN_SENT"}},
			{act: lose, side: server},
			{at: 999 * time.Millisecond, act: tick, side: client, want: want{state: "SYN_SENT"}},
			{at: time.Second, act: tick, side: client, want: want{emit: "SYN", seq: cs(0)}},
			{at: time.Second, act: deliver, side: server, want: want{emit: "SYN|ACK", state: "-"}},
			{at: time.Second, act: deliver, side: client, want: want{emit: "ACK", state: "ESTABLISHED"}},
			{at: time.Second, act: deliver, side: server, want: want{state: "ESTABLISHED"}},
		}},
		{name: "lost SYN-ACK: the listener does not send it again; the SYN sent again gets the same cookie", steps: []step{
			{act: dial, side: client, want: want{emit: "SYN"}},
			{act: deliver, side: server, want: want{emit: "SYN|ACK", state: "-"}},
			{act: lose, side: client},
			{at: time.Second, act: tick, side: server, want: want{state: "-"}},
			{at: time.Second, act: tick, side: client, want: want{emit: "SYN", seq: cs(0)}},
			{at: time.Second, act: deliver, side: server, want: want{emit: "SYN|ACK", seq: ss(0), ack: cs(1), state: "-"}},
			{at: time.Second, act: deliver, side: client, want: want{emit: "ACK", state: "ESTABLISHED"}},
			{at: time.Second, act: deliver, side: server, want: want{state: "ESTABLISHED"}},
		}},
		{name: "retried SYN and SYN-ACK cross", steps: []step{
			{act: dial, side: client, want: want{emit: "SYN"}},
			{act: deliver, side: server, want: want{emit: "SYN|ACK"}},
			{at: time.Second, act: tick, side: client, want: want{emit: "SYN"}},
			{at: time.Second, act: deliver, side: client, want: want{emit: "ACK", state: "ESTABLISHED"}},
			{at: time.Second, act: deliver, side: server, want: want{emit: "SYN|ACK", state: "-"}},
			{at: time.Second, act: deliver, side: server, want: want{state: "ESTABLISHED"}},
			{at: time.Second, act: deliver, side: client, want: want{emit: "ACK", state: "ESTABLISHED", seq: cs(1), ack: ss(1)}},
		}},
		{name: "lost ACK: the first data segment completes the handshake", steps: then(handshake()[:3], []step{
			{act: lose, side: server},
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH", seq: cs(1), ack: ss(1)}},
			{act: deliver, side: server, want: want{emit: "ACK", ack: cs(101), state: "ESTABLISHED", deliver: true}},
		})},
		{name: "lost ACK: the first data segment after a while still opens the conn", steps: then(handshake()[:3], []step{
			{act: lose, side: server},
			{at: time.Second, act: tick, side: server, want: want{state: "-"}},
			{at: 100 * time.Second, act: send, side: client, n: 100, want: want{emit: "ACK|PSH", seq: cs(1), ack: ss(1)}},
			{at: 100 * time.Second, act: deliver, side: server, want: want{emit: "ACK", ack: cs(101), state: "ESTABLISHED", deliver: true}},
		})},
		{name: "lost ACK: a keepalive does not return the cookie, and is reset", steps: then(handshake()[:3], []step{
			{act: lose, side: server},
			{at: 15 * time.Second, act: tick, side: client, want: want{emit: "ACK", seq: cs(0), ack: ss(1)}},
			{at: 15 * time.Second, act: deliver, side: server, want: want{emit: "RST", seq: ss(1), state: "-"}},
			{at: 15 * time.Second, act: deliver, side: client, want: want{state: "-", ended: ErrReset}},
		})},
		{name: "lost ACK and first data: a later data segment does not return the cookie, and is reset", steps: then(handshake()[:3], []step{
			{act: lose, side: server},
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH"}},
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH", seq: cs(101)}},
			{act: lose, side: server},
			{act: deliver, side: server, want: want{emit: "RST", seq: ss(1), state: "-"}},
			{act: deliver, side: client, want: want{state: "-", ended: ErrReset}},
		})},
		{name: "frozen: any data segment returns the cookie", cfg: &frozen, steps: then(handshake()[:3], []step{
			{act: lose, side: server},
			{act: send, side: client, n: 100, want: want{emit: "ACK", seq: cs(1), ack: ss(1)}},
			{act: send, side: client, n: 100, want: want{emit: "ACK", seq: cs(1), ack: ss(1)}},
			{act: lose, side: server},
			{act: deliver, side: server, want: want{state: "ESTABLISHED", deliver: true}},
			{act: send, side: server, n: 10, want: want{emit: "ACK", seq: ss(1), ack: cs(1)}},
		})},
		{name: "handshake timeout", steps: []step{
			{act: dial, side: client, want: want{emit: "SYN"}},
			{at: 1 * time.Second, act: tick, side: client, want: want{emit: "SYN"}},
			{at: 2 * time.Second, act: tick, side: client, want: want{emit: "SYN"}},
			{at: 3 * time.Second, act: tick, side: client, want: want{emit: "SYN"}},
			{at: 4 * time.Second, act: tick, side: client, want: want{emit: "SYN"}},
			{at: 5 * time.Second, act: tick, side: client, want: want{state: "-", ended: ErrTimeout}},
		}},
		{name: "no half-open conn: the listener keeps nothing and sends nothing after its SYN-ACK", steps: []step{
			{act: dial, side: client, want: want{emit: "SYN"}},
			{act: deliver, side: server, want: want{emit: "SYN|ACK", state: "-"}},
			{at: 4 * time.Second, act: tick, side: server, want: want{state: "-"}},
			{at: 5 * time.Second, act: tick, side: server, want: want{state: "-"}},
		}},
		{name: "refused", steps: []step{
			{act: dial, side: client, want: want{emit: "SYN"}},
			{act: inject, side: client, seg: &segment{flags: flagRST, seq: 1}, want: want{state: "SYN_SENT", drop: dropUnacceptable}},
			{act: inject, side: client, seg: &segment{flags: flagRST | flagACK, ack: clientISS + 1}, want: want{state: "-", ended: ErrReset}},
		}},
		{name: "SYN-ACK with a wrong ack is answered with an RST", steps: []step{
			{act: dial, side: client, want: want{emit: "SYN"}},
			{act: inject, side: client, seg: &segment{flags: flagSYN | flagACK, seq: 7, ack: 999}, want: want{emit: "RST", seq: u32(999), state: "SYN_SENT", drop: dropUnacceptable}},
		}},
		{name: "an ACK that returns no valid cookie is answered with an RST", steps: []step{
			{act: dial, side: client, want: want{emit: "SYN"}},
			{act: deliver, side: server, want: want{emit: "SYN|ACK"}},
			{act: inject, side: server, seg: &segment{flags: flagACK, seq: clientISS + 1, ack: 123}, want: want{emit: "RST", seq: u32(123), state: "-"}},
			{act: inject, side: server, seg: &segment{flags: flagACK, seq: clientISS + 1, ack: serverISS + 2}, want: want{emit: "RST", seq: ss(2), state: "-"}},
			{act: inject, side: server, seg: &segment{flags: flagACK, seq: clientISS + 2, ack: serverISS + 1}, want: want{emit: "RST", seq: ss(1), state: "-"}},
			{at: 128 * time.Second, act: inject, side: server, seg: &segment{flags: flagACK, seq: clientISS + 1, ack: serverISS + 1}, want: want{emit: "RST", seq: ss(1), state: "-"}},
			{at: 127 * time.Second, act: inject, side: server, seg: &segment{flags: flagACK, seq: clientISS + 1, ack: serverISS + 1}, want: want{state: "ESTABLISHED"}},
		}},
		{name: "live: seq advances by payload length, ack follows the peer, across 2^32", steps: then(handshake(), []step{
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH", seq: cs(1), ack: ss(1)}},
			{act: send, side: client, n: 200, want: want{emit: "ACK|PSH", seq: cs(101), ack: ss(1)}},
			{act: deliver, side: server, want: want{emit: "ACK", seq: ss(1), ack: cs(101), deliver: true}},
			{act: deliver, side: server, want: want{deliver: true}},
			{act: send, side: server, n: 50, want: want{emit: "ACK|PSH", seq: ss(1), ack: cs(301)}},
			{act: deliver, side: client}, // the first data's ACK
			{act: deliver, side: client, want: want{deliver: true}},
			{act: send, side: client, n: 10, want: want{emit: "ACK|PSH", seq: cs(301), ack: ss(51)}},
		})},
		{name: "live: a lost segment's gap is acknowledged past", steps: then(handshake(), []step{
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH"}},
			{act: send, side: client, n: 200, want: want{emit: "ACK|PSH"}},
			{act: send, side: client, n: 300, want: want{emit: "ACK|PSH", seq: cs(301)}},
			{act: deliver, side: server, want: want{emit: "ACK", ack: cs(101), deliver: true}},
			{act: lose, side: server},
			{act: deliver, side: server, want: want{deliver: true}},
			{act: send, side: server, n: 1, want: want{emit: "ACK|PSH", ack: cs(601)}},
		})},
		{name: "live: a late segment is delivered and the ack does not go back", steps: then(handshake(), []step{
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH"}},
			{act: send, side: client, n: 200, want: want{emit: "ACK|PSH"}},
			{act: swap, side: server},
			{act: deliver, side: server, want: want{emit: "ACK", ack: cs(301), deliver: true}},
			{act: deliver, side: server, want: want{deliver: true}},
			{act: send, side: server, n: 1, want: want{emit: "ACK|PSH", ack: cs(301)}},
		})},
		{name: "frozen: every data segment carries ISN+1 and the peer's ISN+1", cfg: &frozen, steps: then(handshake(), []step{
			{act: send, side: client, n: 100, want: want{emit: "ACK", seq: cs(1), ack: ss(1)}},
			{act: send, side: client, n: 200, want: want{emit: "ACK", seq: cs(1), ack: ss(1)}},
			{act: deliver, side: server, want: want{deliver: true}},
			{act: deliver, side: server, want: want{deliver: true}},
			{act: send, side: server, n: 50, want: want{emit: "ACK", seq: ss(1), ack: cs(1)}},
			{act: send, side: server, n: 60, want: want{emit: "ACK", seq: ss(1), ack: cs(1)}},
			{act: deliver, side: client, want: want{deliver: true}},
			{act: deliver, side: client, want: want{deliver: true}},
			{at: 15 * time.Second, act: tick, side: client, want: want{emit: "ACK", seq: cs(0), ack: ss(1)}},
			{at: 15 * time.Second, act: deliver, side: server, want: want{emit: "ACK", seq: ss(1), ack: cs(1)}},
			{at: 15 * time.Second, act: deliver, side: client},
		})},
		{name: "keepalive after KeepAlive idle, answered", steps: then(handshake(), []step{
			{at: 14999 * time.Millisecond, act: tick, side: client},
			{at: 15 * time.Second, act: tick, side: client, want: want{emit: "ACK", seq: cs(0), ack: ss(1)}},
			{at: 15 * time.Second, act: deliver, side: server, want: want{emit: "ACK", seq: ss(1), ack: cs(1)}},
			{at: 15 * time.Second, act: deliver, side: client, want: want{state: "ESTABLISHED"}},
			{at: 29999 * time.Millisecond, act: tick, side: client},
			{at: 30 * time.Second, act: tick, side: client, want: want{emit: "ACK", seq: cs(0)}},
		})},
		{name: "keepalive after data: seq is one before the next; the listener's side waits half an interval more", steps: then(handshake(), []step{
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH"}},
			{act: deliver, side: server, want: want{emit: "ACK", seq: ss(1), ack: cs(101), deliver: true}},
			{at: time.Second, act: tick, side: server},
			{at: time.Second, act: deliver, side: client},
			{at: 22499 * time.Millisecond, act: tick, side: server},
			{at: 22500 * time.Millisecond, act: tick, side: server, want: want{emit: "ACK", seq: ss(0), ack: cs(101)}},
			{at: 22500 * time.Millisecond, act: deliver, side: client, want: want{emit: "ACK", seq: cs(101), ack: ss(1)}},
			{at: 22500 * time.Millisecond, act: deliver, side: server},
			{at: 44999 * time.Millisecond, act: tick, side: server},
			{at: 45 * time.Second, act: tick, side: server, want: want{emit: "ACK", seq: ss(0), ack: cs(101)}},
		})},
		{name: "listener's side: first keepalive after 1.5 intervals, timeout after four", steps: then(handshake(), []step{
			{at: 15 * time.Second, act: tick, side: server},
			{at: 22500 * time.Millisecond, act: tick, side: server, want: want{emit: "ACK"}},
			{at: 37500 * time.Millisecond, act: tick, side: server, want: want{emit: "ACK"}},
			{at: 52500 * time.Millisecond, act: tick, side: server, want: want{emit: "ACK"}},
			{at: 60 * time.Second, act: tick, side: server, want: want{emit: "RST|ACK", state: "-", ended: ErrTimeout}},
		})},
		{name: "keepalive timeout after four silent intervals", steps: then(handshake(), []step{
			{at: 15 * time.Second, act: tick, side: client, want: want{emit: "ACK"}},
			{at: 20 * time.Second, act: tick, side: client},
			{at: 30 * time.Second, act: tick, side: client, want: want{emit: "ACK"}},
			{at: 45 * time.Second, act: tick, side: client, want: want{emit: "ACK"}},
			{at: 59999 * time.Millisecond, act: tick, side: client, want: want{state: "ESTABLISHED"}},
			{at: 60 * time.Second, act: tick, side: client, want: want{emit: "RST|ACK", seq: cs(1), state: "-", ended: ErrTimeout}},
		})},
		{name: "the accepting side acks its first data at once, to show its scaled window", steps: then(handshake(), []step{
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH"}},
			{act: deliver, side: server, want: want{emit: "ACK", seq: ss(1), ack: cs(101), deliver: true}},
		})},
		{name: "delayed ACK of data when the receiver sends nothing", steps: then(handshake(), []step{
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH"}},
			{act: deliver, side: server, want: want{emit: "ACK", ack: cs(101), deliver: true}},
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH"}},
			{act: deliver, side: server, want: want{deliver: true}},
			{at: 199 * time.Millisecond, act: tick, side: server},
			{at: 200 * time.Millisecond, act: tick, side: server, want: want{emit: "ACK", seq: ss(1), ack: cs(201)}},
			{at: 400 * time.Millisecond, act: tick, side: server},
		})},
		{name: "the dialling side's handshake ACK shows its window: no ACK at once", steps: then(handshake(), []step{
			{act: send, side: server, n: 100, want: want{emit: "ACK|PSH"}},
			{act: deliver, side: client, want: want{deliver: true}},
		})},
		{name: "pure ACK after a quarter window of data", cfg: &smallWindow, steps: then(handshake(), []step{
			{act: send, side: client, n: 1000, want: want{emit: "ACK|PSH"}},
			{act: send, side: client, n: 1000, want: want{emit: "ACK|PSH"}},
			{act: send, side: client, n: 1000, want: want{emit: "ACK|PSH"}},
			{act: send, side: client, n: 1000, want: want{emit: "ACK|PSH"}},
			{act: deliver, side: server, want: want{emit: "ACK", ack: cs(1001), deliver: true}},
			{act: deliver, side: server, want: want{deliver: true}},
			{act: deliver, side: server, want: want{deliver: true}},
			{act: deliver, side: server, want: want{emit: "ACK", ack: cs(4001), deliver: true}},
		})},
		{name: "close: FIN both ways, then linger", steps: then(handshake(), []step{
			{act: closeIt, side: client, want: want{emit: "FIN|ACK", seq: cs(1), ack: ss(1), state: "FIN_WAIT", ended: ErrClosed}},
			{act: deliver, side: server, want: want{emit: "FIN|ACK", seq: ss(1), ack: cs(2), state: "LAST_ACK", ended: ErrPeerClosed}},
			{act: deliver, side: client, want: want{emit: "ACK", seq: cs(2), ack: ss(2), state: "TIME_WAIT", ended: ErrClosed}},
			{act: deliver, side: server, want: want{state: "-", ended: ErrPeerClosed}},
			{at: 1999 * time.Millisecond, act: tick, side: client, want: want{state: "TIME_WAIT"}},
			{at: 2 * time.Second, act: tick, side: client, want: want{state: "-"}},
		})},
		{name: "close is idempotent", steps: then(handshake(), []step{
			{act: closeIt, side: client, want: want{emit: "FIN|ACK", state: "FIN_WAIT"}},
			{act: closeIt, side: client, want: want{state: "FIN_WAIT", ended: ErrClosed}},
		})},
		{name: "data crossing a FIN is dropped after close", steps: then(handshake(), []step{
			{act: closeIt, side: server, want: want{emit: "FIN|ACK", state: "FIN_WAIT"}},
			{act: send, side: client, n: 100, want: want{emit: "ACK|PSH"}},
			{act: deliver, side: server, want: want{state: "FIN_WAIT", drop: dropAfterClose}},
		})},
		{name: "FIN with data delivers the data", steps: then(handshake(), []step{
			{act: inject, side: server, seg: &segment{flags: flagFIN | flagACK | flagPSH, seq: clientISS + 1, ack: serverISS + 1, payloadLen: 10},
				want: want{emit: "FIN|ACK", ack: cs(12), state: "LAST_ACK", ended: ErrPeerClosed, deliver: true}},
		})},
		{name: "RST within the window ends the conn", steps: then(handshake(), []step{
			{act: inject, side: client, seg: &segment{flags: flagRST, seq: serverISS + 1}, want: want{state: "-", ended: ErrReset}},
		})},
		{name: "RST outside the window is ignored", steps: then(handshake(), []step{
			{act: inject, side: client, seg: &segment{flags: flagRST, seq: serverISS + 1 + 20_000_000}, want: want{state: "ESTABLISHED", drop: dropUnacceptable}},
		})},
		{name: "segment without ACK is dropped", steps: then(handshake(), []step{
			{act: inject, side: server, seg: &segment{flags: flagPSH, seq: clientISS + 1, payloadLen: 10}, want: want{state: "ESTABLISHED", drop: dropUnacceptable}},
		})},
		{name: "segment larger than the MSS is dropped but acknowledged", steps: then(handshake(), []step{
			{act: send, side: client, n: 1461, want: want{emit: "ACK|PSH"}},
			{act: deliver, side: server, want: want{emit: "ACK", ack: cs(1462), drop: dropOversize}},
			{act: send, side: server, n: 1, want: want{emit: "ACK|PSH", ack: cs(1462)}},
		})},
		{name: "segments for no conn are answered with an RST", steps: []step{
			{act: inject, side: server, seg: &segment{flags: flagACK, seq: 123, ack: 777}, want: want{emit: "RST", seq: u32(777), state: "-"}},
			{act: inject, side: server, seg: &segment{flags: flagPSH, seq: 100, payloadLen: 10}, want: want{emit: "RST|ACK", ack: u32(110), state: "-"}},
			{act: inject, side: server, seg: &segment{flags: flagFIN | flagACK, seq: 100, ack: 5}, want: want{emit: "RST", seq: u32(5), state: "-"}},
			{act: inject, side: client, seg: &segment{flags: flagSYN, seq: 100}, want: want{emit: "RST|ACK", ack: u32(101), state: "-"}},
			{act: inject, side: server, seg: &segment{flags: flagRST | flagACK, seq: 100, ack: 5}, want: want{state: "-"}},
		}},
		{name: "server restarted: the client's next segment is reset, and it dials again", steps: then(handshake(), []step{
			{act: restart, side: server},
			{at: time.Second, act: send, side: client, n: 100, want: want{emit: "ACK|PSH", ack: ss(1)}},
			{at: time.Second, act: deliver, side: server, want: want{emit: "RST", seq: ss(1), state: "-"}},
			{at: time.Second, act: deliver, side: client, want: want{state: "-", ended: ErrReset}},
			{at: time.Second, act: dial, side: client, iss: 42, want: want{emit: "SYN", seq: u32(42)}},
			{at: time.Second, act: deliver, side: server, want: want{emit: "SYN|ACK", ack: u32(43), state: "-"}},
			{at: time.Second, act: deliver, side: client, want: want{emit: "ACK", state: "ESTABLISHED"}},
			{at: time.Second, act: deliver, side: server, want: want{state: "ESTABLISHED"}},
		})},
		{name: "client restarted on the same port: challenge ACK, RST, then the retried SYN opens", steps: then(handshake(), []step{
			{act: restart, side: client},
			{act: dial, side: client, iss: 42, want: want{emit: "SYN"}},
			{act: deliver, side: server, want: want{emit: "ACK", seq: ss(1), ack: cs(1), state: "ESTABLISHED", drop: dropUnacceptable}},
			{act: deliver, side: client, want: want{emit: "RST", seq: cs(1), state: "SYN_SENT", drop: dropUnacceptable}},
			{act: deliver, side: server, want: want{state: "-", ended: ErrReset}},
			{at: time.Second, act: tick, side: client, want: want{emit: "SYN", seq: u32(42)}},
			{at: time.Second, act: deliver, side: server, want: want{emit: "SYN|ACK", ack: u32(43)}},
			{at: time.Second, act: deliver, side: client, want: want{emit: "ACK", state: "ESTABLISHED"}},
			{at: time.Second, act: deliver, side: server, want: want{state: "ESTABLISHED"}},
		})},
		{name: "a SYN for a closing conn forgets it and is answered with a cookie", steps: then(handshake(), []step{
			{act: closeIt, side: client, want: want{emit: "FIN|ACK"}},
			{act: deliver, side: server, want: want{emit: "FIN|ACK", state: "LAST_ACK"}},
			{act: inject, side: server, seg: &segment{flags: flagSYN, seq: 42, mss: 1400}, want: want{emit: "SYN|ACK", ack: u32(43), state: "-"}},
		})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := defaultTCBConfig()
			if tt.cfg != nil {
				cfg = *tt.cfg
			}
			newHarness(t, cfg).run(tt.steps)
		})
	}
}

// TestPeerMSS checks what limits Send: on Dial's side, the SYN-ACK's MSS
// option, a default when it has none, and never more than one IP packet
// holds; on a listener's side, the SYN's MSS as the cookie kept it:
// rounded down to an entry of cookieMSS.
func TestPeerMSS(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		cfg := defaultTCBConfig()
		defaultMSS, maxMSS := uint16(defaultIPv4PeerMSS), uint16(maxIPv4MSS)
		if v6 {
			cfg.defaultPeerMSS, cfg.maxSendMSS = defaultIPv6PeerMSS, maxIPv6MSS
			defaultMSS, maxMSS = defaultIPv6PeerMSS, maxIPv6MSS
		}
		for _, tt := range []struct {
			offered, active, passive uint16
		}{
			{0, defaultMSS, defaultMSS},
			{20, 20, 48},
			{1400, 1400, 1400},
			{1450, 1450, 1440},
			{1460, 1460, 1460},
			{1500, 1500, 1460},
			{9000, 9000, 8940},
			{65535, maxMSS, 8940},
		} {
			a, _ := newActiveTCB(cfg, time.Now(), 1)
			a.receive(time.Now(), &segment{flags: flagSYN | flagACK, ack: 2, mss: tt.offered})
			jar := harnessJar(0)
			syn := segment{flags: flagSYN, seq: 7, mss: tt.offered}
			ck := jar.make(harnessStart, harnessAddrs[server], harnessAddrs[client], &syn, cfg.defaultPeerMSS)
			p := newPassiveTCB(cfg, harnessStart, ck, syn.seq)
			if a.peerMSS != tt.active || p.peerMSS != tt.passive {
				t.Errorf("v6=%v offered %d: peer MSS %d dialling, %d accepting; want %d, %d", v6, tt.offered, a.peerMSS, p.peerMSS, tt.active, tt.passive)
			}
		}
	}
}
