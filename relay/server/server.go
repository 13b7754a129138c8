// Package server is the server role of iketcp: beside the gateway's IKE
// daemon, it accepts links from clients (RFC 9329 streams or fake-TCP
// conns, through any relay.Listener) and relays each session's traffic to
// the daemon from a UDP socket of the session's own, whose source port
// never changes, so the daemon never sees its peer move.
//
// A session is the server's view of one IKE SA (and the SAs rekeyed from
// it): it starts from an IKE_SA_INIT request, is half-open until the
// backend answers it, and is found afterwards by the IKE and ESP SPIs its
// frames carry (routes.go), so a client that reconnects lands on its old
// session. A conn is one accepted link: it routes each frame to its
// session and sends the burst on to the sessions' backend sockets
// (conn.go); each session's backend reader sends the daemon's answers back
// on the connection that carries the session: its return path
// (session.go).
//
// The server faces strangers (admission.go and the rules in conn.go and
// session.go): nothing a stranger sends can move, starve or evict a
// session that belongs to someone else. A session's return path moves only
// when the move is vouched for: the connection that carried it is gone;
// the backend daemon answered a fresh IKE request that came on the new
// connection (only an authentic request gets an answer); or an iketcp
// client proved with its ticket that it owns the session (package
// relay/ticket). Every limit refuses the newest or cheapest thing, never
// an established session.
//
// A session may be carried by an aggregate (aggregate.go): member
// connections of one location ID that each joined it by proving the
// session's key. The backend's datagrams are then spread over the live
// members (package relay/aggregate), each member is probed, and what the
// members bring passes the aggregate's reorder buffer (package
// relay/reorder) on its way to the backend. The session, its backend
// socket and its return path stay one.
//
// A server outlives its process two ways. With Config.StatePath it keeps
// its session table in a file (persist.go, the format in package
// statefile), written off the data path at a bounded rate, and a server
// started again rebinds each session's backend port from it and waits for
// the clients to come back. Handover and Adopt (handover.go) give a
// running server's sessions and live connections to a successor in
// another process, which serves them without the clients or the gateway
// seeing a change.
package server

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/reorder"
)

// Server accepts clients' links and relays them to a backend IKE daemon
// over UDP, one backend socket per session.
type Server struct {
	cfg      Config
	log      *slog.Logger
	started  time.Time
	counters *relay.Counters
	buffers  sync.Pool // of *backendBuffers

	nextConnID, nextSessionID atomic.Uint64

	mu        sync.Mutex // guards the following, and what conns and sessions say it guards
	listeners []relay.Listener
	sessions  map[uint64]*session
	routes    routes
	conns     map[*conn]struct{}
	sources   map[source]*sourceUse
	halfOpen  int
	closing   bool

	// A handover (handover.go).
	handingOver bool          // no new sessions; Serve waits for handedOver
	handedOver  chan struct{} // closed when the handover is done or failed
	kept        *keptTLS      // the TLS connections the handover kept and relays (tlsrelay.go)

	// reorderMemory bounds what every aggregate's reorder buffer holds,
	// together: a client that makes many aggregates and holds their
	// buffers full takes no more than it.
	reorderMemory reorder.Budget
	adoptedConns  []*conn        // conns Adopt took, for Serve to start
	adopted       bool           // the sessions came from a handover, not the state file
	accepting     sync.WaitGroup // the accept loops
	draining      atomic.Bool    // Drain has closed the listeners

	wg sync.WaitGroup // every goroutine the server starts

	// The state file (persist.go); stateDirty is nil without one.
	stateDirty      chan struct{}
	stateConfigName string     // the configuration it belongs to; set by Serve
	stateMu         sync.Mutex // serializes writes; guards stateFinal
	stateFinal      bool

	observeMu sync.Mutex // guards observes
	observes  budget     // Observed answers, server-wide (ObserveBurst, ObserveRate)

	logs logs
}

