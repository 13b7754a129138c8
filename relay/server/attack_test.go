package server_test

// Attacks on the server, one test each, tried as a stranger would: each
// runs beside a live victim session whose traffic must come through
// untouched, both ways.

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// stranger is a raw connection of the attacker's, which records every
// byte the server sends it.
type stranger struct {
	net.Conn
	got  atomic.Int64
	done chan struct{}
}

func newStranger(t *testing.T, r *relaytest.Rig) *stranger {
	s := &stranger{Conn: r.RawConn(true), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		n, _ := io.Copy(io.Discard, s.Conn)
		s.got.Add(n)
	}()
	return s
}

// received closes the stranger's connection and returns how many bytes
// the server sent it.
func (s *stranger) received() int64 {
	s.Close()
	<-s.done
	return s.got.Load()
}

// TestHijackOnPath: a stranger who saw the victim's SPIs on the wire
// sends frames with them from connections of its own (ESP with the
// victim's SPI, replays of the victim's IKE_SA_INIT and of an IKE request
// it saw) and gets nothing back; the victim's traffic is untouched both
// ways.
func TestHijackOnPath(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	v := relaytest.StartVictim(r)
	var strangers []*stranger
	for i := range 5 {
		s := newStranger(t, r)
		strangers = append(strangers, s)
		var burst [][]byte
		for seq := range 20 {
			burst = append(burst, relaytest.ESP(relaytest.VictimSPI, uint32(1<<20+seq), 77))
		}
		burst = append(burst,
			relaytest.IKE(0xbeef, 0, framing.IKESAInit, framing.FlagInitiator, 300),          // the victim's INIT, replayed
			relaytest.IKEMsg(0xbeef, 0x5151, framing.IKEAuth, framing.FlagInitiator, 0, 200), // an old request, replayed
		)
		relaytest.Frame(t, s, burst...)
		if i == 2 {
			v.CheckReturnPath(t, 20)
		}
	}
	time.Sleep(200 * time.Millisecond)
	v.CheckReturnPath(t, 50)
	for i, s := range strangers {
		if n := s.received(); n != 0 {
			t.Errorf("stranger %d received %d bytes", i, n)
		}
	}
	if n := relaytest.Counter(r.Srv.Counters(), "stray_frames"); n < 5*22 {
		t.Errorf("stray_frames = %d, want every stranger's frame counted (%d)", n, 5*22)
	}
	if n := relaytest.Counter(r.Srv.Counters(), "rebinds"); n != 0 {
		t.Errorf("rebinds = %d: a stranger moved the session", n)
	}
	v.Finish(t)
}

// TestHijackOffPath: a stranger who cannot see the wire guesses SPIs, on a
// connection of its own and on one with a session of its own: the first
// is closed for garbage, the second learns no more than its budget, and
// neither reaches the victim's routes.
func TestHijackOffPath(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	v := relaytest.StartVictim(r)
	sc := r.Srv.Counters()
	sweep := func(n int) [][]byte {
		var b [][]byte
		for range n {
			spi := rand.Uint32() | 0x01000000
			b = append(b, relaytest.ESP(spi, 1, 60))
		}
		return b
	}
	// Without a session: closed after its garbage budget.
	s := newStranger(t, r)
	relaytest.Frame(t, s, sweep(10*server.GarbageBudget)...)
	relaytest.ClosedByServer(t, s)
	if sc.GarbageCloses.Load() < 1 {
		t.Fatal("a sweep of guessed SPIs did not close its connection")
	}
	// With a confirmed session of its own: it learns at most a burst.
	own := r.RawConn(true)
	v.OpenSession(t, own, framing.NewDecoder(own, 0, false), 0x5eed)
	ikeBefore, espBefore := r.Srv.RouteCounts()
	relaytest.Frame(t, own, sweep(3*server.MaxRouteKeys)...)
	relaytest.Eventually(t, "learn_refused", func() bool { return sc.LearnRefused.Load() > 0 })
	ike, esp := r.Srv.RouteCounts()
	if ike != ikeBefore || esp-espBefore > server.LearnBurst {
		t.Fatalf("a sweep added %d IKE and %d ESP routes, want 0 and at most %d", ike-ikeBefore, esp-espBefore, server.LearnBurst)
	}
	v.CheckReturnPath(t, 50)
	v.Finish(t)
}

