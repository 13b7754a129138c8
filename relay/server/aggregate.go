package server

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/aggregate"
	"github.com/iketcp/iketcp/relay/reorder"
	"github.com/iketcp/iketcp/relay/ticket"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// agg is a session's aggregate: the member connections of one location
// ID that carry it, beside each other. It exists once a member has
// joined (conn.join), and the session's datagrams toward the client are
// then spread over its live members by the algorithm the client chose.
type agg struct {
	location  [4]byte
	algorithm aggregate.Algorithm

	members atomic.Pointer[memberSet] // copy-on-write, under Server.mu

	// Owned by the session's backend reader.
	sched aggregate.Scheduler

	// reorder restores the order of what the members bring, on its way
	// to the backend; msgs is its Deliver's scratch, under its lock.
	reorder reorder.Buffer
	msgs    []udpbatch.Message
}

// newAgg returns the aggregate of sess.
func newAgg(sess *session, location [4]byte, alg aggregate.Algorithm) *agg {
	s := sess.srv
	a := &agg{location: location, algorithm: alg}
	a.sched.Algorithm = alg
	a.reorder.Budget = &s.reorderMemory
	a.reorder.Deliver = func(dgs []relay.Datagram) {
		var bytes uint64
		var k relay.Kinds
		for _, d := range dgs {
			a.msgs = append(a.msgs, udpbatch.Message{Buf: d.Bytes()})
			bytes += uint64(d.N)
			k.Note(d.Bytes())
		}
		sent, err := relay.WriteUDP(sess.udp, a.msgs)
		sess.traffic.CountIn(s.counters, sent, bytes, k)
		if err != nil && !sess.closed.Load() {
			s.counters.WriteErrors.Add(uint64(len(a.msgs) - sent))
			s.logs.backendSend.Log(s.log, slog.LevelWarn, "send to backend failed", "session", sess.id,
				"backend", s.cfg.Backend.String(), "err", backendHint(err))
		}
		clear(a.msgs)
		a.msgs = a.msgs[:0]
	}
	return a
}

// tune sizes the reorder buffer's hold from the live members' one-way
// delays.
func (a *agg) tune(limit time.Duration, now int64) {
	var oneWay [aggregate.MaxMembers]time.Duration
	n := 0
	var live uint32
	for _, m := range a.set().ms {
		if m.Live(now) && n < len(oneWay) {
			oneWay[n] = m.RTT() / 2
			n++
			live |= 1 << (m.Index % reorder.MaxMembers)
		}
	}
	a.reorder.SetHold(reorder.HoldFor(oneWay[:n], limit), limit)
	a.reorder.SetLive(live)
}

// memberSet is an aggregate's members at one time, in the client's order
// of configuration, with their measurements side by side for the
// scheduler.
type memberSet struct {
	ms    []*member
	stats []*aggregate.Member
}

// member is one member connection of an aggregate.
type member struct {
	aggregate.Member
	conn *conn
	sess *session
	up   atomic.Bool // as last logged

	out [][]byte // the backend reader's scratch
}

func (a *agg) set() *memberSet {
	if s := a.members.Load(); s != nil {
		return s
	}
	return &memberSet{}
}

// withLocked returns the set with m in place of any member of its index.
func (set *memberSet) with(m *member) *memberSet {
	n := &memberSet{}
	for _, o := range set.ms {
		if o.Index != m.Index {
			n.ms = append(n.ms, o)
		}
	}
	n.ms = append(n.ms, m)
	slices.SortFunc(n.ms, func(a, b *member) int { return int(a.Index) - int(b.Index) })
	for _, o := range n.ms {
		n.stats = append(n.stats, &o.Member)
	}
	return n
}

// without returns the set without m.
func (set *memberSet) without(m *member) *memberSet {
	n := &memberSet{}
	for _, o := range set.ms {
		if o != m {
			n.ms = append(n.ms, o)
			n.stats = append(n.stats, &o.Member)
		}
	}
	return n
}

