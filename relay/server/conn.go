package server

import (
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

const (
	// GarbageLimit is how many undeliverable frames in a row close a
	// connection: RFC 9329 6.1 asks to close on sustained garbage, not on
	// a single unknown SPI.
	GarbageLimit = 16
	// connBatch is how many frames a connection gathers before sending
	// them to the backend.
	connBatch = 64
)

// conn is one client's link, as the server serves it: the receiver of
// what the client sends, and the return path of the sessions it carries.
type conn struct {
	srv      *Server
	link     relay.Link
	id       uint64
	remote   string
	accepted time.Time

	closed    atomic.Bool
	closeOnce sync.Once

	mu       sync.Mutex // guards the following
	carrying map[*session]struct{}

	// Owned by the link's reader (Receive's caller).
	msg      framing.Message
	current  *session // the session of the last frame; unknown SPIs join it
	lastSPI  uint32   // cache of the last ESP lookup
	lastSess *session
	garbage  int // undeliverable frames in a row
	pending  []pendingFrame
	out      []udpbatch.Message
	frames   uint64
}

type pendingFrame struct {
	sess    *session
	payload []byte
}

func (s *Server) newConn(link relay.Link) *conn {
	c := &conn{
		srv:      s,
		link:     link,
		id:       s.nextConnID.Add(1),
		remote:   link.RemoteAddr(),
		accepted: time.Now(),
		carrying: make(map[*session]struct{}),
		pending:  make([]pendingFrame, 0, connBatch),
		out:      make([]udpbatch.Message, 0, connBatch),
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return nil
	}
	s.conns[c] = struct{}{}
	return c
}

// Receive routes a burst of the client's datagrams to their sessions and
// sends them on to the backend. Sustained garbage ends the link.
func (c *conn) Receive(burst []relay.Datagram) error {
	for _, d := range burst {
		c.frames++
		if err := c.route(d.Bytes()); err != nil {
			c.flush()
			return err
		}
		if len(c.pending) == cap(c.pending) {
			c.flush()
		}
	}
	c.flush()
	return nil
}

// route puts one datagram in its session's pending batch, or counts and
// drops it. It returns an error to close the connection.
func (c *conn) route(p []byte) error {
	s := c.srv
	if err := c.msg.Decode(p); err != nil {
		s.counters.Malformed.Add(1)
		s.logMalformed.Log(s.log, slog.LevelWarn, "malformed frame dropped", "conn", c.id, "remote", c.remote, "len", len(p), "err", err)
		return c.undeliverable()
	}
	var sess *session
	switch c.msg.Kind {
	case framing.KindKeepalive:
		// RFC 9329 6.6: keepalives are not sent over TCP; drop silently.
		s.counters.KeepalivesDropped.Add(1)
		return nil
	case framing.KindIKE:
		sess = c.sessionForIKE(&c.msg.IKE)
	case framing.KindESP:
		sess = c.sessionForESP(c.msg.ESP.SPI)
	}
	if sess == nil {
		return c.undeliverable()
	}
	c.garbage = 0
	c.current = sess
	sess.bind(c)
	c.pending = append(c.pending, pendingFrame{sess, p})
	return nil
}

// undeliverable counts a frame that found no session, and closes the
// connection on sustained garbage.
func (c *conn) undeliverable() error {
	c.garbage++
	if c.garbage >= GarbageLimit {
		c.srv.counters.GarbageCloses.Add(1)
		return &relay.ProtocolError{Reason: fmt.Sprintf("%d undeliverable frames in a row", c.garbage)}
	}
	return nil
}

// sessionForESP finds the session of ESP with the given SPI.
func (c *conn) sessionForESP(spi uint32) *session {
	if c.lastSPI == spi && c.lastSess != nil && !c.lastSess.closed.Load() {
		return c.lastSess
	}
	s := c.srv
	s.mu.Lock()
	sess := s.routes.esp.lookupOrJoin(spi, c.current, espKeys)
	s.mu.Unlock()
	if sess == nil {
		s.counters.UnknownSPI.Add(1)
		s.logUnknownSPI.Log(s.log, slog.LevelInfo, "ESP for an unknown SPI dropped", "conn", c.id, "remote", c.remote, "spi", relay.SPI32(spi))
		return nil
	}
	sess.book.NoteESPIn(spi)
	c.lastSPI, c.lastSess = spi, sess
	return sess
}

// sessionForIKE finds the session of an IKE message, or starts one.
func (c *conn) sessionForIKE(h *framing.IKEHeader) *session {
	s := c.srv
	s.mu.Lock()
	sess := s.routes.ike.lookupOrJoin(h.InitiatorSPI, c.current, ikeKeys)
	s.mu.Unlock()
	if sess == nil {
		var created bool
		var err error
		if sess, created, err = s.newSession(h); err != nil {
			s.counters.SessionsRejected.Add(1)
			s.logRejected.Log(s.log, slog.LevelWarn, "IKE message dropped: "+err.Error(), "conn", c.id, "remote", c.remote)
			return nil
		}
		if created {
			s.log.Info("session created", "session", sess.id, "remote", c.remote, "ike_spi", relay.SPI64(h.InitiatorSPI),
				"exchange", h.Exchange.String(), "backend_local", sess.local.String())
		}
	}
	sess.book.NoteIKE(h)
	return sess
}

// flush sends the pending frames to their sessions' backend sockets, one
// sendmmsg per run of frames for the same session.
func (c *conn) flush() {
	p := c.pending
	now := time.Now().UnixNano()
	for i := 0; i < len(p); {
		sess := p[i].sess
		sess.lastActive.Store(now)
		c.out = c.out[:0]
		var bytes uint64
		for ; i < len(p) && p[i].sess == sess; i++ {
			c.out = append(c.out, udpbatch.Message{Buf: p[i].payload})
			bytes += uint64(len(p[i].payload))
		}
		sent, err := relay.WriteUDP(sess.udp, c.out)
		sess.traffic.CountIn(c.srv.counters, sent, bytes)
		if err != nil && !sess.closed.Load() {
			c.srv.counters.WriteErrors.Add(uint64(len(c.out) - sent))
			c.srv.logBackend.Log(c.srv.log, slog.LevelWarn, "send to backend failed", "session", sess.id,
				"backend", c.srv.cfg.Backend.String(), "err", backendHint(err))
		}
	}
	clear(p)
	c.pending = p[:0]
	clear(c.out)
}

// send sends datagrams to the client, unless the connection is closed.
func (c *conn) send(bufs [][]byte) error {
	if c.closed.Load() {
		return net.ErrClosed
	}
	return c.link.Send(bufs)
}

// attach records that c carries sess, so closing c detaches it. It fails
// if c is already closed.
func (c *conn) attach(sess *session) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return false
	}
	c.carrying[sess] = struct{}{}
	return true
}

// close closes the connection and detaches the sessions it carried; they
// wait for their client to come back.
func (c *conn) close() {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed.Store(true)
		carrying := c.carrying
		c.carrying = nil
		c.mu.Unlock()
		c.link.Close()
		now := time.Now().UnixNano()
		for sess := range carrying {
			if sess.conn.CompareAndSwap(c, nil) {
				sess.lastActive.Store(now)
			}
		}
	})
}
