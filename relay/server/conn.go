package server

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/ticket"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

const (
	// GarbageBudget is how many undeliverable frames (malformed, for no
	// session, control messages that prove nothing) a connection may send
	// at once, and GarbageRate how many a second after that, however many
	// good frames it sends besides: RFC 9329 6.1 asks to close on
	// sustained garbage, not on a single unknown SPI.
	GarbageBudget = 32
	GarbageRate   = 4.0
	// ObserveBurst and ObserveRate bound the Observed answers the whole
	// server gives (`iketcp probe` asks once per link): each is one small
	// frame on the asker's own link, and beyond the bound askers get none.
	ObserveBurst = 20
	ObserveRate  = 10.0
	// connBatch is how many frames a connection gathers before sending
	// them to the backend.
	connBatch = 64
)

// conn is one client's link, as the server serves it: the receiver of what
// the client sends, and the return path of the sessions it carries.
type conn struct {
	srv      *Server
	link     relay.Link
	id       uint64
	remote   string
	src      source
	accepted time.Time

	closed    atomic.Bool
	closeOnce sync.Once
	keys      atomic.Pointer[linkKeys] // set once the client said hello: an iketcp client
	member    atomic.Pointer[member]   // set once it joined an aggregate, under Server.mu
	observed  atomic.Bool              // the link asked Observe (once per link)

	// Guarded by Server.mu.
	carrying         map[*session]struct{} // sessions whose return path this is; nil once forgotten
	confirmed        int                   // how many of them are confirmed
	unconfirmedSince time.Time

	// Owned by the link's reader (Receive's caller).
	identity  string // the TLS client certificate's subject, known from the first burst
	msg       framing.Message
	current   *session // the session of the last frame this connection carries
	lastESP   uint32   // cache of the last ESP lookup
	lastRoute *route
	garbage   budget
	pings     budget // liveness pings answered
	pending   []pendingFrame
	out       []udpbatch.Message
	dgs       []relay.Datagram // flushMember's scratch
	frames    uint64
}

// linkKeys is an iketcp client's side of the link's key exchange.
type linkKeys struct {
	client, server []byte // the public keys
	key            ticket.Key
}

type pendingFrame struct {
	sess    *session
	payload []byte
}

func (s *Server) newConnLocked(link relay.Link, remote string, src source, now time.Time) *conn {
	c := &conn{
		srv:              s,
		link:             link,
		id:               s.nextConnID.Add(1),
		remote:           remote,
		src:              src,
		accepted:         now,
		unconfirmedSince: now,
		carrying:         make(map[*session]struct{}),
	}
	s.conns[c] = struct{}{}
	return c
}

// Receive routes a burst of the client's datagrams to their sessions and
// sends them on to the backend. Sustained garbage ends the link.
func (c *conn) Receive(burst []relay.Datagram) error {
	if c.pending == nil {
		c.pending = make([]pendingFrame, 0, connBatch)
		c.out = make([]udpbatch.Message, 0, connBatch)
		c.identity = relay.IdentityOf(c.link) // the handshake is done once data came
	}
	now := time.Now()
	for _, d := range burst {
		c.frames++
		if err := c.route(d.Bytes(), now); err != nil {
			c.flush(now)
			return err
		}
		if len(c.pending) == cap(c.pending) {
			c.flush(now)
		}
	}
	c.flush(now)
	return nil
}

// route puts one datagram in its session's pending batch, or counts and
// drops it. It returns an error to close the connection.
func (c *conn) route(p []byte, now time.Time) error {
	s := c.srv
	if err := c.msg.Decode(p); err != nil {
		s.counters.Malformed.Add(1)
		s.logs.malformed.Log(s.log, slog.LevelWarn, "malformed frame dropped", "conn", c.id, "remote", c.remote, "len", len(p), "err", err)
		return c.undeliverable(now)
	}
	var sess *session
	switch c.msg.Kind {
	case framing.KindKeepalive:
		// RFC 9329 6.6: keepalives are not sent over TCP; drop silently.
		s.counters.KeepalivesDropped.Add(1)
		return nil
	case framing.KindControl:
		if !c.control(&c.msg.Control, now) {
			return c.undeliverable(now)
		}
		return nil
	case framing.KindIKE:
		sess = c.sessionForIKE(&c.msg.IKE, now)
	case framing.KindESP:
		sess = c.sessionForESP(c.msg.ESP.SPI, now)
	}
	if sess == nil {
		return c.undeliverable(now)
	}
	c.pending = append(c.pending, pendingFrame{sess, p})
	return nil
}