// join adds this connection to a session's aggregate, if the client
// proves it owns the session: a Join's MAC under the session's key, bound
// to this link's handshake. Knowing the location ID and the SPIs proves
// nothing. A refused join spends the garbage budget.
func (c *conn) join(j framing.Join, now time.Time) bool {
	s := c.srv
	k := c.keys.Load()
	alg := aggregate.Algorithm(j.Algorithm)
	var why string
	var m *member
	s.mu.Lock()
	sess := s.sessions[j.Session]
	switch {
	case k == nil:
		why = "no handshake on this link"
	case sess == nil || !sess.keyed:
		why = "no such session"
	case sess.owner != "" && sess.owner != c.identity:
		why = "the session belongs to another identity"
	case !ticket.CheckJoin(sess.key, j.Session, j.Location, j.Algorithm, j.Weight, j.Member, k.client, k.server, j.MAC):
		why = "the MAC proves nothing"
	case !alg.Valid() || j.Member >= aggregate.MaxMembers:
		why = "unknown algorithm or member index"
	case c.member.Load() != nil:
		why = "this link is a member already"
	}
	a := sess.aggOf()
	if why == "" && a != nil && a.location != j.Location {
		why = fmt.Sprintf("the session's aggregate is location %s", locationString(a.location))
	}
	if why == "" {
		if a == nil {
			a = newAgg(sess, j.Location, alg)
			sess.agg.Store(a)
		}
		m = &member{conn: c, sess: sess}
		m.Name = fmt.Sprintf("%d %s", j.Member, c.remote)
		m.Index, m.Weight = j.Member, int(max(j.Weight, 1))
		if bl, ok := c.link.(backlogged); ok {
			m.Backlog = bl.Backlog
		}
		set := a.set()
		var replaced *member
		for _, o := range set.ms {
			if o.Index == m.Index {
				replaced = o
			}
		}
		if replaced == nil && len(set.ms) >= aggregate.MaxMembers {
			why = fmt.Sprintf("the aggregate has %d members, the most", aggregate.MaxMembers)
		} else {
			if replaced != nil {
				replaced.conn.member.Store(nil)
				s.unconfirmLocked(replaced.conn)
			}
			a.members.Store(set.with(m))
			c.member.Store(m)
			s.confirmLocked(c)
			if cur := sess.conn.Load(); cur == nil || cur.closed.Load() {
				s.moveLocked(sess, c, "a member of its aggregate joined")
			}
		}
	}
	s.mu.Unlock()
	result := byte(framing.JoinAccepted)
	if why != "" {
		result = framing.JoinRefused
		s.counters.JoinsRefused.Add(1)
		s.logs.joinRefused.Log(s.log, slog.LevelWarn, "join refused: "+why, "conn", c.id, "remote", c.remote,
			"session", j.Session, "location", locationString(j.Location))
	} else {
		m.Start(now.UnixNano())
		m.up.Store(true)
		c.current = sess
		s.counters.MembersJoined.Add(1)
		s.logs.joined.Log(s.log, slog.LevelInfo, "member joined an aggregate", "session", sess.id, "conn", c.id, "remote", c.remote,
			"location", locationString(j.Location), "algorithm", alg.String(), "member", j.Member, "weight", m.Weight)
	}
	c.sendControl(framing.ControlJoined, binary.BigEndian.AppendUint64(nil, j.Session), []byte{j.Member, result})
	return why == ""
}

// backlogged is a link that can say what waits on it (relay/streamlink).
type backlogged interface {
	Backlog() (queued int, rate uint64)
}

// aggOf returns the session's aggregate, or nil.
func (sess *session) aggOf() *agg {
	if sess == nil {
		return nil
	}
	return sess.agg.Load()
}

// leaveLocked takes c's member out of its aggregate. Server.mu must be
// held.
func (s *Server) leaveLocked(c *conn) {
	m := c.member.Swap(nil)
	if m == nil {
		return
	}
	if a := m.sess.aggOf(); a != nil {
		a.members.Store(a.set().without(m))
	}
	s.unconfirmLocked(c)
}

// probe handles a Probe from c: a member's is answered, or booked if it is
// an answer. Probes from a link that is no member prove nothing.
func (c *conn) probe(p framing.Probe, now time.Time) bool {
	m := c.member.Load()
	if m == nil {
		return false
	}
	if p.Flags&framing.ProbeReply != 0 {
		m.Answered(p, now.UnixNano())
		return true
	}
	p.Flags = framing.ProbeReply
	c.sendProbe(p)
	return true
}

