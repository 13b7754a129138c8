package server_test

import (
	"bytes"
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
		for i := range server.GarbageLimit {
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

func TestLimits(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{MaxConns: 2, MaxSessions: 1}})
	sc := r.Srv.Counters()
	a := r.RawConn(true)
	a.Write(framing.AppendFrame(nil, relaytest.IKE(1, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
	relaytest.Recv(t, r.Backend)
	b := r.RawConn(true)
	// A second session is over the limit: dropped, counted, the
	// connection stays.
	b.Write(framing.AppendFrame(nil, relaytest.IKE(2, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
	relaytest.Eventually(t, "sessions_rejected", func() bool { return relaytest.Counter(sc, "sessions_rejected") == 1 })
	relaytest.ExpectNothing(t, r.Backend, "IKE over the session limit")
	// A third connection is over the connection limit.
	c := r.RawConn(true)
	relaytest.ClosedByServer(t, c)
	if relaytest.Counter(sc, "conns_rejected") != 1 {
		t.Fatalf("conns_rejected = %d", relaytest.Counter(sc, "conns_rejected"))
	}
	// The first session is unharmed.
	a.Write(framing.AppendFrame(nil, relaytest.IKE(1, 9, framing.IKEAuth, framing.FlagInitiator, 200)))
	if got, _ := relaytest.Recv(t, r.Backend); len(got) != 204 {
		t.Fatalf("first session after the limits: %d bytes", len(got))
	}
}

func TestSessionExpiresAfterClientLeaves(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{SessionIdle: 200 * time.Millisecond}})
	c := r.RawConn(true)
	c.Write(framing.AppendFrame(nil, relaytest.IKE(3, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
	_, from := relaytest.Recv(t, r.Backend)
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

// TestReturnPathFollowsLastConnection checks RFC 9329 6.1: the server
// answers on the connection that last carried the session's traffic.
func TestReturnPathFollowsLastConnection(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	a := r.RawConn(true)
	a.Write(framing.AppendFrame(nil, relaytest.IKE(4, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
	_, from := relaytest.Recv(t, r.Backend)
	b := r.RawConn(true)
	b.Write(framing.AppendFrame(nil, relaytest.IKE(4, 7, framing.IKEAuth, framing.FlagInitiator, 100)))
	if _, from2 := relaytest.Recv(t, r.Backend); from2 != from {
		t.Fatalf("second connection got another backend socket: %v vs %v", from2, from)
	}
	reply := relaytest.IKE(4, 7, framing.IKEAuth, framing.FlagResponse, 120)
	r.Backend.WriteToUDPAddrPort(reply, from)
	b.SetReadDeadline(time.Now().Add(2 * time.Second))
	d := framing.NewDecoder(b, 0, false)
	got, err := d.Next()
	if err != nil || !bytes.Equal(got, reply) {
		t.Fatalf("reply on the newer connection: %v", err)
	}
	a.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _ := a.Read(make([]byte, 10)); n != 0 {
		t.Fatal("older connection also got the reply")
	}
}

// TestRoutesAreBounded checks that a session which keeps learning SPIs
// (as rekeys do for as long as it lives) holds a bounded share of the
// routing table, and that expiry removes all of it.
func TestRoutesAreBounded(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{SessionIdle: 100 * time.Millisecond}})
	c := r.RawConn(true)
	var s []byte
	s = framing.AppendFrame(s, relaytest.IKE(5, 0, framing.IKESAInit, framing.FlagInitiator, 100))
	for i := range 3 * server.MaxRouteKeys {
		s = framing.AppendFrame(s, relaytest.ESP(0xe0000000+uint32(i), 1, 60))
		s = framing.AppendFrame(s, relaytest.IKE(0x100+uint64(i), 0, framing.CreateChildSA, framing.FlagInitiator, 80))
	}
	c.Write(s)
	for range 1 + 6*server.MaxRouteKeys {
		relaytest.Recv(t, r.Backend)
	}
	ike, esp := r.Srv.RouteCounts()
	if ike != server.MaxRouteKeys || esp != server.MaxRouteKeys {
		t.Fatalf("routing table holds %d IKE and %d ESP SPIs for one session, want %d each", ike, esp, server.MaxRouteKeys)
	}
	c.Close()
	relaytest.Eventually(t, "session expiry", func() bool { return len(r.Srv.Status().Sessions) == 0 })
	if ike, esp := r.Srv.RouteCounts(); ike != 0 || esp != 0 {
		t.Fatalf("expired session left %d IKE and %d ESP routes", ike, esp)
	}
}
