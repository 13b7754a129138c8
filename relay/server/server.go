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

	wg sync.WaitGroup // every goroutine the server starts

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
	backendSend, backendRecv, oversize, writeFailed                relay.Sometimes
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
	s.wg.Add(1)
	go s.sweep(ctx)

	ended := make(chan error, len(listeners))
	for _, ln := range listeners {
		s.log.Info("server listening", "listen", ln.Addr(), "encap", ln.Encap(), "backend", s.cfg.Backend.String())
		go func() { ended <- s.acceptLinks(ctx, ln) }()
	}
	err := <-ended
	cancel()
	for range len(listeners) - 1 {
		<-ended
	}
	if parent.Err() != nil {
		err = nil
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
	for _, sess := range sessions {
		st.Sessions = append(st.Sessions, sess.status())
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
