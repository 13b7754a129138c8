package server

import (
	"context"
	"log/slog"
	"net/netip"
	"time"

	"github.com/iketcp/iketcp/relay"
)

// source is what the per-source limits count a client as: its IPv4
// address, or the /64 of its IPv6 address (one host's, usually).
type source netip.Prefix

func sourceOf(remote string) source {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return source{}
	}
	a := ap.Addr().Unmap()
	bits := 32
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return source(p)
}

func (src source) String() string { return netip.Prefix(src).String() }

// sourceUse is what one source holds: connections that carry no confirmed
// session, sessions, and half-open sessions. Guarded by Server.mu.
type sourceUse struct {
	unconfirmed, sessions, halfOpen int
}

// useLocked returns what src holds, making an entry for it.
func (s *Server) useLocked(src source) *sourceUse {
	u := s.sources[src]
	if u == nil {
		u = new(sourceUse)
		s.sources[src] = u
	}
	return u
}

// tidyLocked forgets a source that holds nothing.
func (s *Server) tidyLocked(src source) {
	if u := s.sources[src]; u != nil && *u == (sourceUse{}) {
		delete(s.sources, src)
	}
}

// admit takes a new link in as a connection, or refuses it (and closes
// it): when its source holds too many unconfirmed connections, or when
// the server is full and no connection without a confirmed session can
// make room. Room is made by closing the oldest of those: the
// established are never refused in favour of a stranger.
func (s *Server) admit(link relay.Link) *conn {
	remote := link.RemoteAddr()
	src := sourceOf(remote)
	now := time.Now()
	s.mu.Lock()
	if s.closing || s.handingOver {
		s.mu.Unlock()
		link.Close()
		return nil
	}
	u := s.useLocked(src)
	var refuse string
	var evict *conn
	switch {
	case u.unconfirmed >= s.cfg.maxUnconfirmedPerSource():
		refuse = "too many connections without a confirmed session from one source (raise --max-unconfirmed-per-source)"
	case len(s.conns) >= s.cfg.maxConns():
		if evict = s.oldestUnconfirmedLocked(); evict == nil {
			refuse = "connection limit reached, and every connection carries a confirmed session (raise --max-conns)"
		}
	}
	if refuse != "" {
		s.tidyLocked(src)
		s.mu.Unlock()
		s.counters.ConnsRejected.Add(1)
		s.logs.refused.Log(s.log, slog.LevelWarn, "connection refused: "+refuse, "remote", remote, "source", src.String())
		link.Close()
		return nil
	}
	if evict != nil {
		s.forgetConnLocked(evict) // its slot is the new one's now
	}
	c := s.newConnLocked(link, remote, src, now)
	u.unconfirmed++
	s.mu.Unlock()
	if evict != nil {
		s.counters.ConnsEvicted.Add(1)
		s.logs.evicted.Log(s.log, slog.LevelInfo, "connection closed to make room: it carried no confirmed session",
			"conn", evict.id, "remote", evict.remote, "age", now.Sub(evict.accepted).Round(time.Millisecond).String())
		evict.close()
	}
	s.counters.ConnsAccepted.Add(1)
	s.logs.accepted.Log(s.log, slog.LevelDebug, "connection accepted", "conn", c.id, "remote", remote)
	return c
}

// oldestUnconfirmedLocked returns the oldest open connection that carries
// no confirmed session, or nil.
func (s *Server) oldestUnconfirmedLocked() *conn {
	var oldest *conn
	for c := range s.conns {
		if c.confirmed == 0 && !c.closed.Load() && (oldest == nil || c.accepted.Before(oldest.accepted)) {
			oldest = c
		}
	}
	return oldest
}

// forgetConn drops a closed connection from the server's books.
func (s *Server) forgetConn(c *conn) {
	s.mu.Lock()
	s.forgetConnLocked(c)
	s.mu.Unlock()
}

// forgetConnLocked drops c from the server's books and detaches the
// sessions it carried: they wait for their client to come back. It is
// idempotent.
func (s *Server) forgetConnLocked(c *conn) {
	if _, ok := s.conns[c]; !ok {
		return
	}
	s.leaveLocked(c)
	delete(s.conns, c)
	if c.confirmed == 0 {
		s.useLocked(c.src).unconfirmed--
		s.tidyLocked(c.src)
	}
	now := time.Now().UnixNano()
	for sess := range c.carrying {
		if sess.conn.Load() == c {
			sess.conn.Store(nil)
			sess.lastActive.Store(now)
		}
	}
	c.carrying = nil
}

