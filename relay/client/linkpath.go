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
	"github.com/iketcp/iketcp/relay/ticket"
)

// stableAfter is how long a link must last for the next reconnect to
// start again from the shortest backoff.
const stableAfter = 5 * time.Second

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
// rekeyed from it): a link, kept up with reconnects, and the queue of the
// daemon's datagrams that wait for it. RFC 9329 6: IKE SAs do not share a
// TCP connection, but for the overlap of a rekey.
type linkPath struct {
	f      *flow
	id     uint64
	queue  chan *datagram
	ctx    context.Context // ends the path
	cancel context.CancelFunc

	state    atomic.Int32
	conns    atomic.Uint64
	lastUsed atomic.Int64 // unix ns of the daemon's last datagram routed here
	book     relay.SABook

	started bool // runLink is running; guarded by Client.mu

	mu      sync.Mutex // guards the following
	peer    string     // the current link's ends
	local   string
	tickets []heldTicket // newest last
	session uint64       // the server's session, from its latest ticket
}

// heldTicket is a server's word that session id is this path's, and the
// key that proves it.
type heldTicket struct {
	id  uint64
	key ticket.Key
}

// enqueue puts d in the path's queue, starting its link on first use, or
// counts d dropped when the queue is full. It reports whether the queue
// took d. Client.mu must be held.
func (p *linkPath) enqueueLocked(d *datagram) bool {
	cl := p.f.cl
	if !p.started {
		p.started = true
		cl.wg.Add(1)
		go p.runLink()
	}
	select {
	case p.queue <- d:
		return true
	default:
		cl.counters.QueueFull.Add(1)
		cl.logDrop.Log(cl.log, slog.LevelWarn, "datagram dropped: link queue full (connection down or too slow)",
			"flow", p.f.id, "link", p.id, "queue", cap(p.queue))
		return false
	}
}

// runLink keeps a link to the iketcp server for the path, reconnecting
// with backoff, and writes the path's queue onto it.
//
// A path leaves its flow (under linkPaths.mu, which readDaemon takes
// under Client.mu while it queues) before it is stopped, and readDaemon
// has returned before run stops the rest, so nothing is queued after
// runLink drains the queue.
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
		reason := p.carry(link)
		p.state.Store(stateWaiting)
		if p.ctx.Err() != nil {
			return
		}
		if time.Since(connected) >= stableAfter {
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

// drain returns queued datagrams to the pool as runLink ends.
func (p *linkPath) drain() {
	for {
		select {
		case d := <-p.queue:
			p.f.cl.putDatagram(d)
		default:
			return
		}
	}
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
// or the path ends, closes the link, and says why it ended. To an iketcp
// server it says hello first, and claims its sessions back once the
// server has answered.
func (p *linkPath) carry(link relay.Link) string {
	lr := &linkReader{path: p, link: link}
	if !p.f.cl.cfg.PlainRFC9329 {
		if err := lr.hello(); err != nil {
			link.Close()
			return "hello: " + err.Error()
		}
	}
	readDone := make(chan error, 1)
	p.f.cl.wg.Add(1)
	go func() {
		defer p.f.cl.wg.Done()
		readDone <- link.Serve(newPeerReader(p.f, fallback.TCP, lr))
	}()
	reason, readerEnded := p.writeLink(link, readDone)
	link.Close()
	if !readerEnded {
		<-readDone
	}
	return reason
}

// writeLink sends batches from the path's queue on link until a send
// fails, the reader ends (readerEnded) or the path ends, and says why.
func (p *linkPath) writeLink(link relay.Link, readDone <-chan error) (reason string, readerEnded bool) {
	cl := p.f.cl
	batch := make([]*datagram, 0, clientBatch)
	bufs := make([][]byte, 0, clientBatch)
	for {
		select {
		case d := <-p.queue:
			batch = append(batch, d)
		case err := <-readDone:
			return err.Error(), true
		case <-p.ctx.Done():
			return "link closed", false
		}
	gather:
		for len(batch) < cap(batch) {
			select {
			case d := <-p.queue:
				batch = append(batch, d)
			default:
				break gather
			}
		}
		var bytes uint64
		for _, d := range batch {
			bytes += uint64(d.n)
			bufs = append(bufs, d.withHeadroom())
		}
		err := link.Send(bufs)
		n := len(batch)
		for i, d := range batch {
			cl.putDatagram(d)
			batch[i] = nil
		}
		batch = batch[:0]
		clear(bufs)
		bufs = bufs[:0]
		if err != nil {
			cl.counters.WriteErrors.Add(1)
			return "write: " + err.Error(), false
		}
		p.f.traffic.CountOut(cl.counters, n, bytes)
	}
}

// linkReader is a link's iketcp handshake, from the client's side: the
// key exchange, then the claims on the sessions the path's tickets name.
// Its methods run on the link's reader, but for hello.
type linkReader struct {
	path *linkPath
	link relay.Link
	ex   *ticket.Exchange
	key  ticket.Key
	// server is the server's public key; nil until it answered.
	server []byte
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
		lr.key, lr.server = key, server
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

// nextBackoff doubles the previous backoff within [lo, hi], with ±20%
// jitter so that many clients do not reconnect in step.
func nextBackoff(prev, lo, hi time.Duration) time.Duration {
	next := min(max(2*prev, lo), hi)
	jitter := time.Duration(rand.Int64N(int64(next)/5+1)) - next/10
	return next + jitter
}
