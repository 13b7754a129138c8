package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// sessionBatch is how many datagrams a session reads from its backend
// socket at once. Small, because every session keeps its buffers.
const sessionBatch = 8

// session is one client daemon's traffic: the IKE and ESP SAs it has
// shown, one UDP socket toward the backend whose source port never
// changes, and the connection that currently carries it.
type session struct {
	srv     *Server
	id      uint64
	created time.Time
	udp     *udpbatch.Conn
	local   netip.AddrPort // the backend socket's address: the peer the daemon sees

	conn       atomic.Pointer[conn] // return path; nil while the client is away
	lastActive atomic.Int64         // unix ns of the last frame from the client, or of its disconnect
	closed     atomic.Bool
	conns      atomic.Uint64 // connections that have carried it
	traffic    relay.Traffic
	book       relay.SABook

	// Guarded by Server.mu: the SPIs that route to this session, oldest
	// first.
	ikeKeys []uint64
	espKeys []uint32

	// Owned by the backend reader.
	bufs       [][]byte
	msgs       []udpbatch.Message
	frames     [][]byte
	lastOutSPI uint32
}

// newSession opens a backend socket for a new session, first seen in h.
// If another connection created the session meanwhile, it returns that one
// with created false.
func (s *Server) newSession(h *framing.IKEHeader) (sess *session, created bool, err error) {
	s.mu.Lock()
	n := len(s.sessions)
	s.mu.Unlock()
	if n >= s.cfg.maxSessions() {
		return nil, false, fmt.Errorf("session limit %d reached (raise --max-sessions)", s.cfg.maxSessions())
	}
	uc, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(s.cfg.Backend))
	if err != nil {
		return nil, false, fmt.Errorf("cannot open a socket toward the backend %v: %w", s.cfg.Backend, err)
	}
	relay.GrowSocketBuffers(uc)
	sess = &session{
		srv:     s,
		id:      s.nextSessionID.Add(1),
		created: time.Now(),
		udp:     udpbatch.New(uc, udpbatch.Options{BatchSize: sessionBatch, Logger: s.log}),
		local:   uc.LocalAddr().(*net.UDPAddr).AddrPort(),
		bufs:    make([][]byte, sessionBatch),
		msgs:    make([]udpbatch.Message, sessionBatch),
		frames:  make([][]byte, 0, sessionBatch),
	}
	sess.lastActive.Store(sess.created.UnixNano())
	size := relay.Headroom + s.cfg.maxDatagram()
	backing := make([]byte, sessionBatch*size)
	for i := range sess.bufs {
		sess.bufs[i] = backing[i*size : (i+1)*size : (i+1)*size]
		sess.msgs[i].Buf = sess.bufs[i][relay.Headroom:]
	}

	s.mu.Lock()
	if s.closing || s.routes.ike.m[h.InitiatorSPI] != nil {
		// Shutting down, or another connection created it meanwhile.
		existing := s.routes.ike.m[h.InitiatorSPI]
		s.mu.Unlock()
		uc.Close()
		if existing != nil {
			return existing, false, nil
		}
		return nil, false, errors.New("server is shutting down")
	}
	s.sessions[sess.id] = sess
	s.routes.ike.add(sess, &sess.ikeKeys, h.InitiatorSPI)
	s.wg.Add(1)
	s.mu.Unlock()
	s.counters.SessionsCreated.Add(1)
	go sess.readBackend()
	return sess, true, nil
}

// bind makes c the session's return path.
func (sess *session) bind(c *conn) {
	old := sess.conn.Load()
	if old == c {
		return
	}
	if !c.attach(sess) {
		return
	}
	sess.conn.Store(c)
	if sess.conns.Add(1) > 1 {
		sess.srv.counters.Rebinds.Add(1)
		from := "none"
		if old != nil {
			from = old.remote
		}
		sess.srv.log.Info("session moved to a new connection", "session", sess.id, "from", from, "to", c.remote,
			"backend_local", sess.local.String())
	}
}

// readBackend relays the backend's datagrams for the session onto the
// connection that carries it, until the session is closed.
func (sess *session) readBackend() {
	s := sess.srv
	defer s.wg.Done()
	var msg framing.Message
	for {
		n, err := relay.ReadUDP(sess.udp, sess.msgs, s.counters, func(err error) {
			s.logBackend.Log(s.log, slog.LevelWarn, "receive from backend failed", "session", sess.id,
				"backend", s.cfg.Backend.String(), "err", backendHint(err))
		})
		if err != nil {
			return
		}
		c := sess.conn.Load()
		frames := sess.frames[:0]
		var bytes uint64
		for i := range sess.msgs[:n] {
			m := &sess.msgs[i]
			if m.Truncated {
				s.logOversize.Log(s.log, slog.LevelWarn, "datagram from backend dropped: larger than --max-datagram", "session", sess.id, "max", s.cfg.maxDatagram())
				continue
			}
			if msg.Decode(m.Buf[:m.N]) != nil {
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
				sess.learnIKE(&msg.IKE)
			}
			if c == nil {
				s.counters.NoPath.Add(1)
				continue
			}
			frames = append(frames, sess.bufs[i][:relay.Headroom+m.N])
			bytes += uint64(m.N)
		}
		if len(frames) == 0 {
			continue
		}
		if err := c.send(frames); err != nil {
			if !c.closed.Load() {
				s.counters.WriteErrors.Add(1)
				s.log.Info("write to client failed, closing its connection", "session", sess.id, "conn", c.id, "remote", c.remote, "err", err)
				c.close()
			}
			s.counters.NoPath.Add(uint64(len(frames)))
			continue
		}
		sess.traffic.CountOut(s.counters, len(frames), bytes)
	}
}

// learnIKE maps an IKE SA the backend speaks in (perhaps one it started)
// to the session, so the client's answers find it.
func (sess *session) learnIKE(h *framing.IKEHeader) {
	s := sess.srv
	s.mu.Lock()
	if s.routes.ike.m[h.InitiatorSPI] == nil && !sess.closed.Load() {
		s.routes.ike.add(sess, &sess.ikeKeys, h.InitiatorSPI)
	}
	s.mu.Unlock()
	sess.book.NoteIKE(h)
}

// expireSessions closes sessions whose client has been away longer than
// SessionIdle.
func (s *Server) expireSessions(ctx context.Context) {
	defer s.wg.Done()
	idle := s.cfg.sessionIdle()
	relay.SweepEvery(ctx, idle, 30*time.Second, func(now time.Time) {
		var expired []*session
		s.mu.Lock()
		for _, sess := range s.sessions {
			if c := sess.conn.Load(); c != nil && !c.closed.Load() {
				continue
			}
			if now.Sub(time.Unix(0, sess.lastActive.Load())) > idle {
				expired = append(expired, sess)
			}
		}
		s.mu.Unlock()
		for _, sess := range expired {
			s.counters.SessionsExpired.Add(1) // before it leaves Status
			s.removeSession(sess)
			s.log.Info("session expired: client did not come back", "session", sess.id, "idle", idle.String(),
				"backend_local", sess.local.String())
		}
	})
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
	s.mu.Unlock()
	sess.udp.Close()
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
	sess.book.Fill(&ss)
	sess.traffic.Fill(&ss)
	return ss
}
