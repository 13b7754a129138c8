package relay

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Counters are the events a relay counts, shared by both roles. Names in
// Snapshot are stable: scripts and dashboards read them.
type Counters struct {
	ConnsAccepted     atomic.Uint64 // server: TCP connections accepted
	ConnsRejected     atomic.Uint64 // server: refused over the connection limit
	ConnsDialed       atomic.Uint64 // client: TCP connections established
	DialFailures      atomic.Uint64 // client: connection attempts that failed
	PrefixTimeouts    atomic.Uint64 // server: no prefix within the deadline
	BadPrefix         atomic.Uint64 // server: stream began with something else
	BadLength         atomic.Uint64 // frame Length 0 or 1 (connection closed)
	TruncatedFrames   atomic.Uint64 // stream ended inside a frame (discarded)
	OversizedFrames   atomic.Uint64 // frames over --max-datagram (skipped)
	OversizedDgrams   atomic.Uint64 // datagrams over --max-datagram (dropped)
	Malformed         atomic.Uint64 // frames that are neither IKE, ESP nor keepalive
	UnknownSPI        atomic.Uint64 // server: ESP for no known session (dropped)
	GarbageCloses     atomic.Uint64 // server: connections closed for sustained garbage
	KeepalivesDropped atomic.Uint64 // NAT keepalives not carried over TCP (RFC 9329 6.6)
	NoPath            atomic.Uint64 // datagrams for a session with no connection (dropped)
	QueueFull         atomic.Uint64 // client: datagrams dropped on a full flow queue
	Foreign           atomic.Uint64 // transparent mode: intercepted packets for no configured peer
	SessionsCreated   atomic.Uint64
	SessionsExpired   atomic.Uint64
	SessionsRejected  atomic.Uint64 // over the session or flow limit
	Rebinds           atomic.Uint64 // sessions that moved to a new connection
	PacketsIn         atomic.Uint64 // datagrams that arrived over TCP and were relayed
	BytesIn           atomic.Uint64
	PacketsOut        atomic.Uint64 // datagrams relayed onto TCP
	BytesOut          atomic.Uint64
	WriteErrors       atomic.Uint64 // failed or timed-out writes
}

// Counter is one named value of a snapshot.
type Counter struct {
	Name  string `json:"name"`
	Value uint64 `json:"value"`
}

// Snapshot returns every counter with its stable name, in a fixed order.
func (c *Counters) Snapshot() []Counter {
	return []Counter{
		{"conns_accepted", c.ConnsAccepted.Load()},
		{"conns_rejected", c.ConnsRejected.Load()},
		{"conns_dialed", c.ConnsDialed.Load()},
		{"dial_failures", c.DialFailures.Load()},
		{"prefix_timeouts", c.PrefixTimeouts.Load()},
		{"bad_prefix", c.BadPrefix.Load()},
		{"bad_length", c.BadLength.Load()},
		{"truncated_frames", c.TruncatedFrames.Load()},
		{"oversized_frames", c.OversizedFrames.Load()},
		{"oversized_datagrams", c.OversizedDgrams.Load()},
		{"malformed", c.Malformed.Load()},
		{"unknown_spi", c.UnknownSPI.Load()},
		{"garbage_closes", c.GarbageCloses.Load()},
		{"keepalives_dropped", c.KeepalivesDropped.Load()},
		{"no_path", c.NoPath.Load()},
		{"queue_full", c.QueueFull.Load()},
		{"foreign_packets", c.Foreign.Load()},
		{"sessions_created", c.SessionsCreated.Load()},
		{"sessions_expired", c.SessionsExpired.Load()},
		{"sessions_rejected", c.SessionsRejected.Load()},
		{"rebinds", c.Rebinds.Load()},
		{"packets_in", c.PacketsIn.Load()},
		{"bytes_in", c.BytesIn.Load()},
		{"packets_out", c.PacketsOut.Load()},
		{"bytes_out", c.BytesOut.Load()},
		{"write_errors", c.WriteErrors.Load()},
	}
}

// flowStats counts one session's or flow's traffic. "In" is what arrived
// over TCP from the peer, "out" what was sent to it.
type flowStats struct {
	packetsIn, bytesIn   atomic.Uint64
	packetsOut, bytesOut atomic.Uint64
}

// countIn counts n datagrams of b bytes in all that arrived over TCP,
// in the flow's figures and the relay's.
func (st *flowStats) countIn(c *Counters, n int, b uint64) {
	st.packetsIn.Add(uint64(n))
	st.bytesIn.Add(b)
	c.PacketsIn.Add(uint64(n))
	c.BytesIn.Add(b)
}

// countOut counts n datagrams of b bytes in all sent onto TCP.
func (st *flowStats) countOut(c *Counters, n int, b uint64) {
	st.packetsOut.Add(uint64(n))
	st.bytesOut.Add(b)
	c.PacketsOut.Add(uint64(n))
	c.BytesOut.Add(b)
}

// sometimes logs an event at most once per interval and says how many
// were left out in between, so an attack or a broken peer cannot flood
// the log. The zero value logs at most once a second.
type sometimes struct {
	Interval time.Duration

	mu         sync.Mutex // guards the following
	last       time.Time
	suppressed int
}

func (s *sometimes) log(l *slog.Logger, level slog.Level, msg string, args ...any) {
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

// closeWhenDone closes c once ctx ends, in a goroutine counted in wg:
// what unblocks a loop reading c when the relay stops.
func closeWhenDone(ctx context.Context, wg *sync.WaitGroup, c io.Closer) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-ctx.Done()
		c.Close()
	}()
}

// sweepEvery calls sweep until ctx ends, often enough to expire things
// idle for longer than idle within about a quarter of it: every idle/4,
// but at least every ceiling and at most every 50 ms.
func sweepEvery(ctx context.Context, idle, ceiling time.Duration, sweep func(now time.Time)) {
	t := time.NewTicker(min(max(idle/4, 50*time.Millisecond), ceiling))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			sweep(now)
		}
	}
}
