package relay

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Sometimes logs an event at most once per Interval and says how many were
// left out in between, so that a remote party cannot flood the log: every
// log line that one can trigger goes through one. The zero value logs at
// most once a second.
type Sometimes struct {
	Interval time.Duration

	mu         sync.Mutex // guards the following
	last       time.Time
	suppressed int
}

// Log logs msg at level through l, unless a line went out less than
// Interval ago.
func (s *Sometimes) Log(l *slog.Logger, level slog.Level, msg string, args ...any) {
	if !l.Enabled(context.Background(), level) {
		return
	}
	interval := s.Interval
	if interval == 0 {
		interval = time.Second
	}
	s.mu.Lock()
	now := time.Now()
	if !s.last.IsZero() && now.Sub(s.last) < interval {
		s.suppressed++
		s.mu.Unlock()
		return
	}
	s.last = now
	n := s.suppressed
	s.suppressed = 0
	s.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed_since_last", n)
	}
	l.Log(context.Background(), level, msg, args...)
}
