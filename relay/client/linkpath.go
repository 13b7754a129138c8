package client

import (
	"context"
	"encoding/binary"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/aggregate"
	"github.com/iketcp/iketcp/relay/reorder"
	"github.com/iketcp/iketcp/relay/sendq"
	"github.com/iketcp/iketcp/relay/ticket"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// stableAfter is how long a link must last for the next reconnect to
// start again from the shortest backoff; provenAfter is enough for a link
// on which the server was heard. A carrier that resets connections every
// few seconds then costs a short reconnect each time, not the longest
// backoff, while a server that accepts and closes without a word is still
// tried ever more slowly.
const (
	stableAfter = 5 * time.Second
	provenAfter = time.Second
)

// maxTickets bounds the tickets a link path keeps: its session's, and a
// few of rekeys and reconnects past.
const maxTickets = 4

// Link path states, for Status.
const (
	stateConnecting int32 = iota
	stateUp
	stateWaiting
)

// linkPath is one IKE SA's way to the iketcp server (and the IKE SAs
// rekeyed from it): a link, kept up with reconnects. RFC 9329 6: IKE SAs
// do not share a TCP connection, but for the overlap of a rekey.
//
// The daemon's datagrams go to the link from the goroutine that read
// them, in one Send per path and batch: a link queues what it cannot send
// at once (package relay/sendq). While the path has no link (before the
// first connection, between reconnects) they wait in the path's own
// queue, with the same discipline: IKE kept, late ESP dropped.
type linkPath struct {
	f      *flow
	id     uint64
	ctx    context.Context // ends the path
	cancel context.CancelFunc

	state    atomic.Int32
	conns    atomic.Uint64
	lastUsed atomic.Int64 // unix ns of the daemon's last datagram routed here
	book     relay.SABook
	// plain is set once the server left iketcp's hello unanswered: a
	// third-party RFC 9329 responder, to which the path's next links
	// send RFC 9329 frames only, as with Config.PlainRFC9329. iketcp is
	// set once a server answered hello: later links need not wait for
	// the answer before they carry the daemon's datagrams.
	plain, iketcp atomic.Bool

	// Guarded by Client.mu.
	started bool     // runLink is running
	out     [][]byte // the daemon's datagrams of this batch, for flushLinksLocked

	mu      sync.Mutex  // guards the following
	link    relay.Link  // the link up, or nil
	waiting sendq.Queue // what waits while there is none
	peer    string      // the current link's ends
	local   string
	tickets []heldTicket // newest last
	session uint64       // the server's session, from its latest ticket

	// An aggregate's (members.go): nil members for a path of one link.
	members []*memberPath
	stats   []*aggregate.Member // the members' measurements, in order
	smu     sync.Mutex          // guards the following
	sched   aggregate.Scheduler
	primary *memberPath

	reorder reorder.Buffer     // what the members bring, on its way to the daemon
	scratch []udpbatch.Message // reorder's Deliver's, under its lock
}

// heldTicket is a server's word that session id is this path's, and the
// key that proves it.
type heldTicket struct {
	id  uint64
	key ticket.Key
}

func newLinkPath(f *flow) *linkPath {
	cl := f.cl
	p := &linkPath{f: f, id: cl.nextID.Add(1)}
	p.waiting.Budget, p.waiting.Target = cl.cfg.QueueBytes, cl.cfg.QueueDelay
	p.ctx, p.cancel = context.WithCancel(f.ctx)
	if len(cl.cfg.Members) > 0 {
		p.initMembers()
	}
	return p
}

// queueLocked adds d to what the path sends at the end of the caller's
// batch (flushLinksLocked), starting its link on first use. d stays the
// caller's. Client.mu must be held.
func (p *linkPath) queueLocked(d *datagram) {
	cl := p.f.cl
	if !p.started {
		p.started = true
		if p.members != nil {
			p.startMembers()
		} else {
			cl.wg.Add(1)
			go p.runLink()
		}
	}
	if len(p.out) == 0 {
		cl.linkSends = append(cl.linkSends, p)
	}
	p.out = append(p.out, d.withHeadroom())
}

// flushLinksLocked sends every path's datagrams of this batch, one Send
// per path, before the caller reuses their buffers. cl.mu must be held.
func (cl *Client) flushLinksLocked() {
	for i, p := range cl.linkSends {
		p.send(p.out)
		clear(p.out)
		p.out = p.out[:0]
		cl.linkSends[i] = nil
	}
	cl.linkSends = cl.linkSends[:0]
}

// send hands bufs (each with relay.Headroom in front) to the path's link,
// or queues copies while it has none.
func (p *linkPath) send(bufs [][]byte) {
	if p.members != nil {
		p.sendAggregate(bufs)
		return
	}
	cl := p.f.cl
	var bytes uint64
	var k relay.Kinds
	for _, b := range bufs {
		bytes += uint64(len(b) - relay.Headroom)
		k.Note(b[relay.Headroom:])
	}
	p.mu.Lock()
	link := p.link
	if link == nil {
		now := time.Now().UnixNano()
		for _, b := range bufs {
			p.waiting.Push(b, sendq.LaneOf(b[relay.Headroom:]), now)
		}
		p.countDropsLocked()
		p.mu.Unlock()
		p.f.traffic.CountOut(cl.counters, len(bufs), bytes, k)
		return
	}
	p.mu.Unlock()
	if err := link.Send(bufs); err != nil {
		cl.counters.NoPath.Add(uint64(len(bufs)))
		link.Close() // its reader ends, and the path reconnects
		return
	}
	p.f.traffic.CountOut(cl.counters, len(bufs), bytes, k)
}

// countDropsLocked adds what the waiting queue dropped to the counters.
// p.mu must be held.
func (p *linkPath) countDropsLocked() {
	d := p.waiting.TakeDrops()
	if d.Full > 0 {
		cl := p.f.cl
		cl.counters.QueueFull.Add(d.Full)
		cl.logDrop.Log(cl.log, slog.LevelWarn, "datagrams dropped: the queue for a link that is not up is full (--queue-bytes)",
			"flow", p.f.id, "link", p.id, "dropped", d.Full)
	}
	p.f.cl.counters.QueueLate.Add(d.Late)
}

// runLink keeps a link to the iketcp server for the path, reconnecting
// with backoff.
func (p *linkPath) runLink() {
	cl := p.f.cl
	defer cl.wg.Done()
	defer p.drain()
	backoff := time.Duration(0)
	for p.ctx.Err() == nil {
		p.state.Store(stateConnecting)
		link, err := p.connect()
		if err != nil {
			if p.ctx.Err() != nil {
				return
			}
			cl.counters.DialFailures.Add(1)
			backoff = nextBackoff(backoff, cl.cfg.reconnectMin(), cl.cfg.reconnectMax())
			cl.logDial.Log(cl.log, slog.LevelWarn, "cannot connect to the iketcp server, retrying", "flow", p.f.id,
				"link", p.id, "peer", p.f.dial, "err", err, "retry_in", backoff.Round(time.Millisecond).String())
			p.state.Store(stateWaiting)
			if !relay.SleepCtx(p.ctx, backoff) {
				return
			}
			continue
		}
		connected := time.Now()
		reason, heard := p.carry(link)
		p.state.Store(stateWaiting)
		if p.ctx.Err() != nil {
			return
		}
		if lived := time.Since(connected); lived >= stableAfter || heard && lived >= provenAfter {
			backoff = 0
		}
		backoff = nextBackoff(backoff, cl.cfg.reconnectMin(), cl.cfg.reconnectMax())
		cl.log.Info("connection lost, reconnecting", "flow", p.f.id, "link", p.id, "peer", p.f.dial, "reason", reason,
			"retry_in", backoff.Round(time.Millisecond).String())
		if !relay.SleepCtx(p.ctx, backoff) {
			return
		}
	}
}

// drain drops what still waits as runLink ends.
func (p *linkPath) drain() {
	p.mu.Lock()
	p.waiting.Reset()
	p.mu.Unlock()
}

// connect opens a link to the iketcp server for the path.
func (p *linkPath) connect() (relay.Link, error) {
	cl := p.f.cl
	ctx, cancel := context.WithTimeout(p.ctx, cl.cfg.dialTimeout())
	defer cancel()
	link, err := cl.dialer.DialLink(ctx, p.f.dial)
	if err != nil {
		return nil, err
	}
	cl.counters.ConnsDialed.Add(1)
	p.mu.Lock()
	p.peer, p.local = link.RemoteAddr(), link.LocalAddr()
	p.mu.Unlock()
	p.state.Store(stateUp)
	n := p.conns.Add(1)
	msg := "connected"
	if n > 1 {
		msg = "reconnected"
	}
	cl.log.Info(msg, "flow", p.f.id, "link", p.id, "daemon", p.f.key.daemon.String(), "peer", link.RemoteAddr(),
		"local", link.LocalAddr(), "connections", n)
	return link, nil
}

// carry moves the path's traffic over link both ways until the link fails
// or the path ends, closes the link, and says why it ended and whether
// anything was heard from the server on it. To an iketcp
// server it says hello first, and claims its sessions back once the
// server has answered. Then what waited goes, and the link takes the
// daemon's datagrams directly.
func (p *linkPath) carry(link relay.Link) (reason string, heard bool) {
	cl := p.f.cl
	lr := &linkReader{path: p, link: link, answer: make(chan struct{})}
	dead := make(chan string, 1)
	stopWatch := make(chan struct{})
	defer close(stopWatch)
	hello := !cl.cfg.PlainRFC9329 && !p.plain.Load()
	if hello {
		if timeout := cl.cfg.livenessTimeout(); timeout > 0 {
			lr.live = newLinkLiveness(timeout, &lr.heard, time.Now())
			cl.wg.Add(1)
			go func() {
				defer cl.wg.Done()
				lr.watchLiveness(stopWatch, dead)
			}()
		}
		if err := lr.hello(); err != nil {
			link.Close()
			return "hello: " + err.Error(), false
		}
	}
	readDone := make(chan error, 1)
	cl.wg.Add(1)
	go func() {
		defer cl.wg.Done()
		readDone <- link.Serve(newPeerReader(p.f, fallback.TCP, lr))
	}()
	if hello && !p.iketcp.Load() {
		// Until a server of this path has answered hello once, the
		// daemon's datagrams wait for the answer: an iketcp server gives it
		// at once, while a third-party RFC 9329 responder takes hello for
		// ESP it has no SA for and never answers. Then the link is given
		// up before any IKE went over it, and the path's next links send
		// RFC 9329 frames only; what waited goes on the next one.
		select {
		case <-lr.answer:
		case <-time.After(cl.cfg.helloWait()):
			p.plain.Store(true)
			cl.log.Info("the server did not answer iketcp's hello: taking it for a third-party RFC 9329 responder, and reconnecting with RFC 9329 frames only (--plain-rfc9329 says so from the start)",
				"link", p.id, "peer", cl.cfg.Peer)
			reason = "no answer to hello"
		case err := <-readDone:
			readDone <- err
			reason = err.Error()
		case <-p.ctx.Done():
			reason = "link closed"
		}
	}
	if reason == "" {
		if err := p.attach(link); err != nil {
			reason = "write: " + err.Error()
		} else {
			select {
			case err := <-readDone:
				readDone <- err
				reason = err.Error()
			case reason = <-dead:
				cl.counters.LinksDead.Add(1)
			case <-p.ctx.Done():
				reason = "link closed"
			}
		}
	}
	p.mu.Lock()
	p.link = nil
	p.mu.Unlock()
	link.Close()
	<-readDone
	return reason, lr.heard.Load() != 0
}

// attach sends what waited for a link on link, and makes it the path's.
func (p *linkPath) attach(link relay.Link) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.flushWaitingLocked(link); err != nil {
		return err
	}
	p.link = link
	return nil
}

