package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// Defaults shared by both roles. Each is a field of ServerConfig or
// ClientConfig, where zero means the default.
const (
	DefaultMaxDatagram  = 9216
	DefaultConnBuffer   = 64 << 10
	DefaultWriteTimeout = 10 * time.Second
)

// Server defaults.
const (
	DefaultPrefixTimeout = 5 * time.Second
	DefaultSessionIdle   = 5 * time.Minute
	DefaultMaxConns      = 1024
	DefaultMaxSessions   = 4096
)

const (
	// garbageLimit is how many undeliverable frames in a row close a
	// connection: RFC 9329 6.1 asks to close on sustained garbage, not on a
	// single unknown SPI.
	garbageLimit = 16
	// sessionBatch is how many datagrams a session reads from its backend
	// socket at once. Small, because every session keeps its buffers.
	sessionBatch = 8
	// connBatch is how many frames a connection gathers before sending
	// them to the backend.
	connBatch = 64
	// maxSPIs bounds the SPIs a session shows in Status, of each kind.
	maxSPIs = 16
	// maxRouteKeys bounds the SPIs of each kind that route to one session;
	// past it the oldest stops routing. Rekeying adds SPIs for as long as a
	// session lives, so without a bound a long-lived session would grow
	// the table forever.
	maxRouteKeys = 64
)

// ServerConfig configures a Server. Only Backend is required; zero values
// mean the defaults above.
type ServerConfig struct {
	// Backend is the IKE daemon's UDP NAT-T socket, usually 127.0.0.1:4500.
	Backend netip.AddrPort
	Logger  *slog.Logger
	// PrefixTimeout bounds the wait for the IKETCP prefix.
	PrefixTimeout time.Duration
	// SessionIdle is how long a session without a connection waits for its
	// client to reconnect before it expires.
	SessionIdle time.Duration
	// MaxConns and MaxSessions bound concurrent connections and sessions.
	MaxConns, MaxSessions int
	// MaxDatagram is the largest datagram relayed either way; larger ones
	// are counted and dropped.
	MaxDatagram int
	// ConnBuffer is each connection's read buffer: its memory footprint.
	ConnBuffer int
	// WriteTimeout bounds a write to a connection; a connection that does
	// not take data for that long is closed.
	WriteTimeout time.Duration
	// Version is reported in Status.
	Version string
}

func (c *ServerConfig) logger() *slog.Logger { return orDefault(c.Logger, slog.Default()) }
func (c *ServerConfig) prefixTimeout() time.Duration {
	return orDefault(c.PrefixTimeout, DefaultPrefixTimeout)
}
func (c *ServerConfig) sessionIdle() time.Duration {
	return orDefault(c.SessionIdle, DefaultSessionIdle)
}
func (c *ServerConfig) maxConns() int    { return orDefault(c.MaxConns, DefaultMaxConns) }
func (c *ServerConfig) maxSessions() int { return orDefault(c.MaxSessions, DefaultMaxSessions) }
func (c *ServerConfig) maxDatagram() int { return orDefault(c.MaxDatagram, DefaultMaxDatagram) }
func (c *ServerConfig) writeTimeout() time.Duration {
	return orDefault(c.WriteTimeout, DefaultWriteTimeout)
}
func (c *ServerConfig) connBuffer() int {
	return max(orDefault(c.ConnBuffer, DefaultConnBuffer), c.maxDatagram()+framing.LengthSize)
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// Server accepts clients (RFC 9329 streams, or fake-TCP flows) and relays
// them to a backend IKE daemon over UDP, one backend socket per session.
type Server struct {
	cfg      ServerConfig
	log      *slog.Logger
	started  time.Time
	counters Counters
	slots    chan struct{} // one token per open connection

	nextConnID, nextSessionID atomic.Uint64

	mu       sync.Mutex // guards the following, and each session's routes
	listen   string
	encap    string // "rfc9329" or "fake-tcp"
	sessions map[uint64]*session
	byIKE    map[uint64]*session // by IKE initiator SPI
	byESP    map[uint32]*session // by SPI of ESP arriving from clients
	conns    map[*serverConn]struct{}
	closing  bool

	wg sync.WaitGroup // every goroutine the server starts

	logRejected, logUnknownSPI, logMalformed, logBackend, logOversize sometimes
}

// NewServer returns a server for cfg.
func NewServer(cfg ServerConfig) (*Server, error) {
	if !cfg.Backend.IsValid() {
		return nil, errors.New("relay: server needs a backend address (the IKE daemon's UDP port, e.g. 127.0.0.1:4500)")
	}
	return &Server{
		cfg:      cfg,
		log:      cfg.logger(),
		started:  time.Now(),
		slots:    make(chan struct{}, cfg.maxConns()),
		sessions: make(map[uint64]*session),
		byIKE:    make(map[uint64]*session),
		byESP:    make(map[uint32]*session),
		conns:    make(map[*serverConn]struct{}),
	}, nil
}

// Counters returns the server's live counters.
func (s *Server) Counters() *Counters { return &s.counters }

// Serve accepts RFC 9329 connections on ln until ctx is done or ln fails,
// then
// closes every connection and session it made, waits for its goroutines
// and returns. It returns nil when ctx ended it.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	return s.run(ctx, ln.Addr().String(), "rfc9329", ln, func(ctx context.Context) error { return s.acceptStreams(ctx, ln) })
}