// logs rate-limits each log line a remote party can trigger, each line
// on its own: a flood of one kind of event does not hide another.
type logs struct {
	accepted, closed, refused, evicted, unconfirmed, acceptFailed  relay.Sometimes
	created, moved, expired, halfOpenExpired, initDropped          relay.Sometimes
	malformed, unknownIKE, unknownESP, claimRefused, controlUnsent relay.Sometimes
	backendSend, backendRecv, oversize, writeFailed, stateWrite    relay.Sometimes
	joined, joinRefused, memberState                               relay.Sometimes
	observeRefused                                                 relay.Sometimes
}

// New returns a server for cfg.
func New(cfg Config) (*Server, error) {
	if !cfg.Backend.IsValid() {
		return nil, errors.New("server needs a backend address (the IKE daemon's UDP port, e.g. 127.0.0.1:4500)")
	}
	s := &Server{
		cfg:      cfg,
		log:      cfg.logger(),
		counters: relay.OrDefault(cfg.Counters, new(relay.Counters)),
		started:  time.Now(),
		sessions: make(map[uint64]*session),
		routes:   newRoutes(),
		conns:    make(map[*conn]struct{}),
		sources:  make(map[source]*sourceUse),
	}
	if cfg.StatePath != "" {
		s.stateDirty = make(chan struct{}, 1)
	}
	s.reorderMemory.Limit = relay.OrDefault(cfg.ReorderMemory, DefaultReorderMemory)
	size := relay.Headroom + cfg.maxDatagram()
	s.buffers.New = func() any { return newBackendBuffers(size) }
	return s, nil
}

// Counters returns the server's live counters; the listeners' links count
// into them too.
func (s *Server) Counters() *relay.Counters { return s.counters }

// Serve accepts links from every listener until ctx is done or one of
// them fails, then closes the listeners and every connection and session
// it made, waits for its goroutines and returns. It returns nil when ctx
// ended it.
func (s *Server) Serve(ctx context.Context, listeners ...relay.Listener) error {
	if len(listeners) == 0 {
		return errors.New("server: nothing to listen on")
	}
	s.mu.Lock()
	s.listeners = listeners
	s.mu.Unlock()
	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	for _, ln := range listeners {
		relay.CloseWhenDone(ctx, &s.wg, ln)
	}
	s.startAdopted()
	if s.stateDirty != nil {
		s.stateConfigName = s.stateConfig(listeners)
		if !s.adopted {
			s.restoreState()
		}
		s.wg.Add(1)
		go s.persistState(ctx)
	}
	s.wg.Add(2)
	go s.sweep(ctx)
	go s.probeMembers(ctx)

	ended := make(chan error, len(listeners))
	s.accepting.Add(len(listeners))
	for _, ln := range listeners {
		s.log.Info("server listening", "listen", ln.Addr(), "encap", ln.Encap(), "backend", s.cfg.Backend.String())
		go func() {
			defer s.accepting.Done()
			ended <- s.acceptLinks(ctx, ln)
		}()
	}
	err := <-ended
	s.mu.Lock()
	handover := s.handedOver
	s.mu.Unlock()
	switch {
	case handover != nil: // the listeners were closed for a handover
		<-handover
		err = nil
	case s.draining.Load():
		// Drain closed the listeners: sessions go on until ctx ends.
		<-parent.Done()
	}
	cancel()
	for range len(listeners) - 1 {
		<-ended
	}
	if parent.Err() != nil {
		err = nil
	}
	if s.stateDirty != nil {
		s.writeFinalState() // nothing, after a handover: the new server owns the file
	}
	s.shutdown()
	s.wg.Wait()
	return err
}

// acceptLinks admits the links ln accepts until ln is closed.
func (s *Server) acceptLinks(ctx context.Context, ln relay.Listener) error {
	var backoff time.Duration
	for {
		link, err := ln.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like: wait and retry, as
			// net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.logs.acceptFailed.Log(s.log, slog.LevelWarn, "accept failed, retrying", "listen", ln.Addr(), "err", err, "in", backoff)
			if !relay.SleepCtx(ctx, backoff) {
				return nil
			}
			continue
		}
		backoff = 0
		if c := s.admit(link); c != nil {
			s.wg.Add(1)
			go s.serveConn(c)
		}
	}
}