// flushWaitingLocked sends on link what waited for one. p.mu must be held.
func (p *linkPath) flushWaitingLocked(link relay.Link) error {
	var bufs [][]byte
	for !p.waiting.Empty() {
		bufs = p.waiting.Pop(bufs[:0], clientBatch, 256<<10, time.Now().UnixNano())
		err := link.Send(bufs)
		p.waiting.Release()
		if err != nil {
			return err
		}
	}
	p.countDropsLocked()
	return nil
}

// linkReader is a link's iketcp handshake, from the client's side: the
// key exchange, then the claims on the sessions the path's tickets name.
// Its methods run on the link's reader, but for hello.
type linkReader struct {
	path   *linkPath
	link   relay.Link
	member *memberPath // the aggregate's member the link is, or nil
	ex     *ticket.Exchange
	key    ticket.Key
	// server is the server's public key; nil until it answered.
	server []byte

	// answer is closed when the server answers hello.
	answer chan struct{}

	jmu      sync.Mutex // guards joinSent, and server once written
	joinSent bool
	// heard is when the link last received a burst (unix ns), 0 before.
	heard atomic.Int64
	// live is the link's liveness check; nil without one (a plain RFC
	// 9329 server, or LivenessTimeout off).
	live *linkLiveness
}

// hello starts the key exchange.
func (lr *linkReader) hello() error {
	ex, err := ticket.NewExchange()
	if err != nil {
		return err
	}
	lr.ex = ex
	return lr.send(framing.ControlHello, ex.Public())
}

