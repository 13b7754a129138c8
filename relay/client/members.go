package client

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
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
)

// relinkAfter is how long a joined member may go without an answered
// probe before its link is given up and dialled anew: a TCP connection
// whose path failed can take longer than that to retransmit once the path
// heals.
const relinkAfter = 5 * time.Second

// Member is one member link of an aggregate, as the client is told: its
// name, the iketcp server it dials (each member may dial another address
// of the hub), the dialer that leaves by the member's own local address,
// and its weight for the weighted algorithm.
type Member struct {
	Name   string
	Peer   string
	Dialer relay.Dialer
	Weight int
}

// checkAggregate says what is wrong with an aggregate's configuration.
func (c *Config) checkAggregate() error {
	if len(c.Members) == 0 {
		return nil
	}
	switch {
	case c.PlainRFC9329:
		return errors.New("aggregate members need an iketcp server: they join with iketcp's own control messages, which --plain-rfc9329 forbids")
	case len(c.Members) > aggregate.MaxMembers:
		return fmt.Errorf("%d members: an aggregate has at most %d", len(c.Members), aggregate.MaxMembers)
	case c.Aggregate != 0 && !c.Aggregate.Valid():
		return fmt.Errorf("aggregate algorithm %v", c.Aggregate)
	}
	for i, m := range c.Members {
		if m.Dialer == nil || m.Peer == "" || m.Name == "" {
			return fmt.Errorf("member %d: needs a name, a peer and a dialer", i)
		}
		if m.Weight < 0 || m.Weight > 255 {
			return fmt.Errorf("member %s: weight %d, want 1 to 255", m.Name, m.Weight)
		}
	}
	return nil
}

// memberPath is one member of a link path's aggregate: a link of its own,
// kept up with reconnects, that joins the server's session once the path
// holds the session's ticket, and probes the server while it is a member.
type memberPath struct {
	p     *linkPath
	cfg   Member
	index uint8
	stats aggregate.Member

	state  atomic.Int32
	conns  atomic.Uint64
	joined atomic.Bool
	up     atomic.Bool // as last logged

	mu    sync.Mutex // guards the following
	link  relay.Link
	local string
	peer  string

	out [][]byte // guarded by linkPath.smu: sendAggregate's scratch
}

// initMembers makes p an aggregate of the client's members.
func (p *linkPath) initMembers() {
	cfg := &p.f.cl.cfg
	p.sched.Algorithm = relay.OrDefault(cfg.Aggregate, aggregate.RoundRobin)
	p.reorder.Deliver = func(dgs []relay.Datagram) { p.f.deliver(dgs, &p.scratch) }
	for i, m := range cfg.Members {
		mp := &memberPath{p: p, cfg: m, index: uint8(i)}
		mp.stats.Name, mp.stats.Index, mp.stats.Weight = m.Name, uint8(i), max(m.Weight, 1)
		mp.stats.Backlog = mp.backlog
		p.members = append(p.members, mp)
		p.stats = append(p.stats, &mp.stats)
	}
}

// startMembers starts every member's link, and stops the reorder
// buffer's timer when the path ends.
func (p *linkPath) startMembers() {
	cl := p.f.cl
	for _, m := range p.members {
		cl.wg.Add(1)
		go m.run()
	}
	cl.wg.Add(1)
	go func() {
		defer cl.wg.Done()
		<-p.ctx.Done()
		p.reorder.Close()
	}()
}

// tuneReorder sizes the reorder buffer's hold from the live members'
// one-way delays.
func (p *linkPath) tuneReorder(now int64) {
	var oneWay [aggregate.MaxMembers]time.Duration
	n := 0
	var live uint32
	for _, m := range p.stats {
		if m.Live(now) && n < len(oneWay) {
			oneWay[n] = m.RTT() / 2
			n++
			live |= 1 << (m.Index % reorder.MaxMembers)
		}
	}
	limit := reorder.Limit(p.f.cl.cfg.ReorderMax)
	p.reorder.SetHold(reorder.HoldFor(oneWay[:n], limit), limit)
	p.reorder.SetLive(live)
}

