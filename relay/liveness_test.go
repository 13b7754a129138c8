package relay_test

import (
	"bytes"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/relaytest"
)

// TestLivenessFindsADeadLink: a carrier that silently drops everything
// both ways leaves both TCP connections open; the client hears no Pong,
// takes the link for dead within its liveness timeout (not TCP's
// minutes), reconnects, claims its session back, and traffic flows both
// ways on the same session.
func TestLivenessFindsADeadLink(t *testing.T) {
	const timeout = time.Second // the shortest the server answers Pings for (4 a second)
	r := relaytest.NewRig(t, relaytest.RigOptions{Middle: true, Client: client.Config{LivenessTimeout: timeout}})
	from := r.Establish(0x11fe, 0xc2c2c2c2, 0xd2d2d2d2)
	relaytest.Eventually(t, "the server's first Pong", func() bool { return r.Srv.Counters().PingsAnswered.Load() >= 1 })

	stalled := time.Now()
	r.Middle.Stall(0)
	relaytest.Eventually(t, "a new connection after the stall", func() bool { return r.Middle.Conns() == 2 })
	took := time.Since(stalled)
	t.Logf("link taken for dead and redialled %v after the stall", took.Round(time.Millisecond))
	if took > timeout+timeout/8+500*time.Millisecond {
		t.Fatalf("the dead link took %v to be noticed, liveness timeout %v", took, timeout)
	}
	if n := r.Cl.Counters().LinksDead.Load(); n != 1 {
		t.Fatalf("links_dead = %d, want 1", n)
	}
	r.Site.Write(relaytest.ESP(0xc2c2c2c2, 2, 300))
	if _, got := relaytest.Recv(t, r.Backend); got != from {
		t.Fatalf("the session's backend socket moved: %v, was %v", got, from)
	}
	// The claim follows the hello's answer; until then replies stay on
	// the stalled connection.
	relaytest.Eventually(t, "the client's claim", func() bool { return r.Srv.Counters().ClaimsAccepted.Load() == 1 })
	r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd2d2d2d2, 2, 300), from)
	if got, _ := relaytest.Recv(t, r.Site); len(got) != 300 {
		t.Fatal("the return path did not follow the reconnect")
	}
}

// TestLivenessQuietLinkLives: a link that carries nothing for many
// timeouts stays up on Pings and Pongs alone.
func TestLivenessQuietLinkLives(t *testing.T) {
	const timeout = time.Second
	r := relaytest.NewRig(t, relaytest.RigOptions{Middle: true, Client: client.Config{LivenessTimeout: timeout}})
	r.Establish(0x12fe, 0xc3c3c3c3, 0xd3d3d3d3)
	time.Sleep(3 * timeout)
	if n := r.Middle.Conns(); n != 1 {
		t.Fatalf("%d connections: a quiet, live link was taken for dead", n)
	}
	if n := r.Srv.Counters().PingsAnswered.Load(); n < 8 {
		t.Fatalf("pings_answered = %d over %v of quiet, want a Ping every %v", n, 3*timeout, timeout/4)
	}
	if n := r.Cl.Counters().LinksDead.Load(); n != 0 {
		t.Fatalf("links_dead = %d", n)
	}
}

// TestPlainRFC9329SendsNoPing: toward a third-party server the client
// sends no control message at all, Pings included.
func TestPlainRFC9329SendsNoPing(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{Middle: true, Client: client.Config{PlainRFC9329: true, LivenessTimeout: 100 * time.Millisecond}})
	r.Establish(0x13fe, 0xc4c4c4c4, 0xd4d4d4d4)
	time.Sleep(500 * time.Millisecond)
	d := framing.NewDecoder(bytes.NewReader(r.Middle.Sent(0)), 0, true)
	var m framing.Message
	frames := 0
	for {
		p, err := d.Next()
		if err != nil {
			break
		}
		frames++
		if m.Decode(p) == nil && m.Kind == framing.KindControl {
			t.Fatalf("a plain RFC 9329 client sent a %v", m.Control.Type)
		}
	}
	if frames < 2 || r.Middle.Conns() != 1 {
		t.Fatalf("%d frames on %d connections", frames, r.Middle.Conns())
	}
}
