package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/server/statefile"
	"github.com/iketcp/iketcp/relay/ticket"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// The session table's file (Config.StatePath) is written off the data
// path, by one goroutine (persistState): a change to the table (a session
// confirmed, keyed, removed, an SPI learned, an IKE request) only marks it
// dirty, with a send on a channel of one that never blocks, and the
// writer takes at most one snapshot per StateInterval. It also rewrites
// an unchanged table every so often, so that the file's age says how long
// ago the server last ran, which is what staleness is judged by.

// DefaultStateInterval is the least time between two writes of the state
// file.
const DefaultStateInterval = time.Second

func (c *Config) stateInterval() time.Duration {
	return relay.OrDefault(c.StateInterval, DefaultStateInterval)
}

// stateRefresh is how often an unchanged table is written again: well
// within the idle timeout by which a restarted server judges it.
func (c *Config) stateRefresh() time.Duration {
	return max(min(c.sessionIdle()/4, time.Minute), c.stateInterval())
}

// stateChanged marks the session table changed, for the state file's
// writer. It never blocks and does not allocate.
func (s *Server) stateChanged() {
	if s.stateDirty == nil {
		return
	}
	select {
	case s.stateDirty <- struct{}{}:
	default:
	}
}

// stateConfig names the configuration a state file belongs to: the
// listeners and the backend. Server.mu must not be held.
func (s *Server) stateConfig(listeners []relay.Listener) string {
	var addrs []string
	for _, ln := range listeners {
		addrs = append(addrs, ln.Encap()+"://"+ln.Addr())
	}
	slices.Sort(addrs)
	return strings.Join(addrs, ",") + " -> " + s.cfg.Backend.String()
}

// persistState writes the session table when it changed, at most once per
// StateInterval, until ctx ends. The final write is Serve's.
func (s *Server) persistState(ctx context.Context) {
	defer s.wg.Done()
	cfg := &s.cfg
	last := time.Now()
	refresh := time.NewTicker(cfg.stateRefresh())
	defer refresh.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.stateDirty:
		case <-refresh.C:
			if time.Since(last) < cfg.stateRefresh() {
				continue
			}
		}
		if wait := cfg.stateInterval() - time.Since(last); wait > 0 {
			if !relay.SleepCtx(ctx, wait) {
				return
			}
		}
		select { // what changed while we waited goes in this write
		case <-s.stateDirty:
		default:
		}
		last = time.Now()
		s.writeState()
	}
}

// writeState writes a snapshot of the session table to the state file.
// Writes never overlap.
func (s *Server) writeState() {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	if s.stateFinal {
		return // the server is going: the final table is written
	}
	t := s.snapshot()
	if err := statefile.Write(s.cfg.StatePath, t); err != nil {
		s.logs.stateWrite.Log(s.log, slog.LevelError, "cannot write the state file: a restart will lose the sessions",
			"state", s.cfg.StatePath, "err", err)
		return
	}
	s.counters.StateWrites.Add(1)
}

// writeFinalState writes the session table one last time, as the server
// stops, before its sessions close, and stops every later write, so that
// a restart (or the copy an upgrade starts) finds them all.
func (s *Server) writeFinalState() {
	s.writeState()
	s.stateMu.Lock()
	s.stateFinal = true
	s.stateMu.Unlock()
}

// snapshot takes the session table: the confirmed sessions, whose IKE SA
// the backend has answered. Half-open ones are cheap to lose: the
// daemon's retransmission opens them again.
func (s *Server) snapshot() *statefile.Table {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.tableLocked(false)
	return &t
}

// tableLocked takes the session table, with the half-open sessions or
// without. Server.mu must be held.
func (s *Server) tableLocked(halfOpen bool) statefile.Table {
	t := statefile.Table{Config: s.stateConfigName, Written: time.Now(), NextSession: s.nextSessionID.Load()}
	for _, sess := range s.sessions {
		if !halfOpen && !sess.confirmed.Load() || sess.closed.Load() {
			continue
		}
		e := statefile.Session{
			ID: sess.id, Source: netip.Prefix(sess.src), Owner: sess.owner, Created: sess.created,
			LastActive: time.Unix(0, sess.lastActive.Load()), Local: sess.local,
			ESP: slices.Clone(sess.espKeys),
		}
		for _, spi := range sess.ikeKeys {
			if r := s.routes.ike.m[spi]; r != nil && r.sess == sess {
				e.IKE = append(e.IKE, statefile.IKERoute{SPI: spi, MaxReq: r.maxReq, Requests: r.anyReq})
			}
		}
		if len(e.IKE) == 0 {
			continue
		}
		if sess.keyed {
			e.Key = slices.Clone(sess.key[:])
		}
		t.Sessions = append(t.Sessions, e)
	}
	slices.SortFunc(t.Sessions, func(a, b statefile.Session) int { return cmp.Compare(a.ID, b.ID) })
	return t
}