// sendAggregate spreads bufs over the live members as the algorithm picks.
// Before any member has joined (the session does not exist yet, or the
// server has not answered the joins), they go on the primary: the first
// member whose link came up, which carries the session as it starts.
// With no member link up, they wait in the path's queue. It does not
// allocate once the scratch has grown.
func (p *linkPath) sendAggregate(bufs [][]byte) {
	cl := p.f.cl
	now := time.Now().UnixNano()
	var total uint64
	p.smu.Lock()
	defer p.smu.Unlock()
	var waiting int
	var kinds relay.Kinds
	for k, b := range bufs {
		total += uint64(len(b) - relay.Headroom)
		kinds.Note(b[relay.Headroom:])
		i := p.sched.Pick(p.stats, b[relay.Headroom:], now)
		var m *memberPath
		if i >= 0 {
			m = p.members[i]
		} else {
			m = p.primaryLocked()
		}
		if m == nil {
			bufs[waiting] = bufs[k]
			waiting++
			continue
		}
		m.out = append(m.out, b)
	}
	if waiting > 0 {
		p.mu.Lock()
		for _, b := range bufs[:waiting] {
			p.waiting.Push(b, sendq.LaneOf(b[relay.Headroom:]), now)
		}
		p.countDropsLocked()
		p.mu.Unlock()
	}
	for _, m := range p.members {
		if len(m.out) == 0 {
			continue
		}
		var n uint64
		for _, b := range m.out {
			n += uint64(len(b) - relay.Headroom)
		}
		m.mu.Lock()
		link := m.link
		m.mu.Unlock()
		if link == nil {
			cl.counters.NoPath.Add(uint64(len(m.out)))
		} else if err := link.Send(m.out); err != nil {
			cl.counters.NoPath.Add(uint64(len(m.out)))
			link.Close() // its reader ends, and the member reconnects
		} else {
			m.stats.CountOut(len(m.out), n)
		}
		clear(m.out)
		m.out = m.out[:0]
	}
	p.f.traffic.CountOut(cl.counters, len(bufs), total, kinds)
}

// primaryLocked returns the member that carries the path while none is
// in the rotation: the one it was, while its link is up, else the first
// whose link is. p.smu must be held.
func (p *linkPath) primaryLocked() *memberPath {
	if m := p.primary; m != nil && m.state.Load() == stateUp {
		return m
	}
	p.primary = nil
	for _, m := range p.members {
		if m.state.Load() == stateUp {
			p.primary = m
			break
		}
	}
	return p.primary
}

// backlog says what waits on the member's link and the rate it delivers
// at, for least-latency: nothing while it has no link, or one that does
// not know.
func (m *memberPath) backlog() (queued int, rate uint64) {
	m.mu.Lock()
	link := m.link
	m.mu.Unlock()
	if bl, ok := link.(interface{ Backlog() (int, uint64) }); ok {
		return bl.Backlog()
	}
	return 0, 0
}

// run keeps the member's link up, reconnecting with backoff.
func (m *memberPath) run() {
	p := m.p
	cl := p.f.cl
	defer cl.wg.Done()
	backoff := time.Duration(0)
	for p.ctx.Err() == nil {
		m.state.Store(stateConnecting)
		link, err := m.connect()
		if err != nil {
			if p.ctx.Err() != nil {
				return
			}
			cl.counters.DialFailures.Add(1)
			backoff = nextBackoff(backoff, cl.cfg.reconnectMin(), cl.cfg.reconnectMax())
			cl.logDial.Log(cl.log, slog.LevelWarn, "member cannot connect to the iketcp server, retrying", "flow", p.f.id,
				"link", p.id, "member", m.cfg.Name, "peer", m.cfg.Peer, "err", err, "retry_in", backoff.Round(time.Millisecond).String())
			m.state.Store(stateWaiting)
			if !relay.SleepCtx(p.ctx, backoff) {
				return
			}
			continue
		}
		connected := time.Now()
		reason := m.carry(link)
		m.state.Store(stateWaiting)
		if p.ctx.Err() != nil {
			return
		}
		if time.Since(connected) >= stableAfter {
			backoff = 0
		}
		backoff = nextBackoff(backoff, cl.cfg.reconnectMin(), cl.cfg.reconnectMax())
		cl.log.Info("member connection lost, reconnecting", "flow", p.f.id, "link", p.id, "member", m.cfg.Name,
			"peer", m.cfg.Peer, "reason", reason, "retry_in", backoff.Round(time.Millisecond).String())
		if !relay.SleepCtx(p.ctx, backoff) {
			return
		}
	}
}