// undeliverable spends the connection's garbage budget on a frame that
// went nowhere, and closes the connection when the budget is spent.
func (c *conn) undeliverable(now time.Time) error {
	if c.garbage.take(now, GarbageBudget, GarbageRate) {
		return nil
	}
	c.srv.counters.GarbageCloses.Add(1)
	return &relay.ProtocolError{Reason: fmt.Sprintf("sustained garbage: more than %d undeliverable frames, then more than %g a second", GarbageBudget, GarbageRate)}
}

// carries reports whether c is sess's return path; c.current is only ever
// such a session.
func (c *conn) carries(sess *session) bool {
	return sess != nil && !sess.closed.Load() && (sess.conn.Load() == c || c.memberOf(sess))
}

// memberOf reports whether c is a member of sess's aggregate.
func (c *conn) memberOf(sess *session) bool {
	m := c.member.Load()
	return m != nil && m.sess == sess
}

// sessionForIKE finds the session of an IKE message: by its IKE SA, or a
// new one for an IKE_SA_INIT request, or, for a rekeyed IKE SA, the
// session this connection carries.
func (c *conn) sessionForIKE(h *framing.IKEHeader, now time.Time) *session {
	s := c.srv
	s.mu.Lock()
	r := s.routes.ike.m[h.InitiatorSPI]
	if r == nil && !h.IsInitRequest() {
		if cur := c.current; c.carries(cur) && cur.confirmed.Load() && s.learnLocked(cur, now) {
			r = s.routes.ike.add(cur, &cur.ikeKeys, h.InitiatorSPI, now)
		}
	}
	if r != nil && !h.IsResponse() && (!r.anyReq || h.MessageID > r.maxReq) {
		s.stateChanged() // a new SA or a fresh request: both outlive a restart
	}
	if r == nil {
		s.mu.Unlock()
		if h.IsInitRequest() {
			return c.openSession(h, now)
		}
		s.counters.UnknownSPI.Add(1)
		s.logs.unknownIKE.Log(s.log, slog.LevelInfo, "IKE message for an unknown IKE SA dropped", "conn", c.id, "remote", c.remote,
			"ike_spi", relay.SPI64(h.InitiatorSPI), "exchange", h.Exchange.String())
		return nil
	}
	sess := r.sess
	if !s.ownsLocked(sess, c) {
		s.mu.Unlock()
		return nil
	}
	fresh := !h.IsResponse() && r.request(h.MessageID)
	s.steerLocked(sess, c, fresh, h)
	r.touch(now.Unix())
	carrier := c.carries(sess)
	s.mu.Unlock()
	if carrier {
		c.current = sess
	}
	sess.book.NoteIKE(h)
	return sess
}

// sessionForESP finds the session of ESP with the given SPI, or lets the
// session this connection carries learn the SPI: a new child SA.
func (c *conn) sessionForESP(spi uint32, now time.Time) *session {
	if r := c.lastRoute; r != nil && c.lastESP == spi && c.carries(r.sess) {
		r.touch(now.Unix())
		return r.sess
	}
	s := c.srv
	s.mu.Lock()
	r := s.routes.esp.m[spi]
	if r == nil {
		if cur := c.current; c.carries(cur) && cur.confirmed.Load() && s.learnLocked(cur, now) {
			if r = s.routes.esp.add(cur, &cur.espKeys, spi, now); r != nil {
				s.stateChanged()
			}
		}
		if r == nil {
			s.mu.Unlock()
			s.counters.UnknownSPI.Add(1)
			s.logs.unknownESP.Log(s.log, slog.LevelInfo, "ESP for an unknown SPI dropped", "conn", c.id, "remote", c.remote, "spi", relay.SPI32(spi))
			return nil
		}
	}
	sess := r.sess
	if !s.ownsLocked(sess, c) {
		s.mu.Unlock()
		return nil
	}
	s.steerLocked(sess, c, false, nil)
	r.touch(now.Unix())
	carrier := c.carries(sess)
	s.mu.Unlock()
	c.lastESP, c.lastRoute = spi, nil
	if carrier {
		c.current, c.lastRoute = sess, r
	}
	sess.book.NoteESPIn(spi)
	return sess
}