// sendProbe sends a Probe on c.
func (c *conn) sendProbe(p framing.Probe) {
	buf := framing.AppendProbe(make([]byte, relay.Headroom, relay.Headroom+framing.ControlHeaderSize+framing.ProbeSize), p)
	if err := c.send([][]byte{buf}); err != nil {
		c.srv.logs.controlUnsent.Log(c.srv.log, slog.LevelDebug, "probe not sent", "conn", c.id, "err", err)
	}
}

// probeMembers probes every aggregate's members every
// aggregate.ProbeInterval until ctx ends, and logs members that leave or
// rejoin the rotation.
func (s *Server) probeMembers(ctx context.Context) {
	defer s.wg.Done()
	t := time.NewTicker(aggregate.ProbeInterval)
	defer t.Stop()
	var ms []*member
	var aggs []*agg
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ms, aggs = ms[:0], aggs[:0]
		s.mu.Lock()
		for _, sess := range s.sessions {
			if a := sess.aggOf(); a != nil {
				ms = append(ms, a.set().ms...)
				aggs = append(aggs, a)
			}
		}
		s.mu.Unlock()
		now := time.Now().UnixNano()
		for _, a := range aggs {
			a.tune(s.cfg.reorderMax(), now)
		}
		clear(aggs)
		for _, m := range ms {
			live := m.Live(now)
			if m.up.Swap(live) != live {
				state := "left the rotation: its probes went unanswered"
				if live {
					state = "is back in the rotation"
				} else {
					s.counters.MembersDown.Add(1)
				}
				s.logs.memberState.Log(s.log, slog.LevelInfo, "member "+state, "session", m.sess.id, "conn", m.conn.id,
					"remote", m.conn.remote, "member", m.Index)
			}
			m.conn.sendProbe(m.NextProbe(now))
		}
		clear(ms)
	}
}

// toMembers sends frames over a's live members, as its algorithm picks,
// and reports whether it did; with no live member it leaves them to the
// session's return path. It runs on the session's backend reader and
// does not allocate.
func (a *agg) toMembers(sess *session, frames [][]byte) bool {
	set := a.members.Load()
	if set == nil || len(set.ms) == 0 {
		return false
	}
	now := time.Now().UnixNano()
	for _, f := range frames {
		i := a.sched.Pick(set.stats, f[relay.Headroom:], now)
		if i < 0 { // none is live: nothing went yet, as frames are picked before any is sent
			for _, m := range set.ms {
				clear(m.out)
				m.out = m.out[:0]
			}
			return false
		}
		set.ms[i].out = append(set.ms[i].out, f)
	}
	s := sess.srv
	for _, m := range set.ms {
		if len(m.out) == 0 {
			continue
		}
		var n uint64
		var k relay.Kinds
		for _, f := range m.out {
			n += uint64(len(f) - relay.Headroom)
			k.Note(f[relay.Headroom:])
		}
		if err := m.conn.send(m.out); err != nil {
			s.counters.NoPath.Add(uint64(len(m.out)))
		} else {
			m.CountOut(len(m.out), n)
			sess.traffic.CountOut(s.counters, len(m.out), n, k)
		}
		clear(m.out)
		m.out = m.out[:0]
	}
	return true
}

// locationString prints a location ID as FortiOS does, a dotted quad.
func locationString(l [4]byte) string {
	return fmt.Sprintf("%d.%d.%d.%d", l[0], l[1], l[2], l[3])
}

// aggregateStatus describes the session's aggregate, or returns nil.
func (sess *session) aggregateStatus(now time.Time) *relay.AggregateStatus {
	a := sess.aggOf()
	if a == nil {
		return nil
	}
	as := &relay.AggregateStatus{LocationID: locationString(a.location), Algorithm: a.algorithm.String(), Session: sess.id}
	for _, m := range a.set().ms {
		ms := relay.MemberStatusOf(&m.Member, now)
		ms.Remote, ms.Local = m.conn.remote, m.conn.link.LocalAddr()
		as.Members = append(as.Members, ms)
	}
	as.Reorder = a.reorder.Status()
	return as
}