// connect opens the member's link.
func (m *memberPath) connect() (relay.Link, error) {
	p := m.p
	cl := p.f.cl
	ctx, cancel := context.WithTimeout(p.ctx, cl.cfg.dialTimeout())
	defer cancel()
	link, err := m.cfg.Dialer.DialLink(ctx, m.cfg.Peer)
	if err != nil {
		return nil, err
	}
	cl.counters.ConnsDialed.Add(1)
	m.mu.Lock()
	m.peer, m.local = link.RemoteAddr(), link.LocalAddr()
	m.mu.Unlock()
	n := m.conns.Add(1)
	p.conns.Add(1)
	cl.log.Info("member connected", "flow", p.f.id, "link", p.id, "member", m.cfg.Name, "peer", link.RemoteAddr(),
		"local", link.LocalAddr(), "connections", n)
	return link, nil
}

// carry runs the member's link until it fails or the path ends: hello,
// then the join once the path holds a ticket, and a probe every
// aggregate.ProbeInterval while joined. A member whose probes go
// unanswered for relinkAfter gives its link up.
func (m *memberPath) carry(link relay.Link) string {
	p := m.p
	cl := p.f.cl
	lr := &linkReader{path: p, link: link, member: m}
	if err := lr.hello(); err != nil {
		link.Close()
		return "hello: " + err.Error()
	}
	readDone := make(chan error, 1)
	cl.wg.Add(1)
	go func() {
		defer cl.wg.Done()
		readDone <- link.Serve(newPeerReader(p.f, fallback.TCP, lr))
	}()
	var reason string
	if err := m.attach(link); err != nil {
		reason = "write: " + err.Error()
	} else {
		reason = m.tend(lr, readDone)
	}
	m.joined.Store(false)
	m.stats.Stop()
	m.mu.Lock()
	m.link = nil
	m.mu.Unlock()
	link.Close()
	<-readDone
	return reason
}

// attach sends what waited for a link on link, and makes it the member's.
func (m *memberPath) attach(link relay.Link) error {
	p := m.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.flushWaitingLocked(link); err != nil {
		return err
	}
	m.mu.Lock()
	m.link = link
	m.mu.Unlock()
	m.state.Store(stateUp)
	return nil
}

// tend probes and joins on the member's link until it ends, and says why.
func (m *memberPath) tend(lr *linkReader, readDone chan error) string {
	p := m.p
	cl := p.f.cl
	t := time.NewTicker(aggregate.ProbeInterval)
	defer t.Stop()
	for {
		select {
		case err := <-readDone:
			readDone <- err
			return err.Error()
		case <-p.ctx.Done():
			return "link closed"
		case <-t.C:
		}
		lr.joinOnce()
		if !m.joined.Load() {
			continue
		}
		now := time.Now().UnixNano()
		p.tuneReorder(now)
		live := m.stats.Live(now)
		if m.up.Swap(live) != live {
			if live {
				cl.log.Info("member is back in the rotation", "flow", p.f.id, "link", p.id, "member", m.cfg.Name)
			} else {
				cl.counters.MembersDown.Add(1)
				cl.log.Warn("member left the rotation: its probes went unanswered", "flow", p.f.id, "link", p.id,
					"member", m.cfg.Name, "for", aggregate.DeadAfter.String())
			}
		}
		if !live && now-m.stats.LastAnswer() > int64(relinkAfter) {
			return fmt.Sprintf("no probe answered for %v", relinkAfter)
		}
		lr.sendProbe(m.stats.NextProbe(now))
	}
}