// learnLocked spends sess's learning budget on a new SPI; refused, it is
// counted. Server.mu must be held.
func (s *Server) learnLocked(sess *session, now time.Time) bool {
	if sess.learn.take(now, learnBurst, learnRate) {
		return true
	}
	s.counters.LearnRefused.Add(1)
	return false
}

// ownsLocked reports whether c may carry sess: a session created over TLS
// with a client certificate belongs to that certificate's identity, and
// frames of it from a connection with another identity (or none) are
// counted and dropped. Server.mu must be held.
func (s *Server) ownsLocked(sess *session, c *conn) bool {
	if sess.owner == "" || sess.owner == c.identity {
		return true
	}
	s.counters.IdentityRefused.Add(1)
	return false
}

// steerLocked decides where sess's replies go when a frame of it comes on
// c. If c carries it, nothing changes. If no live connection carries it
// (its client's connection is gone), c takes it. Otherwise the frame is a
// stray: it goes on to the backend, which checks it, but the replies stay
// where they are, unless it is a fresh IKE request: then c is noted, and
// takes the session if the backend answers that request (session.go).
// Server.mu must be held.
func (s *Server) steerLocked(sess *session, c *conn, fresh bool, h *framing.IKEHeader) {
	cur := sess.conn.Load()
	switch {
	case cur == c:
	case c.memberOf(sess) && cur != nil && !cur.closed.Load():
		// A member of its aggregate: it carries the session beside the
		// others.
	case cur == nil || cur.closed.Load():
		s.moveLocked(sess, c, "its connection was gone")
	default:
		s.counters.StrayFrames.Add(1)
		if fresh {
			sess.vouch = vouch{conn: c, ispi: h.InitiatorSPI, msgID: h.MessageID}
		}
	}
}

// moveLocked makes c the return path of sess, and logs why.
func (s *Server) moveLocked(sess *session, c *conn, why string) {
	old := sess.conn.Load()
	s.carryLocked(sess, c)
	if sess.conn.Load() != c {
		return // c was closed meanwhile
	}
	sess.vouch = vouch{}
	if sess.conns.Add(1) > 1 {
		s.counters.Rebinds.Add(1)
		from := "none"
		if old != nil {
			from = old.remote
		}
		s.logs.moved.Log(s.log, slog.LevelInfo, "session moved to another connection: "+why, "session", sess.id,
			"from", from, "to", c.remote, "backend_local", sess.local.String())
	}
}

// openSession starts a session for an IKE_SA_INIT request, which this
// connection carries.
func (c *conn) openSession(h *framing.IKEHeader, now time.Time) *session {
	s := c.srv
	sess, created, err := s.newSession(c, h, now)
	if err != nil {
		s.counters.SessionsRejected.Add(1)
		s.logs.initDropped.Log(s.log, slog.LevelWarn, "IKE_SA_INIT dropped: "+err.Error(), "conn", c.id, "remote", c.remote)
		return nil
	}
	if created {
		c.current = sess
		s.logs.created.Log(s.log, slog.LevelInfo, "session created", "session", sess.id, "remote", c.remote,
			"ike_spi", relay.SPI64(h.InitiatorSPI), "backend_local", sess.local.String())
	}
	sess.book.NoteIKE(h)
	return sess
}

// control handles an iketcp control message from the client, and reports
// whether it was one a client may send.
func (c *conn) control(m *framing.Control, now time.Time) bool {
	switch m.Type {
	case framing.ControlHello:
		return c.hello(m.Body)
	case framing.ControlClaim:
		return c.claim(m.SessionID(), m.Body[8:], now)
	case framing.ControlMove:
		return c.move(binary.BigEndian.Uint32(m.Body), m.SessionID(), m.Body[12:], now)
	case framing.ControlJoin:
		return c.join(m.Join(), now)
	case framing.ControlProbe:
		return c.probe(m.Probe(), now)
	case framing.ControlObserve:
		return c.observe(m.Body, now)
	case framing.ControlPing:
		return c.ping(m.Body, now)
	}
	return false
}

