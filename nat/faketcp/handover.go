package faketcp

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// Handing a stack's connections to another process (a server's planned
// restart or upgrade), over the same device, without the peers seeing a
// change:
//
//   - The old process pauses its stack (Pause): the reader stops between
//     two batches and the timer between two ticks, so nothing more is
//     read from the device, answered or sent on a timer. What the peers
//     send meanwhile waits in the device's queue (a TUN device's holds
//     its txqueuelen, 500 packets) for the new stack to read; nothing is
//     answered with an RST. Pause returns the stack's own state: its SYN
//     cookie key, so that the cookies of SYN-ACKs it sent still open
//     conns in the new stack, and its listeners' ports.
//   - It detaches each established conn (Conn.Detach): the conn's state
//     machine, exported (ConnState: the 4-tuple, ISN and IRS, the next
//     seq and ack, the ack last sent, the peer's window's end, MSS,
//     window scale and SACK, the timers' last events, the IPv4 ID and
//     IPv6 flow label), and the conn ends here with ErrDetached, sending
//     nothing.
//   - The new process makes a stack of it all (ResumeStack) before its
//     reader reads anything: the listeners, and each conn ESTABLISHED,
//     its sequence numbers, IP IDs and timers going on where the old one
//     left them. The first segments it reads are those that waited.
//
// A conn that was not ESTABLISHED (Dial's half-open one, a closing one)
// is not handed over: Detach refuses it. A Dial whose SYN-ACK arrives in
// the new stack is answered with an RST; the dialler tries again.

// ErrDetached is why a conn that Detach handed to another stack ended
// here.
var ErrDetached = errors.New("faketcp: connection handed over to another stack")

// errNotPaused is Detach's error on a stack that is not paused.
var errNotPaused = errors.New("faketcp: Detach needs the stack paused (Pause)")

// pauseWait bounds Pause's wait for the reader to stop between batches.
const pauseWait = 2 * time.Second

// pauseState is Pause's, in a Stack.
type pauseState struct {
	on   atomic.Bool // the goroutines are to stop: set first by Pause
	tick sync.Mutex  // held by the timer goroutine while it ticks

	mu     sync.Mutex    // guards the following
	ports  []uint16      // the listeners' ports when paused
	parked chan struct{} // closed by the reader once it stopped for this pause
	resume chan struct{} // closed by Unpause
}

// StackState is a paused stack's own state, for ResumeStack in another
// process: the SYN cookie key, the listeners' ports, and the conns that
// go with it.
type StackState struct {
	CookieKey []byte      `json:"cookie_key"`
	Listeners []uint16    `json:"listeners,omitempty"`
	Conns     []ConnState `json:"conns,omitempty"`
}

// ConnState is an established conn's state, as Detach exports it.
type ConnState struct {
	Remote    netip.AddrPort `json:"remote"`
	LocalPort uint16         `json:"local_port"`
	// Passive: a listener's cookie opened the conn (rather than Dial).
	Passive bool `json:"passive,omitempty"`
	// The sequence space: the ISNs, the next seq to send, the ack to
	// send, the ack last sent, and where the peer's window ends.
	ISS       uint32 `json:"iss"`
	IRS       uint32 `json:"irs"`
	SndNxt    uint32 `json:"snd_nxt"`
	RcvNxt    uint32 `json:"rcv_nxt"`
	AckSent   uint32 `json:"ack_sent"`
	SndWndEnd uint32 `json:"snd_wnd_end"`
	// WindowShown: the conn has sent more than its SYN or SYN-ACK.
	WindowShown bool `json:"window_shown,omitempty"`
	// The peer's options: its MSS, whether it offered window scaling and
	// SACK, and the shift of its window field.
	PeerMSS    uint16 `json:"peer_mss"`
	PeerWScale bool   `json:"peer_wscale,omitempty"`
	PeerSACK   bool   `json:"peer_sack,omitempty"`
	PeerShift  uint8  `json:"peer_shift,omitempty"`
	// IPID is the IPv4 ID of the last packet sent; FlowLabel the IPv6
	// flow label of every packet.
	IPID      uint16 `json:"ip_id"`
	FlowLabel uint32 `json:"flow_label,omitempty"`
	// The timers' last events, wall-clock times (zero: never).
	Opened       time.Time `json:"opened"`
	LastHeard    time.Time `json:"last_heard"`
	LastProbe    time.Time `json:"last_probe,omitzero"`
	UnackedSince time.Time `json:"unacked_since,omitzero"`
}

