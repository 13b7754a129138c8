package server_test

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestBadInput(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{Link: streamlink.Config{PrefixTimeout: 300 * time.Millisecond, MaxDatagram: 1500}})
	v := relaytest.StartVictim(r)
	sc := r.Srv.Counters()

	t.Run("no prefix", func(t *testing.T) {
		c := r.RawConn(false)
		c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		relaytest.ClosedByServer(t, c)
		relaytest.Eventually(t, "bad_prefix", func() bool { return relaytest.Counter(sc, "bad_prefix") == 1 })
	})
	t.Run("silent", func(t *testing.T) {
		c := r.RawConn(false)
		relaytest.ClosedByServer(t, c)
		relaytest.Eventually(t, "prefix_timeouts", func() bool { return relaytest.Counter(sc, "prefix_timeouts") == 1 })
	})
	t.Run("length 0 and 1", func(t *testing.T) {
		for i, l := range [][]byte{{0, 0}, {0, 1}} {
			c := r.RawConn(true)
			c.Write(l)
			relaytest.ClosedByServer(t, c)
			relaytest.Eventually(t, "bad_length", func() bool { return relaytest.Counter(sc, "bad_length") == uint64(i+1) })
		}
	})
	t.Run("truncated", func(t *testing.T) {
		c := r.RawConn(true)
		f := framing.AppendFrame(nil, relaytest.ESP(0xc7, 1, 400))
		c.Write(f[:200])
		c.(*net.TCPConn).CloseWrite()
		relaytest.ClosedByServer(t, c)
		relaytest.Eventually(t, "truncated_frames", func() bool { return relaytest.Counter(sc, "truncated_frames") == 1 })
	})
	t.Run("unknown SPI", func(t *testing.T) {
		c := r.RawConn(true)
		c.Write(framing.AppendFrame(nil, relaytest.ESP(0x0badbad, 1, 100)))
		relaytest.Eventually(t, "unknown_spi", func() bool { return relaytest.Counter(sc, "unknown_spi") == 1 })
		// One unknown SPI does not close the connection: an IKE message
		// on it still starts a session.
		c.Write(framing.AppendFrame(nil, relaytest.IKE(0x7777, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
		if got := v.Next(t); len(got) != 104 {
			t.Fatalf("IKE after an unknown SPI: backend got %d bytes", len(got))
		}
		// Sustained garbage does close it.
		c2 := r.RawConn(true)
		var burst []byte
		for i := range server.GarbageBudget + 1 {
			burst = framing.AppendFrame(burst, relaytest.ESP(0x0bad0000+uint32(i), 1, 60))
		}
		c2.Write(burst)
		relaytest.ClosedByServer(t, c2)
		if relaytest.Counter(sc, "garbage_closes") != 1 {
			t.Fatalf("garbage_closes = %d", relaytest.Counter(sc, "garbage_closes"))
		}
	})
	t.Run("malformed", func(t *testing.T) {
		c := r.RawConn(true)
		c.Write(framing.AppendFrame(nil, []byte{0, 0, 0, 0, 1, 2})) // marker, no IKE header
		relaytest.Eventually(t, "malformed", func() bool { return relaytest.Counter(sc, "malformed") == 1 })
	})
	t.Run("oversized frame skipped", func(t *testing.T) {
		c := r.RawConn(true)
		var s []byte
		s = framing.AppendFrame(s, relaytest.IKE(0x8888, 0, framing.IKESAInit, framing.FlagInitiator, 3000))
		s = framing.AppendFrame(s, relaytest.IKE(0x8888, 0, framing.IKESAInit, framing.FlagInitiator, 1000))
		c.Write(s)
		if got := v.Next(t); len(got) != 1004 {
			t.Fatalf("frame after the oversized one: backend got %d bytes", len(got))
		}
		if relaytest.Counter(sc, "oversized_frames") != 1 {
			t.Fatalf("oversized_frames = %d", relaytest.Counter(sc, "oversized_frames"))
		}
	})
	v.Finish(t)
}

// TestLimits: a connection over the limit takes the place of the oldest
// one that carries no confirmed session; when every one carries one, the
// new one is refused. A session over the session limit is dropped and the
// connection stays. The established session is never touched.
func TestLimits(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{MaxConns: 2, MaxSessions: 1}})
	sc := r.Srv.Counters()
	a := r.RawConn(true)
	da := framing.NewDecoder(a, 0, false)
	from := r.OpenSession(a, da, 1)
	b := r.RawConn(true)
	// A second session is over the limit: dropped, counted, the
	// connection stays.
	relaytest.Frame(t, b, relaytest.Init(2))
	relaytest.Eventually(t, "sessions_rejected", func() bool { return relaytest.Counter(sc, "sessions_rejected") == 1 })
	relaytest.ExpectNothing(t, r.Backend, "IKE over the session limit")
	// A third connection is over the connection limit: it takes b's
	// place, b carrying nothing confirmed.
	c := r.RawConn(true)
	relaytest.ClosedByServer(t, b)
	if relaytest.Counter(sc, "conns_evicted") != 1 || relaytest.Counter(sc, "conns_rejected") != 0 {
		t.Fatalf("conns_evicted %d, conns_rejected %d", relaytest.Counter(sc, "conns_evicted"), relaytest.Counter(sc, "conns_rejected"))
	}
	// A fourth takes c's: a is never the one to go.
	d := r.RawConn(true)
	relaytest.ClosedByServer(t, c)
	relaytest.ExpectNoFrame(t, d, "the newest connection")
	// The first session is unharmed, both ways.
	relaytest.Frame(t, a, relaytest.IKEMsg(1, 9, framing.IKEAuth, framing.FlagInitiator, 1, 200))
	if got, from2 := relaytest.Recv(t, r.Backend); len(got) != 204 || from2 != from {
		t.Fatalf("first session after the limits: %d bytes from %v", len(got), from2)
	}
	r.Backend.WriteToUDPAddrPort(relaytest.IKEMsg(1, 9, framing.IKEAuth, framing.FlagResponse, 1, 150), from)
	if got := relaytest.ReadFrame(t, a, da); len(got) != 154 {
		t.Fatalf("answer to the first session: %d bytes", len(got))
	}
}

