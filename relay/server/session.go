package server

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/ticket"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// sessionBatch is how many datagrams a session reads from its backend
// socket at once.
const sessionBatch = 8

// session is one IKE SA of a client daemon (and the SAs rekeyed from it):
// the SPIs that route to it, one UDP socket toward the backend whose
// source port never changes, and the connection that currently carries
// it, its return path.
type session struct {
	srv     *Server
	id      uint64
	src     source // the client's, as it opened the session
	owner   string // the identity of the client that opened it, over TLS with a client certificate
	created time.Time
	udp     *udpbatch.Conn
	uc      *net.UDPConn   // udp's socket
	release func() error   // closes udp's socket
	local   netip.AddrPort // the backend socket's address: the peer the daemon sees

	readerDone chan struct{}        // closed when the backend reader returns
	frozen     atomic.Bool          // the backend reader stops: a handover
	conn       atomic.Pointer[conn] // return path; nil while the client is away
	agg        atomic.Pointer[agg]  // its aggregate, once a member joined; set under Server.mu
	lastActive atomic.Int64         // unix ns of the last frame from the client, or of its disconnect
	closed     atomic.Bool
	confirmed  atomic.Bool   // the backend answered the IKE_SA_INIT; written under Server.mu
	conns      atomic.Uint64 // connections that have carried it
	traffic    relay.Traffic
	book       relay.SABook

	// Guarded by Server.mu.
	ikeKeys []uint64 // the SPIs that route to this session
	espKeys []uint32
	learn   budget
	vouch   vouch      // a connection waiting for the backend to vouch for it
	key     ticket.Key // its iketcp client's proof, once keyed
	keyed   bool

	// Owned by the backend reader.
	lastOutSPI uint32
}

// vouch is a connection, not the session's return path, that sent a fresh
// IKE request: if the backend answers it, the connection carries the
// session's authentic client.
type vouch struct {
	conn  *conn
	ispi  uint64
	msgID uint32
}

// backendBuffers are what a session's backend reader takes from the
// server's pool while there is something to read: an idle session holds
// none.
type backendBuffers struct {
	bufs   [][]byte
	msgs   []udpbatch.Message
	frames [][]byte
}

func newBackendBuffers(size int) *backendBuffers {
	b := &backendBuffers{bufs: make([][]byte, sessionBatch), msgs: make([]udpbatch.Message, sessionBatch), frames: make([][]byte, 0, sessionBatch)}
	backing := make([]byte, sessionBatch*size)
	for i := range b.bufs {
		b.bufs[i] = backing[i*size : (i+1)*size : (i+1)*size]
	}
	return b
}

// newSession opens a half-open session, carried by c, for an IKE_SA_INIT
// request. If another connection opened it meanwhile, it returns that one
// with created false. Over a limit, it returns an error that says which:
// the established are never refused for it, nor evicted.
func (s *Server) newSession(c *conn, h *framing.IKEHeader, now time.Time) (sess *session, created bool, err error) {
	cfg := &s.cfg
	s.mu.Lock()
	u := s.useLocked(c.src)
	switch {
	case len(s.sessions) >= cfg.maxSessions():
		err = fmt.Errorf("session limit %d reached (raise --max-sessions)", cfg.maxSessions())
	case u.sessions >= cfg.maxSessionsPerSource():
		err = fmt.Errorf("source %s holds %d sessions, the limit (raise --max-sessions-per-source)", c.src, u.sessions)
	case s.halfOpen >= cfg.maxHalfOpen():
		err = fmt.Errorf("%d half-open sessions, the limit (raise --max-half-open)", s.halfOpen)
	case u.halfOpen >= cfg.maxHalfOpenPerSource():
		err = fmt.Errorf("source %s holds %d half-open sessions, the limit (raise --max-half-open-per-source)", c.src, u.halfOpen)
	}
	if err == nil { // reserve its place while the socket opens
		u.sessions++
		u.halfOpen++
		s.halfOpen++
	}
	s.tidyLocked(c.src)
	s.mu.Unlock()
	if err != nil {
		return nil, false, err
	}
	release := func() {
		s.mu.Lock()
		u := s.useLocked(c.src)
		u.sessions--
		u.halfOpen--
		s.halfOpen--
		s.tidyLocked(c.src)
		s.mu.Unlock()
	}
	uc, closeUDP, err := s.dialBackend(c)
	if err != nil {
		release()
		return nil, false, fmt.Errorf("cannot open a socket toward the backend %v: %w", cfg.Backend, err)
	}
	relay.SizeSocketBuffers(uc)
	sess = &session{
		srv:        s,
		id:         s.nextSessionID.Add(1),
		src:        c.src,
		owner:      c.identity,
		created:    now,
		udp:        udpbatch.New(uc, udpbatch.Options{BatchSize: sessionBatch, Logger: s.log}),
		uc:         uc,
		readerDone: make(chan struct{}),
		release:    closeUDP,
		local:      uc.LocalAddr().(*net.UDPAddr).AddrPort(),
	}
	sess.lastActive.Store(now.UnixNano())

	s.mu.Lock()
	if existing := s.routes.ike.m[h.InitiatorSPI]; s.closing || s.handingOver || existing != nil {
		// Shutting down or handing over, or another connection opened it
		// meanwhile.
		s.mu.Unlock()
		closeUDP()
		release()
		if existing != nil {
			return existing.sess, false, nil
		}
		return nil, false, errors.New("server is shutting down or handing over")
	}
	s.sessions[sess.id] = sess
	r := s.routes.ike.add(sess, &sess.ikeKeys, h.InitiatorSPI, now)
	r.request(h.MessageID)
	s.carryLocked(sess, c)
	sess.conns.Store(1)
	s.wg.Add(1)
	s.mu.Unlock()
	s.counters.SessionsCreated.Add(1)
	go sess.readBackend()
	return sess, true, nil
}