// TestIdleConnectionFlood: 1,100 connections from one source that send
// the prefix and nothing else take no more than that source's share;
// a new client from elsewhere connects and is served, and so is one from
// the same source once the server is full, in the place of the oldest
// idle connection.
func TestIdleConnectionFlood(t *testing.T) {
	const flood = 1100
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{MaxConns: 512}})
	sc := r.Srv.Counters()
	var idle []net.Conn
	for range flood {
		c, err := net.Dial("tcp", r.SrvAddr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(framing.Prefix))
		idle = append(idle, c)
	}
	defer func() {
		for _, c := range idle {
			c.Close()
		}
	}()
	relaytest.Eventually(t, "the flood refused past the source's share", func() bool {
		return sc.ConnsAccepted.Load()+sc.ConnsRejected.Load() == flood
	})
	if n := sc.ConnsAccepted.Load(); n != server.DefaultMaxUnconfirmedPerSource {
		t.Fatalf("%d of %d idle connections from one source accepted, want %d", n, flood, server.DefaultMaxUnconfirmedPerSource)
	}
	// A client from another address is served.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	c, err := d.Dial("tcp", r.SrvAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(framing.Prefix))
	r.OpenSession(c, framing.NewDecoder(c, 0, false), 0x600d)
}

// TestFullServerMakesRoomForTheNew: when connections without a confirmed
// session fill the server, each new one takes the place of the oldest of
// them, so a new client always gets in; established ones never go.
func TestFullServerMakesRoomForTheNew(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{Server: server.Config{MaxConns: 40, MaxUnconfirmedPerSource: 1000}})
	v := relaytest.StartVictim(r)
	var idle []net.Conn
	for range 200 {
		idle = append(idle, r.RawConn(true))
	}
	relaytest.Eventually(t, "evictions", func() bool { return relaytest.Counter(r.Srv.Counters(), "conns_evicted") >= 200-39 })
	c := r.RawConn(true)
	v.OpenSession(t, c, framing.NewDecoder(c, 0, false), 0x600e)
	v.CheckReturnPath(t, 20)
	v.Finish(t)
	_ = idle
}

// TestNonInitIKECreatesNoSession: IKE headers of every kind but an
// IKE_SA_INIT request, for unknown IKE SAs, create no session.
func TestNonInitIKECreatesNoSession(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	v := relaytest.StartVictim(r)
	sc := r.Srv.Counters()
	before := sc.SessionsCreated.Load()
	kinds := []struct {
		x     framing.ExchangeType
		flags uint8
		rspi  uint64
		msgID uint32
	}{
		{framing.IKESAInit, framing.FlagResponse, 7, 0},                             // an answer
		{framing.IKESAInit, framing.FlagInitiator, 7, 0},                            // a responder SPI already
		{framing.IKESAInit, framing.FlagInitiator, 0, 1},                            // message ID not 0
		{framing.IKESAInit, 0, 0, 0},                                                // not from the initiator
		{framing.IKEAuth, framing.FlagInitiator, 7, 1},                              // the next exchange
		{framing.Informational, framing.FlagInitiator | framing.FlagResponse, 7, 2}, // a response
		{framing.CreateChildSA, framing.FlagInitiator, 7, 3},
	}
	for round := range 20 {
		s := r.RawConn(true)
		var burst [][]byte
		for _, k := range kinds {
			burst = append(burst, relaytest.IKEMsg(rand.Uint64()|1, k.rspi, k.x, k.flags, k.msgID, 60))
		}
		relaytest.Frame(t, s, burst...)
		_ = round
	}
	relaytest.Eventually(t, "every header counted", func() bool { return sc.UnknownSPI.Load() >= 20*uint64(len(kinds)) })
	if n := sc.SessionsCreated.Load() - before; n != 0 {
		t.Fatalf("headers that open no IKE SA created %d sessions", n)
	}
	v.CheckReturnPath(t, 20)
	v.Finish(t)
}

// TestHalfOpenFlood: IKE_SA_INIT requests the backend never answers fill
// only their source's share of half-open sessions, expire, and leave the
// established and other sources alone.
func TestHalfOpenFlood(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{Server: server.Config{HalfOpenTimeout: 500 * time.Millisecond}})
	v := relaytest.StartVictim(r)
	sc := r.Srv.Counters()
	// Spread over connections, so that none of them spends its garbage
	// budget on refusals.
	for k := range 10 {
		var burst [][]byte
		for i := range 20 {
			burst = append(burst, relaytest.Init(0x7000+uint64(20*k+i)))
		}
		relaytest.Frame(t, r.RawConn(true), burst...)
	}
	relaytest.Eventually(t, "half-open over the source's share refused", func() bool {
		return sc.SessionsRejected.Load() == 200-server.DefaultMaxHalfOpenPerSource
	})
	// Another source still opens one.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 3)}}
	c, err := d.Dial("tcp", r.SrvAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(framing.Prefix))
	relaytest.Frame(t, c, relaytest.Init(0x600f))
	r.SessionLocal(t, 0x600f)
	relaytest.Eventually(t, "half-open sessions expire", func() bool {
		return sc.HalfOpenExpired.Load() >= server.DefaultMaxHalfOpenPerSource
	})
	v.CheckReturnPath(t, 20)
	v.Finish(t)
}