// TestLimitsRefuseWhenAllConfirmed: with every slot held by a connection
// that carries a confirmed session, a new connection is refused.
func TestLimitsRefuseWhenAllConfirmed(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{MaxConns: 1}})
	a := r.RawConn(true)
	r.OpenSession(a, framing.NewDecoder(a, 0, false), 1)
	b := r.RawConn(true)
	relaytest.ClosedByServer(t, b)
	if n := relaytest.Counter(r.Srv.Counters(), "conns_rejected"); n != 1 {
		t.Fatalf("conns_rejected = %d", n)
	}
}

func TestSessionExpiresAfterClientLeaves(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{SessionIdle: 200 * time.Millisecond}})
	c := r.RawConn(true)
	from := r.OpenSession(c, framing.NewDecoder(c, 0, false), 3)
	// While the connection is open the session stays, idle or not.
	time.Sleep(400 * time.Millisecond)
	if n := len(r.Srv.Status().Sessions); n != 1 {
		t.Fatalf("session expired while connected: %d sessions", n)
	}
	// Traffic from the backend with no connection is dropped and counted.
	c.Close()
	relaytest.Eventually(t, "session to lose its connection", func() bool { return r.Srv.Status().Sessions[0].State == "waiting" })
	r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd3, 1, 100), from)
	relaytest.Eventually(t, "no_path", func() bool { return relaytest.Counter(r.Srv.Counters(), "no_path") == 1 })
	relaytest.Eventually(t, "session expiry", func() bool { return len(r.Srv.Status().Sessions) == 0 })
	if relaytest.Counter(r.Srv.Counters(), "sessions_expired") != 1 {
		t.Fatal("sessions_expired not counted")
	}
}

// TestReturnPathMovesOnlyWhenVouched: a session's replies stay on the
// connection that carries it when frames of it come on another, until
// the backend answers a fresh IKE request that came there: then they
// follow (RFC 9329 6.1: answer on the connection that last carried the
// session's traffic, once that traffic is known to be authentic).
func TestReturnPathMovesOnlyWhenVouched(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	a := r.RawConn(true)
	da := framing.NewDecoder(a, 0, false)
	from := r.OpenSession(a, da, 4)
	b := r.RawConn(true)
	db := framing.NewDecoder(b, 0, false)
	// A retransmission of the IKE_SA_INIT on b is not fresh: its answer
	// stays on a.
	relaytest.Frame(t, b, relaytest.Init(4))
	if _, from2 := relaytest.Recv(t, r.Backend); from2 != from {
		t.Fatalf("second connection got another backend socket: %v vs %v", from2, from)
	}
	r.Backend.WriteToUDPAddrPort(relaytest.InitResponse(4), from)
	relaytest.ReadFrame(t, a, da)
	relaytest.ExpectNoFrame(t, b, "the answer to a retransmission from another connection")
	// A fresh request on b that the backend answers moves the session.
	relaytest.Frame(t, b, relaytest.IKEMsg(4, 7, framing.IKEAuth, framing.FlagInitiator, 1, 100))
	relaytest.Recv(t, r.Backend)
	reply := relaytest.IKEMsg(4, 7, framing.IKEAuth, framing.FlagResponse, 1, 120)
	r.Backend.WriteToUDPAddrPort(reply, from)
	if got := relaytest.ReadFrame(t, b, db); !bytes.Equal(got, reply) {
		t.Fatal("the answer to the fresh request did not come on its connection")
	}
	relaytest.ExpectNoFrame(t, a, "the older connection")
	if n := relaytest.Counter(r.Srv.Counters(), "rebinds"); n != 1 {
		t.Fatalf("rebinds = %d", n)
	}
}

