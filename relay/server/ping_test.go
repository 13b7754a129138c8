package server_test

import (
	"bytes"
	"testing"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/relaytest"
)

// TestPingAnsweredAfterHelloOnly: a liveness Ping is answered with a Pong
// carrying its sequence number, only on a link whose client said hello,
// and only up to the burst: past it, and without a hello, a Ping is
// garbage, answered with nothing.
func TestPingAnsweredAfterHelloOnly(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	sc := r.Srv.Counters()
	seq := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	ping := framing.AppendControl(nil, framing.ControlPing, seq)

	stranger := r.RawConn(true)
	relaytest.Frame(t, stranger, ping)
	relaytest.ExpectNoFrame(t, stranger, "a Pong without a hello")

	c := r.RawConn(true)
	d := framing.NewDecoder(c, 0, false)
	relaytest.Frame(t, c, framing.AppendControl(nil, framing.ControlHello, bytes.Repeat([]byte{9}, framing.ControlKeySize)))
	var m framing.Message
	if p := relaytest.ReadFrame(t, c, d); m.Decode(p) != nil || m.Control.Type != framing.ControlHelloReply {
		t.Fatalf("no hello reply: %x", p)
	}
	pings := make([][]byte, 12)
	for i := range pings {
		pings[i] = ping
	}
	relaytest.Frame(t, c, pings...)
	for i := range 8 {
		p := relaytest.ReadFrame(t, c, d)
		if m.Decode(p) != nil || m.Control.Type != framing.ControlPong || !bytes.Equal(m.Control.Body, seq) {
			t.Fatalf("answer %d: %x, want a Pong with the Ping's sequence number", i, p)
		}
	}
	relaytest.ExpectNoFrame(t, c, "a Pong past the burst")
	if n := sc.PingsAnswered.Load(); n != 8 {
		t.Fatalf("pings_answered = %d, want 8", n)
	}
}