// observe answers `iketcp probe`'s Observe with the address and port this
// link came from, as the asker's NAT left them (or as a trusted PROXY
// header gave them): the asker's own, and nothing else. Once per link; a
// second one is garbage. Server-wide, at most ObserveBurst answers at
// once and ObserveRate a second: an asker over that gets no answer, and
// the link stays as it is.
func (c *conn) observe(nonce []byte, now time.Time) bool {
	s := c.srv
	if c.observed.Swap(true) {
		return false
	}
	ap, err := netip.ParseAddrPort(c.remote)
	if err != nil {
		return false
	}
	s.observeMu.Lock()
	ok := s.observes.take(now, ObserveBurst, ObserveRate)
	s.observeMu.Unlock()
	if !ok {
		s.counters.ObservesRefused.Add(1)
		s.logs.observeRefused.Log(s.log, slog.LevelInfo, "probe not answered: over the server's rate of answers", "conn", c.id, "remote", c.remote)
		return true
	}
	s.counters.ObservesAnswered.Add(1)
	addr := ap.Addr().As16()
	var port [2]byte
	binary.BigEndian.PutUint16(port[:], ap.Port())
	c.sendControl(framing.ControlObserved, nonce, addr[:], port[:])
	return true
}

// Liveness pings a connection may send at once, and a second after that.
// An iketcp client probes a quiet link every quarter of its liveness
// timeout; anything faster is garbage.
const (
	pingBurst = 8
	pingRate  = 4.0
)

// ping answers an iketcp client's liveness probe with a Pong carrying its
// sequence number: one frame of the same size per ping, only on a link
// whose client said hello, and at most pingBurst, then pingRate a second.
func (c *conn) ping(seq []byte, now time.Time) bool {
	if c.keys.Load() == nil || !c.pings.take(now, pingBurst, pingRate) {
		return false
	}
	c.srv.counters.PingsAnswered.Add(1)
	c.sendControl(framing.ControlPong, seq)
	return true
}

// move moves ESP SPI spi from session from to the session this
// connection carries, if the client proves it owns session from: its
// first packets went to the wrong connection, and the peer's answers have
// shown it since.
func (c *conn) move(spi uint32, fromID uint64, mac []byte, now time.Time) bool {
	s := c.srv
	k := c.keys.Load()
	to := c.current
	ok := false
	s.mu.Lock()
	from := s.sessions[fromID]
	r := s.routes.esp.m[spi]
	if k != nil && from != nil && from.keyed && r != nil && r.sess == from && c.carries(to) && to != from && from.owner == to.owner &&
		to.confirmed.Load() && ticket.CheckMove(from.key, fromID, spi, k.client, k.server, mac) {
		s.routes.esp.forget(from, &from.espKeys, spi)
		ok = s.routes.esp.add(to, &to.espKeys, spi, now) != nil
	}
	s.mu.Unlock()
	if !ok {
		s.counters.ClaimsRefused.Add(1)
		s.logs.claimRefused.Log(s.log, slog.LevelWarn, "move refused: it proves nothing", "conn", c.id, "remote", c.remote,
			"spi", relay.SPI32(spi), "from_session", fromID)
		return false
	}
	s.counters.SPIMoves.Add(1)
	s.stateChanged()
	c.lastRoute = nil
	to.book.NoteESPIn(spi)
	return true
}

// hello answers an iketcp client's Hello: the link's key exchange.
func (c *conn) hello(clientPub []byte) bool {
	if c.keys.Load() != nil {
		return false // once per link
	}
	ex, err := ticket.NewExchange()
	if err != nil {
		return false
	}
	client := append([]byte(nil), clientPub...)
	key, err := ex.LinkKey(client, client, ex.Public())
	if err != nil {
		return false
	}
	c.keys.Store(&linkKeys{client: client, server: ex.Public(), key: key})
	c.sendControl(framing.ControlHelloReply, ex.Public())
	return true
}