// control handles a control message from the server.
func (lr *linkReader) control(m *framing.Control) {
	p := lr.path
	cl := p.f.cl
	switch {
	case lr.ex == nil:
		// A plain RFC 9329 client never said hello: nothing is for it.
	case m.Type == framing.ControlHelloReply && lr.server == nil:
		server := append([]byte(nil), m.Body...)
		key, err := lr.ex.LinkKey(server, lr.ex.Public(), server)
		if err != nil {
			cl.logDrop.Log(cl.log, slog.LevelWarn, "the server's hello is not acceptable", "link", p.id, "err", err)
			return
		}
		lr.jmu.Lock()
		lr.key, lr.server = key, server
		lr.jmu.Unlock()
		p.iketcp.Store(true)
		if lr.answer != nil {
			close(lr.answer)
		}
		if lr.live != nil {
			// The server is iketcp: a first Ping finds out whether it
			// answers them; its Pong arms the liveness check.
			lr.send(framing.ControlPing, make([]byte, framing.ControlPingSize))
		}
		if lr.member != nil {
			lr.joinOnce() // a member joins rather than claims
			return
		}
		p.mu.Lock()
		held := append([]heldTicket(nil), p.tickets...)
		p.mu.Unlock()
		for _, t := range held {
			mac := ticket.ClaimMAC(t.key, t.id, lr.ex.Public(), server)
			lr.send(framing.ControlClaim, binary.BigEndian.AppendUint64(nil, t.id), mac[:])
		}
	case m.Type == framing.ControlTicket && lr.server != nil:
		id := m.SessionID()
		p.mu.Lock()
		p.tickets = append(p.tickets, heldTicket{id: id, key: lr.key})
		if len(p.tickets) > maxTickets {
			p.tickets = append(p.tickets[:0], p.tickets[1:]...)
		}
		p.session = id
		p.mu.Unlock()
		cl.log.Debug("ticket for a session", "link", p.id, "session", id)
		if lr.member != nil {
			lr.joinOnce()
		}
	case m.Type == framing.ControlJoined && lr.member != nil:
		lr.joined(m)
	case m.Type == framing.ControlProbe && lr.member != nil:
		lr.probe(m)
	case m.Type == framing.ControlPong && lr.live != nil:
		lr.live.armed.Store(true)
	case m.Type == framing.ControlClaimed:
		id, accepted := m.SessionID(), m.Body[8] == framing.ClaimAccepted
		if !accepted {
			p.mu.Lock()
			p.tickets = deleteTicket(p.tickets, id)
			p.mu.Unlock()
		}
		cl.log.Info("session claimed back", "link", p.id, "session", id, "accepted", accepted)
	}
}