// run drives the server: accept takes clients until ctx ends or it fails,
// ln's Close unblocks it at the end; then every connection and session is
// closed and run waits for the server's goroutines. It returns nil when
// ctx ended it.
func (s *Server) run(ctx context.Context, addr, encap string, ln io.Closer, accept func(context.Context) error) error {
	s.mu.Lock()
	s.listen = addr
	s.encap = encap
	s.mu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	closeWhenDone(ctx, &s.wg, ln)
	s.wg.Add(1)
	go s.expireSessions(ctx)

	s.log.Info("server listening", "listen", addr, "encap", encap, "backend", s.cfg.Backend.String())
	err := accept(ctx)
	if ctx.Err() != nil {
		err = nil
	}
	cancel()
	s.shutdown()
	s.wg.Wait()
	return err
}

// acceptStreams accepts RFC 9329 TCP connections from ln.
func (s *Server) acceptStreams(ctx context.Context, ln net.Listener) error {
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: wait and retry, as
			// net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed, retrying", "err", err, "in", backoff)
			select {
			case <-time.After(backoff):
				continue
			case <-ctx.Done():
				return nil
			}
		}
		backoff = 0
		if !s.admit(newStreamLink(nc, s.cfg), nc.RemoteAddr().String()) {
			nc.Close()
		}
	}
}

// admit starts serving a new client link, unless the connection limit is
// reached or the server is shutting down; then the caller closes it.
func (s *Server) admit(link serverLink, remote string) bool {
	select {
	case s.slots <- struct{}{}:
	default:
		s.counters.ConnsRejected.Add(1)
		s.logRejected.log(s.log, slog.LevelWarn, "connection refused: connection limit reached (raise --max-conns)",
			"remote", remote, "limit", cap(s.slots))
		return false
	}
	c := s.newConn(link, remote)
	if c == nil { // shutting down
		<-s.slots
		return false
	}
	s.counters.ConnsAccepted.Add(1)
	s.wg.Add(1)
	go s.serveConn(c)
	return true
}