// restoreState rebuilds the sessions of the state file, if there is one
// that belongs to this server, before the server accepts anyone: each
// session binds its old port toward the backend again, and waits, as
// after a disconnect, for its client to come back within SessionIdle. A
// file that cannot be used is reported in one line and ignored.
func (s *Server) restoreState() {
	path := s.cfg.StatePath
	ignore := func(err error) {
		s.log.Warn("state file ignored, starting without sessions: "+err.Error(), "state", path)
	}
	t, err := statefile.Read(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		s.log.Info("no state file yet, starting without sessions", "state", path)
		return
	case err != nil:
		ignore(err)
		return
	}
	now := time.Now()
	if err := t.Check(s.stateConfigName, s.cfg.sessionIdle(), now); err != nil {
		ignore(err)
		return
	}
	if s.cfg.DialBackend != nil {
		ignore(errors.New("sessions of --real-address are not restored"))
		return
	}
	var restored, failed int
	var firstErr error
	for i := range t.Sessions {
		if err := s.restoreSession(&t.Sessions[i], now); err != nil {
			failed++
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		restored++
	}
	for next := s.nextSessionID.Load(); next < t.NextSession; next = s.nextSessionID.Load() {
		s.nextSessionID.CompareAndSwap(next, t.NextSession)
	}
	s.counters.SessionsRestored.Add(uint64(restored))
	args := []any{"state", path, "written", now.Sub(t.Written).Round(time.Millisecond).String() + " ago"}
	if failed > 0 {
		args = append(args, "not_restored", failed, "first_err", firstErr.Error())
	}
	s.log.Info(fmt.Sprintf("restored %d sessions from the state file", restored), args...)
	if failed > 0 {
		s.stateChanged()
	}
}

// restoreSession rebuilds one session: its backend socket on its old
// port, its routes, its ticket key. It refuses what the limits would
// refuse now.
func (s *Server) restoreSession(e *statefile.Session, now time.Time) error {
	cfg := &s.cfg
	src := source(e.Source)
	s.mu.Lock()
	u := s.useLocked(src)
	var err error
	switch {
	case len(s.sessions) >= cfg.maxSessions():
		err = fmt.Errorf("session %d: session limit %d reached", e.ID, cfg.maxSessions())
	case u.sessions >= cfg.maxSessionsPerSource():
		err = fmt.Errorf("session %d: source %s at its limit", e.ID, src)
	case s.sessions[e.ID] != nil:
		err = fmt.Errorf("session %d exists", e.ID)
	}
	if err == nil {
		u.sessions++ // reserve its place while the socket opens
	}
	s.tidyLocked(src)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	uc, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(e.Local), net.UDPAddrFromAddrPort(cfg.Backend))
	if err != nil {
		s.mu.Lock()
		s.useLocked(src).sessions--
		s.tidyLocked(src)
		s.mu.Unlock()
		return fmt.Errorf("session %d: binding its backend port %v again: %w", e.ID, e.Local, err)
	}
	relay.SizeSocketBuffers(uc)
	sess := &session{
		srv:        s,
		id:         e.ID,
		src:        src,
		owner:      e.Owner,
		created:    e.Created,
		udp:        udpbatch.New(uc, udpbatch.Options{BatchSize: sessionBatch, Logger: s.log}),
		uc:         uc,
		readerDone: make(chan struct{}),
		release:    uc.Close,
		local:      uc.LocalAddr().(*net.UDPAddr).AddrPort(),
	}
	sess.lastActive.Store(now.UnixNano()) // its client has SessionIdle from now to come back
	sess.confirmed.Store(true)
	sess.conns.Store(1)
	if len(e.Key) == ticket.KeySize {
		sess.key, sess.keyed = ticket.Key(e.Key), true
	}
	s.mu.Lock()
	s.sessions[sess.id] = sess
	for _, r := range e.IKE {
		if rt := s.routes.ike.add(sess, &sess.ikeKeys, r.SPI, now); rt != nil {
			rt.maxReq, rt.anyReq = r.MaxReq, r.Requests
		}
	}
	for _, spi := range e.ESP {
		s.routes.esp.add(sess, &sess.espKeys, spi, now)
	}
	s.wg.Add(1)
	s.mu.Unlock()
	go sess.readBackend()
	return nil
}