// dialBackend opens a session's socket toward the backend, for c's
// client.
func (s *Server) dialBackend(c *conn) (*net.UDPConn, func() error, error) {
	if s.cfg.DialBackend != nil {
		ap, err := netip.ParseAddrPort(c.remote)
		if err != nil {
			return nil, nil, fmt.Errorf("the client's address %q: %w", c.remote, err)
		}
		return s.cfg.DialBackend(ap.Addr().Unmap(), s.cfg.Backend)
	}
	uc, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(s.cfg.Backend))
	if err != nil {
		return nil, nil, err
	}
	return uc, uc.Close, nil
}

// readBackend relays the backend's datagrams for the session onto the
// connection that carries it, until the session is closed. It takes
// buffers from the server's pool only while there is something to read.
func (sess *session) readBackend() {
	s := sess.srv
	defer s.wg.Done()
	defer close(sess.readerDone)
	var msg framing.Message
	for {
		if err := sess.udp.WaitRead(); err != nil {
			if errors.Is(err, net.ErrClosed) || sess.frozen.Load() {
				return
			}
			sess.backendFailed(err)
			continue
		}
		bb := s.buffers.Get().(*backendBuffers)
		for i := range bb.msgs {
			bb.msgs[i].Buf = bb.bufs[i][relay.Headroom:]
		}
		for {
			n, err := sess.udp.TryReadBatch(bb.msgs)
			if err != nil {
				if errors.Is(err, net.ErrClosed) || sess.frozen.Load() {
					s.buffers.Put(bb)
					return
				}
				sess.backendFailed(err)
				break
			}
			if n == 0 {
				break
			}
			sess.toClient(bb, n, &msg)
			if n < len(bb.msgs) {
				break
			}
		}
		s.buffers.Put(bb)
	}
}

// backendFailed logs an error reading the backend socket. A connected UDP
// socket reports an ICMP port unreachable from an earlier send as
// ECONNREFUSED: the daemon is not listening.
func (sess *session) backendFailed(err error) {
	s := sess.srv
	s.logs.backendRecv.Log(s.log, slog.LevelWarn, "receive from backend failed", "session", sess.id,
		"backend", s.cfg.Backend.String(), "err", backendHint(err))
	if !errors.Is(err, syscall.ECONNREFUSED) {
		time.Sleep(10 * time.Millisecond) // do not spin on a persistent error
	}
}

// toClient sends the n datagrams of bb to the connection that carries the
// session, after the bookkeeping the backend's IKE answers drive.
func (sess *session) toClient(bb *backendBuffers, n int, msg *framing.Message) {
	s := sess.srv
	frames := bb.frames[:0]
	var bytes uint64
	var k relay.Kinds
	for i := range bb.msgs[:n] {
		m := &bb.msgs[i]
		if m.Truncated {
			s.counters.OversizedDgrams.Add(1)
			s.logs.oversize.Log(s.log, slog.LevelWarn, "datagram from backend dropped: larger than --max-datagram", "session", sess.id, "max", s.cfg.maxDatagram())
			continue
		}
		if msg.Decode(m.Buf[:m.N]) != nil || msg.Kind == framing.KindControl {
			s.counters.Malformed.Add(1)
			continue
		}
		switch msg.Kind {
		case framing.KindKeepalive:
			s.counters.KeepalivesDropped.Add(1)
			continue
		case framing.KindESP:
			if msg.ESP.SPI != sess.lastOutSPI {
				sess.lastOutSPI = msg.ESP.SPI
				sess.book.NoteESPOut(msg.ESP.SPI)
			}
		case framing.KindIKE:
			sess.fromBackend(&msg.IKE)
			k.IKE++
		}
		frames = append(frames, bb.bufs[i][:relay.Headroom+m.N])
		bytes += uint64(m.N)
	}
	if len(frames) == 0 {
		return
	}
	if a := sess.agg.Load(); a != nil && a.toMembers(sess, frames) {
		clear(frames)
		return
	}
	c := sess.conn.Load()
	if c == nil {
		s.counters.NoPath.Add(uint64(len(frames)))
	} else if err := c.send(frames); err != nil {
		if !c.closed.Load() {
			s.counters.WriteErrors.Add(1)
			s.logs.writeFailed.Log(s.log, slog.LevelInfo, "write to client failed, closing its connection", "session", sess.id, "conn", c.id, "remote", c.remote, "err", err)
			c.close()
		}
		s.counters.NoPath.Add(uint64(len(frames)))
	} else {
		sess.traffic.CountOut(s.counters, len(frames), bytes, k)
	}
	clear(frames)
}