// carryLocked makes c the return path of sess, and c confirmed if sess is.
func (s *Server) carryLocked(sess *session, c *conn) {
	if c.carrying == nil { // forgotten: closed meanwhile
		return
	}
	if old := sess.conn.Load(); old != nil {
		s.dropCarryLocked(sess, old)
	}
	sess.conn.Store(c)
	c.carrying[sess] = struct{}{}
	if sess.confirmed.Load() {
		s.confirmLocked(c)
	}
}

// dropCarryLocked stops c carrying sess.
func (s *Server) dropCarryLocked(sess *session, c *conn) {
	if _, ok := c.carrying[sess]; !ok {
		return
	}
	delete(c.carrying, sess)
	if sess.confirmed.Load() {
		s.unconfirmLocked(c)
	}
}

// confirmLocked counts one more confirmed session that c carries.
func (s *Server) confirmLocked(c *conn) {
	if c.confirmed == 0 {
		if _, ok := s.conns[c]; ok {
			s.useLocked(c.src).unconfirmed--
		}
	}
	c.confirmed++
}

// unconfirmLocked counts one confirmed session fewer that c carries; at
// none, c is unconfirmed again, for ConfirmTimeout from now.
func (s *Server) unconfirmLocked(c *conn) {
	c.confirmed--
	if c.confirmed == 0 {
		c.unconfirmedSince = time.Now()
		if _, ok := s.conns[c]; ok {
			s.useLocked(c.src).unconfirmed++
		}
	}
}

// sweep closes, until ctx ends: connections that have carried no confirmed
// session for ConfirmTimeout, half-open sessions the backend has not
// answered in HalfOpenTimeout, and sessions whose client has been away
// for SessionIdle.
func (s *Server) sweep(ctx context.Context) {
	defer s.wg.Done()
	cfg := &s.cfg
	every := min(cfg.confirmTimeout(), cfg.halfOpenTimeout(), cfg.sessionIdle())
	relay.SweepEvery(ctx, every, time.Second, func(now time.Time) {
		var idle []*conn
		var halfOpen, away []*session
		s.mu.Lock()
		for c := range s.conns {
			if c.confirmed == 0 && now.Sub(c.unconfirmedSince) > cfg.confirmTimeout() {
				idle = append(idle, c)
			}
		}
		for _, sess := range s.sessions {
			switch c := sess.conn.Load(); {
			case !sess.confirmed.Load():
				if now.Sub(sess.created) > cfg.halfOpenTimeout() {
					halfOpen = append(halfOpen, sess)
				}
			case c != nil && !c.closed.Load():
			case now.Sub(time.Unix(0, sess.lastActive.Load())) > cfg.sessionIdle():
				away = append(away, sess)
			}
		}
		s.mu.Unlock()
		for _, c := range idle {
			s.counters.UnconfirmedCloses.Add(1)
			s.logs.unconfirmed.Log(s.log, slog.LevelInfo, "connection closed: no confirmed session", "conn", c.id, "remote", c.remote,
				"timeout", cfg.confirmTimeout().String())
			c.close()
		}
		for _, sess := range halfOpen {
			s.counters.HalfOpenExpired.Add(1) // before it leaves Status
			s.removeSession(sess)
			s.logs.halfOpenExpired.Log(s.log, slog.LevelInfo, "half-open session expired: the backend did not answer its IKE_SA_INIT",
				"session", sess.id, "timeout", cfg.halfOpenTimeout().String())
		}
		for _, sess := range away {
			s.counters.SessionsExpired.Add(1)
			s.removeSession(sess)
			s.logs.expired.Log(s.log, slog.LevelInfo, "session expired: client did not come back", "session", sess.id,
				"idle", cfg.sessionIdle().String(), "backend_local", sess.local.String())
		}
	})
}

// budget is a token bucket: up to burst events at once, then rate a
// second. The zero value starts full.
type budget struct {
	tokens  float64
	last    time.Time
	started bool
}

// take spends a token, if there is one.
func (b *budget) take(now time.Time, burst, rate float64) bool {
	if !b.started {
		b.tokens, b.started = burst, true
	} else {
		b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*rate)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