// joinOnce sends the member's Join, once per link, when the link's key
// exchange is done and the path holds a ticket.
func (lr *linkReader) joinOnce() {
	m := lr.member
	p := lr.path
	lr.jmu.Lock()
	defer lr.jmu.Unlock()
	if lr.joinSent || lr.server == nil {
		return
	}
	p.mu.Lock()
	var t heldTicket
	if n := len(p.tickets); n > 0 {
		t = p.tickets[n-1]
	}
	p.mu.Unlock()
	if t.id == 0 {
		return
	}
	cfg := &p.f.cl.cfg
	alg, weight := uint8(p.sched.Algorithm), uint8(max(m.cfg.Weight, 1))
	mac := ticket.JoinMAC(t.key, t.id, cfg.LocationID, alg, weight, m.index, lr.ex.Public(), lr.server)
	if lr.send(framing.ControlJoin, cfg.LocationID[:], binary.BigEndian.AppendUint64(nil, t.id), []byte{alg, weight, m.index}, mac[:]) == nil {
		lr.joinSent = true
	}
}

// joined handles the server's answer to the member's Join.
func (lr *linkReader) joined(c *framing.Control) {
	m := lr.member
	p := lr.path
	cl := p.f.cl
	if c.Body[8] != m.index {
		return
	}
	if c.Body[9] != framing.JoinAccepted {
		cl.counters.JoinsRefused.Add(1)
		cl.logDrop.Log(cl.log, slog.LevelWarn, "the server refused a member's join", "flow", p.f.id, "link", p.id,
			"member", m.cfg.Name, "session", c.SessionID())
		return
	}
	m.stats.Start(time.Now().UnixNano())
	m.up.Store(true)
	m.joined.Store(true)
	cl.counters.MembersJoined.Add(1)
	cl.log.Info("member joined the aggregate", "flow", p.f.id, "link", p.id, "member", m.cfg.Name,
		"session", c.SessionID(), "local", lr.link.LocalAddr())
}

// probe handles a Probe on the member's link: the server's is answered,
// an answer to one of ours is booked.
func (lr *linkReader) probe(c *framing.Control) {
	m := lr.member
	pr := c.Probe()
	if pr.Flags&framing.ProbeReply != 0 {
		if m.joined.Load() {
			m.stats.Answered(pr, time.Now().UnixNano())
		}
		return
	}
	pr.Flags = framing.ProbeReply
	lr.sendProbe(pr)
}

// sendProbe sends a Probe on the link.
func (lr *linkReader) sendProbe(pr framing.Probe) {
	buf := framing.AppendProbe(make([]byte, relay.Headroom, relay.Headroom+framing.ControlHeaderSize+framing.ProbeSize), pr)
	lr.link.Send([][]byte{buf})
}

// aggregateStatus describes the path's aggregate.
func (p *linkPath) aggregateStatus(now time.Time) relay.AggregateStatus {
	cfg := &p.f.cl.cfg
	p.mu.Lock()
	session := p.session
	p.mu.Unlock()
	as := relay.AggregateStatus{
		LocationID: fmt.Sprintf("%d.%d.%d.%d", cfg.LocationID[0], cfg.LocationID[1], cfg.LocationID[2], cfg.LocationID[3]),
		Algorithm:  p.sched.Algorithm.String(),
		Session:    session,
	}
	for _, m := range p.members {
		ms := relay.MemberStatusOf(&m.stats, now)
		ms.Connections = m.conns.Load()
		m.mu.Lock()
		ms.Local, ms.Remote = m.local, relay.OrDefault(m.peer, m.cfg.Peer)
		m.mu.Unlock()
		switch {
		case m.joined.Load():
		case m.state.Load() == stateUp:
			ms.State = "joining"
		case m.state.Load() == stateConnecting:
			ms.State = "connecting"
		default:
			ms.State = "waiting"
		}
		as.Members = append(as.Members, ms)
	}
	as.Reorder = p.reorder.Status()
	return as
}