// TestLearningIsBounded: a session learns new SPIs only from the
// connection that carries it, at most a burst at once, and never more
// than its table holds; expiry removes every one.
func TestLearningIsBounded(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{SessionIdle: 100 * time.Millisecond}})
	c := r.RawConn(true)
	r.OpenSession(c, framing.NewDecoder(c, 0, false), 5)
	var s [][]byte
	for i := range 3 * server.MaxRouteKeys {
		s = append(s, relaytest.ESP(0xe0000000+uint32(i), 1, 60), relaytest.IKE(0x100+uint64(i), 0, framing.CreateChildSA, framing.FlagInitiator, 80))
	}
	relaytest.Frame(t, c, s...)
	relaytest.Eventually(t, "learn_refused", func() bool {
		return relaytest.Counter(r.Srv.Counters(), "learn_refused") > 0
	})
	ike, esp := r.Srv.RouteCounts()
	if ike+esp > 1+server.LearnBurst+2 || ike > server.MaxRouteKeys || esp > server.MaxRouteKeys {
		t.Fatalf("one session learned %d IKE and %d ESP SPIs in one burst, want at most %d new", ike, esp, server.LearnBurst)
	}
	c.Close()
	relaytest.Eventually(t, "session expiry", func() bool { return len(r.Srv.Status().Sessions) == 0 })
	if ike, esp := r.Srv.RouteCounts(); ike != 0 || esp != 0 {
		t.Fatalf("expired session left %d IKE and %d ESP routes", ike, esp)
	}
}

// TestSetLimits: limits changed while the server runs bound what comes
// next, both ways, and never close what runs.
func TestSetLimits(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{MaxSessions: 1}})
	sc := r.Srv.Counters()
	a := r.RawConn(true)
	da := framing.NewDecoder(a, 0, false)
	from := r.OpenSession(a, da, 1)
	b := r.RawConn(true)
	relaytest.Frame(t, b, relaytest.Init(2))
	relaytest.Eventually(t, "sessions_rejected", func() bool { return relaytest.Counter(sc, "sessions_rejected") == 1 })

	r.Srv.SetLimits(server.Limits{MaxSessions: 3})
	r.OpenSession(b, framing.NewDecoder(b, 0, false), 3)

	r.Srv.SetLimits(server.Limits{MaxSessions: 1}) // two run: both stay, a third is refused
	c := r.RawConn(true)
	relaytest.Frame(t, c, relaytest.Init(4))
	relaytest.Eventually(t, "sessions_rejected", func() bool { return relaytest.Counter(sc, "sessions_rejected") == 2 })
	relaytest.ExpectNothing(t, r.Backend, "IKE over the lowered limit")
	relaytest.Frame(t, a, relaytest.IKEMsg(1, 9, framing.IKEAuth, framing.FlagInitiator, 1, 200))
	if got, from2 := relaytest.Recv(t, r.Backend); len(got) != 204 || from2 != from {
		t.Fatalf("the first session after the limit was lowered: %d bytes from %v", len(got), from2)
	}
}

// TestDrain: Drain closes the listeners and refuses new sessions, while
// the sessions that run go on until Serve's context ends.
func TestDrain(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	a := r.RawConn(true)
	da := framing.NewDecoder(a, 0, false)
	from := r.OpenSession(a, da, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r.Srv.Drain(ctx)
	if c, err := net.DialTimeout("tcp", r.SrvAddr, time.Second); err == nil {
		c.Close()
		t.Fatal("the listener still takes connections after Drain")
	}
	relaytest.Frame(t, a, relaytest.Init(2))
	relaytest.ExpectNothing(t, r.Backend, "a new IKE SA while draining")
	relaytest.Frame(t, a, relaytest.IKEMsg(1, 9, framing.IKEAuth, framing.FlagInitiator, 1, 200))
	if got, from2 := relaytest.Recv(t, r.Backend); len(got) != 204 || from2 != from {
		t.Fatalf("the running session while draining: %d bytes from %v", len(got), from2)
	}
}