// serveConn runs one connection until its link ends.
func (s *Server) serveConn(c *conn) {
	defer s.wg.Done()
	err := c.link.Serve(c)
	if errors.Is(err, relay.ErrDetached) {
		return // handed over: its books stay as they are for the handover; shutdown closes it
	}
	c.close()
	s.forgetConn(c)
	level := slog.LevelInfo
	if relay.IsProtocolError(err) {
		level = slog.LevelWarn
	}
	s.logs.closed.Log(s.log, level, "connection closed", "conn", c.id, "remote", c.remote,
		"reason", err.Error(), "frames", c.frames, "duration", time.Since(c.accepted).Round(time.Millisecond).String())
}

// shutdown closes every connection and session.
func (s *Server) shutdown() {
	s.mu.Lock()
	s.closing = true
	conns := slices.Collect(maps.Keys(s.conns))
	sessions := slices.Collect(maps.Values(s.sessions))
	s.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
	for _, sess := range sessions {
		s.removeSession(sess)
	}
}

// Limits are the bounds on what the server admits that may change while
// it runs (SetLimits). Zero fields mean the defaults.
type Limits struct {
	MaxConns, MaxUnconfirmedPerSource int
	MaxSessions, MaxSessionsPerSource int
	MaxHalfOpen, MaxHalfOpenPerSource int
}

// SetLimits changes the limits on what the server admits from now on:
// what runs already is never closed for it, even where it is now over a
// lowered limit.
func (s *Server) SetLimits(l Limits) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cfg.MaxConns, s.cfg.MaxUnconfirmedPerSource = l.MaxConns, l.MaxUnconfirmedPerSource
	s.cfg.MaxSessions, s.cfg.MaxSessionsPerSource = l.MaxSessions, l.MaxSessionsPerSource
	s.cfg.MaxHalfOpen, s.cfg.MaxHalfOpenPerSource = l.MaxHalfOpen, l.MaxHalfOpenPerSource
}

// Drain begins a graceful stop: the listeners close, no new connection or
// session is taken, and the links let out what they have queued; Drain
// returns once they have, or ctx ends. Sessions keep running until
// Serve's context ends.
func (s *Server) Drain(ctx context.Context) {
	s.mu.Lock()
	s.closing = true
	s.draining.Store(true)
	lns := s.listeners
	links := make([]relay.Link, 0, len(s.conns))
	for c := range s.conns {
		links = append(links, c.link)
	}
	s.mu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
	relay.DrainLinks(ctx, links)
}

// Status describes the server and its sessions, oldest first.
func (s *Server) Status() *relay.Status {
	s.mu.Lock()
	var addrs, encaps []string
	for _, ln := range s.listeners {
		addrs = append(addrs, ln.Addr())
		if !slices.Contains(encaps, ln.Encap()) {
			encaps = append(encaps, ln.Encap())
		}
	}
	st := &relay.Status{
		Role: relay.RoleServer, Mode: strings.Join(encaps, ","), Version: s.cfg.Version, PID: os.Getpid(),
		Listen: strings.Join(addrs, ","), Backend: s.cfg.Backend.String(), Started: s.started,
	}
	sessions := slices.Collect(maps.Values(s.sessions))
	s.mu.Unlock()
	sort.Slice(sessions, func(i, j int) bool { return sessions[i].id < sessions[j].id })
	now := time.Now()
	for _, sess := range sessions {
		st.Sessions = append(st.Sessions, sess.status())
		if as := sess.aggregateStatus(now); as != nil {
			st.Aggregates = append(st.Aggregates, *as)
		}
	}
	st.Counters = s.counters.Snapshot(relay.RoleServer)
	return st
}

// backendHint adds what to check to errors talking to the backend daemon.
func backendHint(err error) string {
	if errors.Is(err, syscall.ECONNREFUSED) {
		return err.Error() + " (is the IKE daemon listening on the --backend address?)"
	}
	return err.Error()
}