// Pause stops the stack's goroutines for a hand-over (see above) and
// returns its own state. The reader stops after the batch it is in, and
// no timer fires; packets wait in the device. Sends still go out: stop
// the conns' senders first, or Detach them. Unpause undoes it (a
// hand-over that did not happen); Close ends a paused stack as any other.
// The device must be able to wake a blocked Read (SetReadDeadline), as
// production's TUN device and tuntest's pipe can.
func (s *Stack) Pause() (StackState, error) {
	d, ok := s.dev.(readDeadliner)
	if !ok {
		return StackState{}, errors.New("faketcp: the device cannot wake its reader: its stack cannot pause")
	}
	p := &s.pause
	p.mu.Lock()
	if s.closed.Load() || p.on.Load() {
		p.mu.Unlock()
		return StackState{}, fmt.Errorf("faketcp: pause: %w, or paused already", ErrClosed)
	}
	p.parked, p.resume = make(chan struct{}), make(chan struct{})
	parked := p.parked
	s.mu.Lock()
	p.ports = p.ports[:0]
	for port := range s.listeners {
		p.ports = append(p.ports, port)
	}
	s.mu.Unlock()
	slices.Sort(p.ports)
	st := StackState{CookieKey: slices.Clone(s.cookieKey[:]), Listeners: slices.Clone(p.ports)}
	p.on.Store(true)
	p.mu.Unlock()

	p.tick.Lock() // a tick in progress ends; the next ones see p.on
	//lint:ignore SA2001 the lock only waits out a tick in progress
	p.tick.Unlock()
	if !s.started {
		return st, nil
	}
	if err := d.SetReadDeadline(time.Unix(1, 0)); err != nil {
		s.Unpause()
		return StackState{}, fmt.Errorf("faketcp: pause: waking the reader: %w", err)
	}
	select {
	case <-parked:
	case <-s.readerDone: // the device ended: nothing is read anyway
	case <-time.After(pauseWait):
		s.Unpause()
		return StackState{}, fmt.Errorf("faketcp: pause: the reader did not stop within %v", pauseWait)
	}
	return st, nil
}

// Unpause restarts a paused stack's goroutines; what waited in the device
// is read then.
func (s *Stack) Unpause() {
	p := &s.pause
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.on.Load() {
		return
	}
	if d, ok := s.dev.(readDeadliner); ok {
		_ = d.SetReadDeadline(time.Time{})
	}
	p.on.Store(false)
	close(p.resume)
}

// park is where the reader waits while the stack is paused; it returns
// false when the stack closed meanwhile.
func (s *Stack) park() bool {
	p := &s.pause
	p.mu.Lock()
	parked, resume := p.parked, p.resume
	p.mu.Unlock()
	select {
	case <-parked:
	default:
		close(parked)
	}
	select {
	case <-resume:
		return true
	case <-s.quit:
		return false
	}
}

// Detach hands the conn over: it exports its state and ends it here with
// ErrDetached (Done closes, Send fails), sending nothing, and the stack
// forgets it. The stack must be paused, and the conn ESTABLISHED. A
// handler running now finishes first; none runs after.
func (c *Conn) Detach() (ConnState, error) {
	s := c.stack
	if !s.pause.on.Load() {
		return ConnState{}, errNotPaused
	}
	c.hmu.Lock() // waits out a delivery in flight
	c.handler.Store(nil)
	c.hmu.Unlock()
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	c.mu.Lock()
	t := &c.tcb
	if t.state != stateEstablished {
		st := t.state
		c.mu.Unlock()
		return ConnState{}, fmt.Errorf("faketcp: a %s conn cannot be handed over", st)
	}
	cs := ConnState{
		Remote: c.key.remote, LocalPort: c.key.localPort, Passive: t.passive,
		ISS: t.iss, IRS: t.irs, SndNxt: t.sndNxt, RcvNxt: t.rcvNxt, AckSent: t.ackSent, SndWndEnd: t.sndWndEnd,
		WindowShown: t.windowShown,
		PeerMSS:     t.peerMSS, PeerWScale: t.peerWScale, PeerSACK: t.peerSACK, PeerShift: t.peerShift,
		IPID: uint16(c.ipID.Load()), FlowLabel: c.hdr.flowLabel,
		Opened: wall(t.opened), LastHeard: wall(t.lastHeard), LastProbe: wall(t.lastProbe), UnackedSince: wall(t.unackedSince),
	}
	t.state = stateClosed
	t.end(ErrDetached)
	c.mu.Unlock()
	s.forget(c)
	c.finish()
	return cs, nil
}

// wall is t without its monotonic reading, for another process.
func wall(t time.Time) time.Time {
	if t.IsZero() {
		return t
	}
	return t.Round(0)
}