// fromBackend does what an IKE message from the backend tells: the IKE SA
// it is in routes to the session (perhaps one the backend started); an
// answer to the IKE_SA_INIT confirms the session; an answer to a fresh
// request that came on another connection moves the session there.
func (sess *session) fromBackend(h *framing.IKEHeader) {
	s := sess.srv
	var ticketOn *conn
	now := time.Now()
	s.mu.Lock()
	if !sess.closed.Load() {
		if s.routes.ike.m[h.InitiatorSPI] == nil && s.routes.ike.add(sess, &sess.ikeKeys, h.InitiatorSPI, now) != nil {
			s.stateChanged()
		}
		if h.IsInitResponse() && !sess.confirmed.Load() {
			ticketOn = s.confirmLockedSession(sess)
		}
		if v := sess.vouch; h.IsResponse() && v.conn != nil && v.ispi == h.InitiatorSPI && v.msgID == h.MessageID {
			if !v.conn.closed.Load() {
				s.moveLocked(sess, v.conn, "the backend answered its client's request there")
			}
			sess.vouch = vouch{}
		}
	}
	s.mu.Unlock()
	sess.book.NoteIKE(h)
	if ticketOn != nil {
		ticketOn.sendControl(framing.ControlTicket,
			binary.BigEndian.AppendUint64(nil, sess.id), binary.BigEndian.AppendUint64(nil, h.InitiatorSPI))
	}
}

// confirmLockedSession marks a half-open session confirmed: it leaves
// the half-open count, and the connection that carries it is confirmed
// too. If that connection's client is an iketcp client, the session takes
// the link's key and confirmLockedSession returns the connection to send
// the ticket on. Server.mu must be held.
func (s *Server) confirmLockedSession(sess *session) *conn {
	sess.confirmed.Store(true)
	s.halfOpen--
	s.useLocked(sess.src).halfOpen--
	c := sess.conn.Load()
	if c == nil {
		return nil
	}
	if _, ok := c.carrying[sess]; ok {
		s.confirmLocked(c)
	}
	s.stateChanged()
	if k := c.keys.Load(); k != nil && !sess.keyed {
		sess.key, sess.keyed = k.key, true
		return c
	}
	return nil
}

// removeSession forgets a session and closes its backend socket, which
// ends its reader.
func (s *Server) removeSession(sess *session) {
	if sess.closed.Swap(true) {
		return
	}
	s.mu.Lock()
	delete(s.sessions, sess.id)
	s.routes.drop(sess)
	if c := sess.conn.Load(); c != nil {
		s.dropCarryLocked(sess, c)
	}
	if a := sess.aggOf(); a != nil {
		for _, m := range a.set().ms {
			s.leaveLocked(m.conn)
		}
		defer a.reorder.Close()
	}
	u := s.useLocked(sess.src)
	u.sessions--
	if !sess.confirmed.Load() {
		u.halfOpen--
		s.halfOpen--
	}
	s.tidyLocked(sess.src)
	s.mu.Unlock()
	sess.release()
	s.stateChanged()
}

// status describes the session.
func (sess *session) status() relay.SessionStatus {
	ss := relay.SessionStatus{
		ID:          sess.id,
		Local:       sess.local.String(),
		Peer:        "-",
		State:       "waiting",
		Transport:   "TCP",
		Created:     sess.created,
		LastActive:  time.Unix(0, sess.lastActive.Load()),
		Connections: sess.conns.Load(),
	}
	if c := sess.conn.Load(); c != nil && !c.closed.Load() {
		ss.Peer, ss.State = c.remote, "up"
	}
	if !sess.confirmed.Load() {
		ss.State = "half-open"
	}
	sess.book.Fill(&ss)
	sess.traffic.Fill(&ss)
	return ss
}