// move tells an iketcp server that outbound ESP SPI spi, which went to
// path from's session at first, is this link's: proved with from's
// ticket. Without a handshake on this link, or a ticket of from's, the
// server keeps delivering the SPI through from's session.
func (lr *linkReader) move(spi uint32, from *linkPath) {
	p := lr.path
	p.f.cl.log.Info("ESP SPI moved to its IKE SA's link", "flow", p.f.id, "spi", relay.SPI32(spi), "from_link", from.id, "to_link", p.id)
	if lr.server == nil {
		return
	}
	from.mu.Lock()
	var t heldTicket
	if n := len(from.tickets); n > 0 {
		t = from.tickets[n-1]
	}
	from.mu.Unlock()
	if t.id == 0 {
		return
	}
	mac := ticket.MoveMAC(t.key, t.id, spi, lr.ex.Public(), lr.server)
	lr.send(framing.ControlMove, binary.BigEndian.AppendUint32(nil, spi), binary.BigEndian.AppendUint64(nil, t.id), mac[:])
}

func deleteTicket(ts []heldTicket, id uint64) []heldTicket {
	out := ts[:0]
	for _, t := range ts {
		if t.id != id {
			out = append(out, t)
		}
	}
	return out
}

// send sends a control message on the link.
func (lr *linkReader) send(t framing.ControlType, parts ...[]byte) error {
	buf := framing.AppendControl(make([]byte, relay.Headroom, relay.Headroom+64), t, parts...)
	return lr.link.Send([][]byte{buf})
}

// nextBackoff doubles the previous backoff within [lo, hi], with ±10%
// jitter so that many clients do not reconnect in step.
func nextBackoff(prev, lo, hi time.Duration) time.Duration {
	next := min(max(2*prev, lo), hi)
	jitter := time.Duration(rand.Int64N(int64(next)/5+1)) - next/10
	return next + jitter
}