// shutdown closes every connection and session.
func (s *Server) shutdown() {
	s.mu.Lock()
	s.closing = true
	conns := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	sessions := make([]*session, 0, len(s.sessions))
	for _, sess := range s.sessions {
		sessions = append(sessions, sess)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
	for _, sess := range sessions {
		s.removeSession(sess)
	}
}

// linkHeadroom is the room every datagram a link sends has in front of
// it, to build the link's headers in place: the frame Length of a stream,
// or the IP and TCP headers of a fake-TCP segment (IPv6 + TCP, rounded).
const linkHeadroom = 64

// serverLink is how a server connection meets its client: an RFC 9329
// TCP stream, or a fake-TCP flow.
type serverLink interface {
	// serve reads the client until the link ends, handing each datagram
	// to c.handleFrame and each burst to c.flush, and says why it ended
	// and how loudly to log that.
	serve(c *serverConn) (string, slog.Level)
	// send sends each bufs[k][linkHeadroom:] to the client as one
	// datagram; bufs[k][:linkHeadroom] may be overwritten. Safe for
	// concurrent use.
	send(bufs [][]byte) error
	// close ends the link; serve returns.
	close()
}

// serverConn is one client connection, over any link.
type serverConn struct {
	srv      *Server
	link     serverLink
	id       uint64
	remote   string
	accepted time.Time

	closed    atomic.Bool
	closeOnce sync.Once

	mu       sync.Mutex // guards the following
	carrying map[*session]struct{}

	// Owned by the connection's reader goroutine.
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

func (s *Server) newConn(link serverLink, remote string) *serverConn {
	c := &serverConn{
		srv:      s,
		link:     link,
		id:       s.nextConnID.Add(1),
		remote:   remote,
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

func (s *Server) serveConn(c *serverConn) {
	defer s.wg.Done()
	defer func() { <-s.slots }()
	s.log.Debug("connection accepted", "conn", c.id, "remote", c.remote)
	reason, level := c.link.serve(c)
	c.close()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.log.Log(context.Background(), level, "connection closed", "conn", c.id, "remote", c.remote,
		"reason", reason, "frames", c.frames, "duration", time.Since(c.accepted).Round(time.Millisecond).String())
}

// handleFrame routes one frame to its session's pending batch. It returns
// a reason to close the connection, or "".
func (c *serverConn) handleFrame(p []byte) string {
	s := c.srv
	if err := c.msg.Decode(p); err != nil {
		s.counters.Malformed.Add(1)
		s.logMalformed.log(s.log, slog.LevelWarn, "malformed frame dropped", "conn", c.id, "remote", c.remote, "len", len(p), "err", err)
		return c.undeliverable()
	}
	var sess *session
	switch c.msg.Kind {
	case framing.KindKeepalive:
		// RFC 9329 6.6: keepalives are not sent over TCP; drop silently.
		s.counters.KeepalivesDropped.Add(1)
		return ""
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
	return ""
}

func (c *serverConn) undeliverable() string {
	c.garbage++
	if c.garbage >= garbageLimit {
		c.srv.counters.GarbageCloses.Add(1)
		return fmt.Sprintf("%d undeliverable frames in a row", c.garbage)
	}
	return ""
}

func (c *serverConn) sessionForESP(spi uint32) *session {
	if c.lastSPI == spi && c.lastSess != nil && !c.lastSess.closed.Load() {
		return c.lastSess
	}
	s := c.srv
	s.mu.Lock()
	sess := s.byESP[spi]
	if sess == nil && c.current != nil && !c.current.closed.Load() {
		// A new child SA of the session this connection carries.
		sess = c.current
		s.routeESPLocked(sess, spi)
	}
	s.mu.Unlock()
	if sess == nil {
		s.counters.UnknownSPI.Add(1)
		s.logUnknownSPI.log(s.log, slog.LevelInfo, "ESP for an unknown SPI dropped", "conn", c.id, "remote", c.remote, "spi", fmt.Sprintf("%08x", spi))
		return nil
	}
	sess.book.noteESPIn(spi)
	c.lastSPI, c.lastSess = spi, sess
	return sess
}

func (c *serverConn) sessionForIKE(h *framing.IKEHeader) *session {
	s := c.srv
	s.mu.Lock()
	sess := s.byIKE[h.InitiatorSPI]
	if sess == nil && c.current != nil && !c.current.closed.Load() {
		// A new IKE SA (rekeyed, or started anew) of the same daemon.
		sess = c.current
		s.routeIKELocked(sess, h.InitiatorSPI)
	}
	s.mu.Unlock()
	if sess == nil {
		var created bool
		var err error
		if sess, created, err = s.newSession(h); err != nil {
			s.counters.SessionsRejected.Add(1)
			s.logRejected.log(s.log, slog.LevelWarn, "IKE message dropped: "+err.Error(), "conn", c.id, "remote", c.remote)
			return nil
		}
		if created {
			s.log.Info("session created", "session", sess.id, "remote", c.remote, "ike_spi", spi64(h.InitiatorSPI),
				"exchange", h.Exchange.String(), "backend_local", sess.local.String())
		}
	}
	sess.book.noteIKE(h)
	return sess
}

// routeIKELocked makes IKE SA ispi route to sess. s.mu must be held.
func (s *Server) routeIKELocked(sess *session, ispi uint64) {
	addRoute(s.byIKE, &sess.ikeRoutes, ispi, sess)
}

// routeESPLocked makes ESP SPI spi route to sess. s.mu must be held.
func (s *Server) routeESPLocked(sess *session, spi uint32) {
	addRoute(s.byESP, &sess.espRoutes, spi, sess)
}

// addRoute maps key to sess in table and records it in the session's
// routes, retiring the session's oldest route past maxRouteKeys.
func addRoute[K comparable](table map[K]*session, routes *[]K, key K, sess *session) {
	table[key] = sess
	*routes = append(*routes, key)
	if len(*routes) > maxRouteKeys {
		if old := (*routes)[0]; table[old] == sess {
			delete(table, old)
		}
		*routes = append((*routes)[:0], (*routes)[1:]...)
	}
}

// dropRoutes removes the session's routes from table.
func dropRoutes[K comparable](table map[K]*session, routes []K, sess *session) {
	for _, k := range routes {
		if table[k] == sess {
			delete(table, k)
		}
	}
}

// flush sends the pending frames to their sessions' backend sockets, one
// sendmmsg per run of frames for the same session.
func (c *serverConn) flush() {
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
		sent, err := writeAll(sess.udp, c.out)
		sess.stats.countIn(&c.srv.counters, sent, bytes)
		if err != nil && !sess.closed.Load() {
			c.srv.counters.WriteErrors.Add(uint64(len(c.out) - sent))
			c.srv.logBackend.log(c.srv.log, slog.LevelWarn, "send to backend failed", "session", sess.id,
				"backend", c.srv.cfg.Backend.String(), "err", backendHint(err))
		}
	}
	for i := range p {
		p[i] = pendingFrame{}
	}
	c.pending = p[:0]
}

// writeAll sends msgs, skipping any datagram the kernel refuses so one bad
// datagram does not cost the rest of the batch. It returns how many were
// sent and the last error.
func writeAll(bc *udpbatch.Conn, msgs []udpbatch.Message) (sent int, err error) {
	for len(msgs) > 0 {
		n, werr := bc.WriteBatch(msgs)
		sent += n
		if werr == nil {
			return sent, err
		}
		err = werr
		if errors.Is(werr, net.ErrClosed) {
			return sent, err
		}
		msgs = msgs[min(n+1, len(msgs)):]
	}
	return sent, err
}

// send sends datagrams to the client, unless the connection is closed.
func (c *serverConn) send(bufs [][]byte) error {
	if c.closed.Load() {
		return net.ErrClosed
	}
	return c.link.send(bufs)
}

// attach records that c carries sess, so closing c detaches it. It fails
// if c is already closed.
func (c *serverConn) attach(sess *session) bool {
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
func (c *serverConn) close() {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed.Store(true)
		carrying := c.carrying
		c.carrying = nil
		c.mu.Unlock()
		c.link.close()
		now := time.Now().UnixNano()
		for sess := range carrying {
			if sess.conn.CompareAndSwap(c, nil) {
				sess.lastActive.Store(now)
			}
		}
	})
}

// session is one client daemon's traffic: the IKE and ESP SAs it has
// shown, one UDP socket toward the backend whose source port never
// changes, and the connection that currently carries it.
type session struct {
	srv     *Server
	id      uint64
	created time.Time
	udp     *udpbatch.Conn
	local   netip.AddrPort // the backend socket's address: the peer the daemon sees

	conn       atomic.Pointer[serverConn] // return path; nil while the client is away
	lastActive atomic.Int64               // unix ns of the last frame from the client, or of its disconnect
	closed     atomic.Bool
	conns      atomic.Uint64 // connections that have carried it
	stats      flowStats
	book       saBook

	// Guarded by Server.mu: the SPIs that route to this session, oldest
	// first.
	ikeRoutes []uint64
	espRoutes []uint32

	// Owned by the backend reader goroutine.
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
	growSocketBuffers(uc)
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
	size := linkHeadroom + s.cfg.maxDatagram()
	backing := make([]byte, sessionBatch*size)
	for i := range sess.bufs {
		sess.bufs[i] = backing[i*size : (i+1)*size : (i+1)*size]
		sess.msgs[i].Buf = sess.bufs[i][linkHeadroom:]
	}

	s.mu.Lock()
	if s.closing || s.byIKE[h.InitiatorSPI] != nil {
		// Shutting down, or another connection created it meanwhile.
		existing := s.byIKE[h.InitiatorSPI]
		s.mu.Unlock()
		uc.Close()
		if existing != nil {
			return existing, false, nil
		}
		return nil, false, errors.New("server is shutting down")
	}
	s.sessions[sess.id] = sess
	s.routeIKELocked(sess, h.InitiatorSPI)
	s.wg.Add(1)
	s.mu.Unlock()
	s.counters.SessionsCreated.Add(1)
	go s.readBackend(sess)
	return sess, true, nil
}

// bind makes c the session's return path.
func (sess *session) bind(c *serverConn) {
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

// readBackend relays the backend's datagrams for one session onto the
// session's current connection, until the session is closed.
func (s *Server) readBackend(sess *session) {
	defer s.wg.Done()
	var msg framing.Message
	for {
		n, err := sess.udp.ReadBatch(sess.msgs)
		if err != nil {
			if sess.closed.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// A connected UDP socket reports ICMP port unreachable from an
			// earlier send as ECONNREFUSED here: the daemon is not listening.
			s.logBackend.log(s.log, slog.LevelWarn, "receive from backend failed", "session", sess.id,
				"backend", s.cfg.Backend.String(), "err", backendHint(err))
			if !errors.Is(err, syscall.ECONNREFUSED) {
				time.Sleep(10 * time.Millisecond) // do not spin on a persistent error
			}
			continue
		}
		c := sess.conn.Load()
		frames := sess.frames[:0]
		var bytes uint64
		for i := range sess.msgs[:n] {
			m := &sess.msgs[i]
			if m.Truncated {
				s.counters.OversizedDgrams.Add(1)
				s.logOversize.log(s.log, slog.LevelWarn, "datagram from backend dropped: larger than --max-datagram", "session", sess.id, "max", s.cfg.maxDatagram())
				continue
			}
			dg := m.Buf[:m.N]
			if msg.Decode(dg) != nil {
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
					sess.book.noteESPOut(msg.ESP.SPI)
				}
			case framing.KindIKE:
				s.learnIKE(sess, &msg.IKE)
			}
			if c == nil {
				s.counters.NoPath.Add(1)
				continue
			}
			frames = append(frames, sess.bufs[i][:linkHeadroom+m.N])
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
		sess.stats.countOut(&s.counters, len(frames), bytes)
	}
}

// learnIKE maps an IKE SA the backend speaks in (perhaps one it started)
// to the session, so the client's answers find it.
func (s *Server) learnIKE(sess *session, h *framing.IKEHeader) {
	s.mu.Lock()
	if s.byIKE[h.InitiatorSPI] == nil && !sess.closed.Load() {
		s.routeIKELocked(sess, h.InitiatorSPI)
	}
	s.mu.Unlock()
	sess.book.noteIKE(h)
}

// expireSessions closes sessions whose client has been away longer than
// SessionIdle.
func (s *Server) expireSessions(ctx context.Context) {
	defer s.wg.Done()
	idle := s.cfg.sessionIdle()
	sweepEvery(ctx, idle, 30*time.Second, func(now time.Time) {
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
	dropRoutes(s.byIKE, sess.ikeRoutes, sess)
	dropRoutes(s.byESP, sess.espRoutes, sess)
	s.mu.Unlock()
	sess.udp.Close()
}

// Status describes the server and its sessions, oldest first.
func (s *Server) Status() *Status {
	s.mu.Lock()
	st := &Status{
		Role: "server", Mode: s.encap, Version: s.cfg.Version, PID: os.Getpid(), Listen: s.listen,
		Backend: s.cfg.Backend.String(), Started: s.started,
	}
	sessions := make([]*session, 0, len(s.sessions))
	for _, sess := range s.sessions {
		sessions = append(sessions, sess)
	}
	s.mu.Unlock()
	sort.Slice(sessions, func(i, j int) bool { return sessions[i].id < sessions[j].id })
	for _, sess := range sessions {
		ss := sess.status()
		ss.Local = sess.local.String()
		ss.Peer, ss.State = "-", "waiting"
		if c := sess.conn.Load(); c != nil && !c.closed.Load() {
			ss.Peer, ss.State = c.remote, "up"
		}
		st.Sessions = append(st.Sessions, ss)
	}
	st.Counters = s.counters.Snapshot()
	return st
}

func (sess *session) status() SessionStatus {
	ss := SessionStatus{
		ID:          sess.id,
		Transport:   "TCP",
		Created:     sess.created,
		LastActive:  time.Unix(0, sess.lastActive.Load()),
		Connections: sess.conns.Load(),
	}
	sess.book.fill(&ss)
	sess.stats.fill(&ss)
	return ss
}

// backendHint adds what to check to errors talking to the backend daemon.
func backendHint(err error) string {
	if errors.Is(err, syscall.ECONNREFUSED) {
		return err.Error() + " (is the IKE daemon listening on the --backend address?)"
	}
	return err.Error()
}
