package lab

import (
	"context"
	"strings"
	"testing"
	"time"
)

// NewForTest builds a lab for a test: it calls Require, defaults opts.Dir to
// t.TempDir() and opts.Logf to t.Logf, and registers a cleanup that prints
// the tail of every log if the test failed and then closes the lab. Setup is
// bounded to one minute.
func NewForTest(t testing.TB, opts Options) *Lab {
	t.Helper()
	Require(t)
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := New(ctx, opts)
	if err != nil {
		t.Fatalf("build lab: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			l.DumpLogs(t.Logf, 60)
		}
		if err := l.Close(); err != nil {
			t.Errorf("close lab: %v", err)
		}
	})
	return l
}

// DumpLogs writes the last lines (at most maxLines each) of every charon
// log and every process's output through logf, for post-mortems.
func (l *Lab) DumpLogs(logf func(format string, args ...any), maxLines int) {
	for _, c := range l.Charons() {
		logf("=== charon in %s (pid %d) %s:\n%s", c.Namespace.Role, c.PID(), c.LogPath(), lastLines(c.Log(), maxLines))
	}
	for _, p := range l.Processes() {
		if out := p.Log(); out != "" {
			logf("=== %s (pid %d) %s:\n%s", p.Name(), p.PID(), p.LogPath(), lastLines(out, maxLines))
		}
	}
}

func lastLines(s string, n int) string {
	s = strings.TrimRight(s, "\n")
	if n <= 0 {
		return s
	}
	lines := strings.Split(s, "\n")
	if len(lines) <= n {
		return s
	}
	return "...\n" + strings.Join(lines[len(lines)-n:], "\n")
}