// ResumeStack makes a stack on dev, as NewStack does, that goes on from
// another process's paused one (see above): with its SYN cookie key, a
// listener on each of st.Listeners (returned in that order) and each of
// st.Conns ESTABLISHED (returned in that order, with no handler yet:
// each keeps what arrives until SetHandler, as Accept's conns do). All of
// it is in place before the reader reads. st is checked: a state that no
// stack could have had (a key of the wrong size, an address of the other
// family, a port 0, a 4-tuple twice, an MSS or window shift out of
// range, no time last heard) is refused whole.
func ResumeStack(dev tun.Device, cfg Config, st StackState) (*Stack, []*Listener, []*Conn, error) {
	if dev == nil {
		return nil, nil, nil, errors.New("faketcp: no device")
	}
	s, err := buildStack(dev, cfg, randomUint32)
	if err != nil {
		return nil, nil, nil, err
	}
	if err := s.checkState(&st); err != nil {
		return nil, nil, nil, fmt.Errorf("faketcp: resuming: %w", err)
	}
	copy(s.cookieKey[:], st.CookieKey)
	s.rx.cookies = newCookieJar(s.cookieKey[:])
	lns := make([]*Listener, len(st.Listeners))
	for i, port := range st.Listeners {
		if lns[i], err = s.Listen(port); err != nil {
			return nil, nil, nil, err
		}
	}
	conns := make([]*Conn, len(st.Conns))
	for i := range st.Conns {
		conns[i] = s.resumeConn(&st.Conns[i])
	}
	s.start(true)
	s.log.Debug("faketcp: resumed", "listeners", len(lns), "conns", len(conns))
	return s, lns, conns, nil
}

// checkState refuses a state no stack of this one's configuration could
// have had.
func (s *Stack) checkState(st *StackState) error {
	if len(st.CookieKey) != cookieKeyLen {
		return fmt.Errorf("a cookie key of %d bytes, want %d", len(st.CookieKey), cookieKeyLen)
	}
	if len(st.Conns) > maxConns {
		return fmt.Errorf("%d conns, more than a stack holds (%d)", len(st.Conns), maxConns)
	}
	ports := make(map[uint16]bool, len(st.Listeners))
	for _, port := range st.Listeners {
		if port == 0 || ports[port] {
			return fmt.Errorf("listener port %d: zero, or twice", port)
		}
		ports[port] = true
	}
	seen := make(map[fourTuple]bool, len(st.Conns))
	for i := range st.Conns {
		cs := &st.Conns[i]
		remote := cs.Remote
		key := fourTuple{remote, cs.LocalPort}
		switch {
		case !remote.Addr().IsValid() || remote.Addr().Zone() != "" || remote.Addr().Is4In6() ||
			remote.Addr().Is4() != s.cfg.Local.Is4() || remote.Port() == 0:
			return fmt.Errorf("conn %d: remote %v is not a %s address and port", i, remote, familyName(s.cfg.Local))
		case cs.LocalPort == 0:
			return fmt.Errorf("conn %d from %v: local port 0", i, remote)
		case seen[key]:
			return fmt.Errorf("conn %d from %v to port %d: twice", i, remote, cs.LocalPort)
		case cs.PeerMSS < cookieMSS[0] || cs.PeerMSS > s.tcbCfg.maxSendMSS:
			return fmt.Errorf("conn %d from %v: peer MSS %d outside %d..%d", i, remote, cs.PeerMSS, cookieMSS[0], s.tcbCfg.maxSendMSS)
		case cs.PeerShift > maxWindowShift || (cs.PeerShift != 0 && !cs.PeerWScale):
			return fmt.Errorf("conn %d from %v: window shift %d", i, remote, cs.PeerShift)
		case cs.FlowLabel > 0xfffff:
			return fmt.Errorf("conn %d from %v: flow label %#x", i, remote, cs.FlowLabel)
		case cs.LastHeard.IsZero() || cs.Opened.IsZero():
			return fmt.Errorf("conn %d from %v: no time opened or last heard", i, remote)
		}
		seen[key] = true
	}
	return nil
}

// resumeConn puts an ESTABLISHED conn of cs into the table, before the
// goroutines start.
func (s *Stack) resumeConn(cs *ConnState) *Conn {
	l := s.listeners[cs.LocalPort]
	if !cs.Passive {
		l = nil
	}
	c := s.newConn(cs.Remote, cs.LocalPort, l, cs.FlowLabel, cs.IPID)
	c.tcb = tcb{
		cfg:          s.tcbCfg,
		passive:      cs.Passive,
		state:        stateEstablished,
		iss:          cs.ISS,
		irs:          cs.IRS,
		sndNxt:       cs.SndNxt,
		rcvNxt:       cs.RcvNxt,
		ackSent:      cs.AckSent,
		windowShown:  cs.WindowShown,
		peerMSS:      cs.PeerMSS,
		peerWScale:   cs.PeerWScale,
		peerSACK:     cs.PeerSACK,
		sndWndEnd:    cs.SndWndEnd,
		peerShift:    cs.PeerShift,
		opened:       cs.Opened,
		lastHeard:    cs.LastHeard,
		lastProbe:    cs.LastProbe,
		unackedSince: cs.UnackedSince,
	}
	c.tcb.setPeerMSS(cs.PeerMSS)
	c.sendMSS = int(c.tcb.peerMSS)
	close(c.established)
	s.conns[c.key] = c
	return c
}