// TestSustainedGarbageBesideGoodFrames: a connection that interleaves good
// frames with garbage is closed all the same once its budget is spent.
func TestSustainedGarbageBesideGoodFrames(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	v := relaytest.StartVictim(r)
	sc := r.Srv.Counters()
	c := r.RawConn(true)
	// Its own session, and a good ESP SPI of it.
	v.OpenSession(t, c, framing.NewDecoder(c, 0, false), 0x9a9a)
	var burst [][]byte
	for i := range 4 * server.GarbageBudget {
		burst = append(burst, relaytest.ESP(0xc9c90000, uint32(i+1), 64), relaytest.ESP(0x0bad0000+uint32(i), 1, 64))
	}
	relaytest.Frame(t, c, burst...)
	relaytest.ClosedByServer(t, c)
	if sc.GarbageCloses.Load() != 1 {
		t.Fatalf("garbage_closes = %d", sc.GarbageCloses.Load())
	}
	v.CheckReturnPath(t, 20)
	v.Finish(t)
}

// TestOversizedFrameKeepsPendingFrame: the frame before an oversized one,
// still pending when the frame after it needs another read, reaches the
// backend as it was sent.
func TestOversizedFrameKeepsPendingFrame(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Link: streamlink.Config{MaxDatagram: 1500}})
	c := r.RawConn(true)
	init := relaytest.Init(0xc0c0)
	for i := framing.MarkerSize + framing.IKEHeaderSize; i < len(init); i++ {
		init[i] = byte(i)
	}
	big := relaytest.ESP(0xc1c1c1c1, 1, 3000)
	next := relaytest.IKE(0xc0c0, 0, framing.IKESAInit, framing.FlagInitiator, 400)
	for i := framing.MarkerSize + framing.IKEHeaderSize; i < len(next); i++ {
		next[i] = 0xee
	}
	var s []byte
	s = framing.AppendFrame(s, init)
	s = framing.AppendFrame(s, big)
	s = framing.AppendFrame(s, next)
	cut := 2*framing.LengthSize + len(init) + len(big) + 20 // into the last frame
	c.Write(s[:cut])
	time.Sleep(100 * time.Millisecond) // the server reads the first part on its own
	c.Write(s[cut:])
	if got, _ := relaytest.Recv(t, r.Backend); !bytes.Equal(got, init) {
		t.Fatalf("the frame before the oversized one reached the backend changed (%d bytes)", len(got))
	}
	if got, _ := relaytest.Recv(t, r.Backend); !bytes.Equal(got, next) {
		t.Fatalf("the frame after the oversized one reached the backend changed (%d bytes)", len(got))
	}
}

// countingHandler counts the records a logger writes.
type countingHandler struct {
	mu    sync.Mutex
	count map[string]int
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.count[r.Message]++
	h.mu.Unlock()
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

// TestLogFloodIsRateLimited: a client that connects and misbehaves as fast
// as it can for over a second makes at most a line a second of each kind,
// and each kind still shows.
func TestLogFloodIsRateLimited(t *testing.T) {
	h := &countingHandler{count: make(map[string]int)}
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{Logger: slog.New(h)}})
	start := time.Now()
	n := 0
	for ; n < 20000 && time.Since(start) < 1500*time.Millisecond; n++ {
		c, err := net.Dial("tcp", r.SrvAddr)
		if err != nil {
			t.Fatal(err)
		}
		var b []byte
		if n%2 == 0 {
			b = []byte("GET / HTTP/1.1\r\n\r\n")
		} else {
			b = append([]byte(framing.Prefix), framing.AppendFrame(nil, relaytest.ESP(0x0bad0000+uint32(n), 1, 60))...)
			b = append(b, 0, 0) // a frame length of 0
		}
		c.Write(b)
		c.Close()
	}
	relaytest.Eventually(t, "every connection handled", func() bool {
		sc := r.Srv.Counters()
		return sc.BadPrefix.Load()+sc.BadLength.Load()+sc.ConnsRejected.Load() == uint64(n)
	})
	secs := time.Since(start).Seconds()
	h.mu.Lock()
	defer h.mu.Unlock()
	t.Logf("%d misbehaving connections in %.1f s made these log lines: %v", n, secs, h.count)
	for _, want := range []string{"connection closed", "ESP for an unknown SPI dropped"} {
		if h.count[want] == 0 {
			t.Errorf("no %q line at all", want)
		}
	}
	for msg, k := range h.count {
		if float64(k) > secs+2 {
			t.Errorf("%q logged %d times in %.1f s", msg, k, secs)
		}
	}
}