// claim moves a session to this link if the client proves it owns it.
func (c *conn) claim(id uint64, mac []byte, now time.Time) bool {
	s := c.srv
	k := c.keys.Load()
	ok := false
	s.mu.Lock()
	sess := s.sessions[id]
	if k != nil && sess != nil && sess.keyed && (sess.owner == "" || sess.owner == c.identity) &&
		ticket.CheckClaim(sess.key, id, k.client, k.server, mac) {
		ok = true
		if sess.conn.Load() != c {
			s.moveLocked(sess, c, "its client proved it owns it")
		}
	}
	s.mu.Unlock()
	result := byte(framing.ClaimRefused)
	if ok {
		result = framing.ClaimAccepted
		c.current = sess
		s.counters.ClaimsAccepted.Add(1)
	} else {
		s.counters.ClaimsRefused.Add(1)
		s.logs.claimRefused.Log(s.log, slog.LevelWarn, "claim refused: it proves nothing", "conn", c.id, "remote", c.remote, "session", id)
	}
	c.sendControl(framing.ControlClaimed, binary.BigEndian.AppendUint64(nil, id), []byte{result})
	return ok
}

// sendControl sends a control message to the client.
func (c *conn) sendControl(t framing.ControlType, parts ...[]byte) {
	buf := framing.AppendControl(make([]byte, relay.Headroom, relay.Headroom+64), t, parts...)
	if err := c.send([][]byte{buf}); err != nil {
		c.srv.logs.controlUnsent.Log(c.srv.log, slog.LevelDebug, "control message not sent", "conn", c.id, "type", t.String(), "err", err)
	}
}

// flush sends the pending frames to their sessions' backend sockets, one
// sendmmsg per run of frames for the same session.
func (c *conn) flush(now time.Time) {
	p := c.pending
	stamp := now.UnixNano()
	for i := 0; i < len(p); {
		sess := p[i].sess
		sess.lastActive.Store(stamp)
		if m := c.member.Load(); m != nil && m.sess == sess {
			i = c.flushMember(m, p, i, stamp)
			continue
		}
		c.out = c.out[:0]
		var bytes uint64
		for ; i < len(p) && p[i].sess == sess; i++ {
			c.out = append(c.out, udpbatch.Message{Buf: p[i].payload})
			bytes += uint64(len(p[i].payload))
		}
		sent, err := relay.WriteUDP(sess.udp, c.out)
		var k relay.Kinds
		for j := range c.out[:sent] {
			k.Note(c.out[j].Buf)
		}
		sess.traffic.CountIn(c.srv.counters, sent, bytes, k)
		if err != nil && !sess.closed.Load() {
			c.srv.counters.WriteErrors.Add(uint64(len(c.out) - sent))
			c.srv.logs.backendSend.Log(c.srv.log, slog.LevelWarn, "send to backend failed", "session", sess.id,
				"backend", c.srv.cfg.Backend.String(), "err", backendHint(err))
		}
	}
	clear(p)
	c.pending = p[:0]
	clear(c.out)
}

// flushMember sends the run of pending frames from i that belong to m's
// session through the aggregate's reorder buffer, and returns where the
// run ends.
func (c *conn) flushMember(m *member, p []pendingFrame, i int, now int64) int {
	c.dgs = c.dgs[:0]
	var bytes uint64
	for ; i < len(p) && p[i].sess == m.sess; i++ {
		c.dgs = append(c.dgs, relay.Datagram{Buf: p[i].payload, N: len(p[i].payload)})
		bytes += uint64(len(p[i].payload))
	}
	m.CountIn(len(c.dgs), bytes)
	if a := m.sess.aggOf(); a != nil {
		a.reorder.Receive(int(m.Index), c.dgs, now)
	}
	clear(c.dgs)
	return i
}

// send sends datagrams to the client, unless the connection is closed.
func (c *conn) send(bufs [][]byte) error {
	if c.closed.Load() {
		return net.ErrClosed
	}
	return c.link.Send(bufs)
}

// close closes the connection and forgets it; the sessions it carried
// wait for their client to come back. Server.mu must not be held.
func (c *conn) close() {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		c.link.Close()
		c.srv.forgetConn(c)
	})
}
