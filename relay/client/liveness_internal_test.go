package client

import (
	"sync/atomic"
	"testing"
	"time"
)

// TestLivenessCheck walks the liveness check through fake time: nothing
// before the server answered a first Ping; then a Ping after a quarter of
// the timeout of quiet, one per quarter; anything heard resets the quiet;
// dead after the whole timeout.
func TestLivenessCheck(t *testing.T) {
	const timeout = 4 * time.Second
	start := time.Unix(1000, 0)
	var heard atomic.Int64
	lv := newLinkLiveness(timeout, &heard, start)
	at := func(d time.Duration) int64 { return start.Add(d).UnixNano() }
	type step struct {
		at         time.Duration
		heard      bool // a burst arrived at this moment, before the check
		ping, dead bool
	}
	expect := func(steps []step) {
		t.Helper()
		for _, s := range steps {
			if s.heard {
				lv.heard.Store(at(s.at))
			}
			ping, dead := lv.check(at(s.at))
			if ping != s.ping || dead != s.dead {
				t.Fatalf("at %v: ping %v dead %v, want %v %v", s.at, ping, dead, s.ping, s.dead)
			}
		}
	}
	// Not armed: a server that never answered a Ping is never dead.
	expect([]step{{at: 2 * time.Second}, {at: time.Minute}})

	lv.heard.Store(at(time.Minute))
	lv.armed.Store(true)
	base := time.Minute
	expect([]step{
		{at: base + 500*time.Millisecond},
		{at: base + time.Second, ping: true},
		{at: base + 1500*time.Millisecond},
		{at: base + 2*time.Second, ping: true},
		{at: base + 2100*time.Millisecond, heard: true}, // the Pong
		{at: base + 2600*time.Millisecond},
		{at: base + 3100*time.Millisecond, ping: true},
		{at: base + 4100*time.Millisecond, ping: true},
		{at: base + 5100*time.Millisecond, ping: true},
		{at: base + 6000*time.Millisecond},
		{at: base + 6100*time.Millisecond, dead: true},
	})
	if got := lv.ping(); len(got) != 8 || got[7] != 1 {
		t.Fatalf("first sequence number %x", got)
	}
}

// TestBackoffBounded: the reconnect backoff doubles from the minimum,
// never leaves [0.9 lo, 1.1 hi], and is jittered (not every client
// reconnects in step).
func TestBackoffBounded(t *testing.T) {
	const lo, hi = 100 * time.Millisecond, 5 * time.Second
	seen := map[time.Duration]bool{}
	for range 200 {
		var b time.Duration
		for i := range 12 {
			b = nextBackoff(b, lo, hi)
			if b < lo*9/10 || b > hi*11/10 {
				t.Fatalf("step %d: backoff %v outside [%v, %v]", i, b, lo*9/10, hi*11/10)
			}
			if i >= 7 && b < hi*9/10 {
				t.Fatalf("step %d: backoff %v has not reached the maximum", i, b)
			}
		}
		seen[b] = true
	}
	if len(seen) < 50 {
		t.Fatalf("200 runs ended on %d distinct backoffs: no jitter", len(seen))
	}
}
