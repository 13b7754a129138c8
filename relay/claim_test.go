package relay_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/relaytest"
)

// cutAndCheck establishes a session through a rig whose network the test
// controls, cuts the client's connection as a NAT that forgets it would
// (the server's side stays open, silent), and reports whether the
// backend's next datagrams reach the site within wait.
func cutAndCheck(t *testing.T, r *relaytest.Rig, wait time.Duration) bool {
	t.Helper()
	from := r.Establish(0x7e57, 0xc1c1c1c1, 0xd1d1d1d1)
	r.Middle.Cut(0)
	// The client notices, reconnects, and its daemon sends again.
	relaytest.Eventually(t, "the client's new connection", func() bool { return r.Middle.Conns() == 2 })
	r.Site.Write(relaytest.ESP(0xc1c1c1c1, 2, 300))
	relaytest.Recv(t, r.Backend)
	deadline := time.Now().Add(wait)
	buf := make([]byte, 2048)
	for seq := uint32(10); time.Now().Before(deadline); seq++ {
		r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd1d1d1d1, seq, 300), from)
		r.Site.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if n, err := r.Site.Read(buf); err == nil && n == 300 {
			return true
		}
	}
	return false
}

// TestClaimBringsTheSessionBack: after a NAT forgets the client's
// connection, the server still holds its side open and silent; the client
// reconnects and claims its session with its ticket, and the return path
// follows at once, not when the old connection times out.
func TestClaimBringsTheSessionBack(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{Middle: true})
	if !cutAndCheck(t, r, 2*time.Second) {
		t.Fatal("the return path did not follow the claim")
	}
	sc := r.Srv.Counters()
	if sc.ClaimsAccepted.Load() != 1 || sc.Rebinds.Load() != 1 {
		t.Fatalf("claims_accepted %d, rebinds %d", sc.ClaimsAccepted.Load(), sc.Rebinds.Load())
	}
	if st := r.Srv.Status(); st.Sessions[0].Connections != 2 {
		t.Fatalf("session carried by %d connections, want 2", st.Sessions[0].Connections)
	}
}

// TestPlainRFC9329WaitsForIKE: without the handshake (a third-party
// server, as far as the client knows), the same cut leaves the replies on
// the old connection: ESP alone never moves them.
func TestPlainRFC9329WaitsForIKE(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{Middle: true, Client: client.Config{PlainRFC9329: true}})
	if cutAndCheck(t, r, 500*time.Millisecond) {
		t.Fatal("ESP on a new connection moved the return path")
	}
	if n := r.Srv.Counters().StrayFrames.Load(); n == 0 {
		t.Fatal("the new connection's ESP was not counted as stray")
	}
}

// TestReplayedClaimProvesNothing: a stranger who captured a client's hello
// and claim sends them on a connection of its own: the server refuses the
// claim, and the session stays where it is.
func TestReplayedClaimProvesNothing(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{Middle: true})
	if !cutAndCheck(t, r, 2*time.Second) {
		t.Fatal("the return path did not follow the claim")
	}
	// What the client sent on its second connection: the prefix, its
	// hello and its claim, among its datagrams.
	sent := r.Middle.Sent(1)
	d := framing.NewDecoder(bytes.NewReader(sent), 0, true)
	var hello, claim []byte
	var m framing.Message
	for {
		p, err := d.Next()
		if err != nil {
			break
		}
		if m.Decode(p) == nil && m.Kind == framing.KindControl {
			switch m.Control.Type {
			case framing.ControlHello:
				hello = bytes.Clone(p)
			case framing.ControlClaim:
				claim = bytes.Clone(p)
			}
		}
	}
	if hello == nil || claim == nil {
		t.Fatal("the client's hello and claim are not in its stream")
	}
	s := r.RawConn(true)
	relaytest.Frame(t, s, hello, claim)
	ds := framing.NewDecoder(s, 0, false)
	var result []byte
	for range 2 {
		p := relaytest.ReadFrame(t, s, ds)
		if m.Decode(p) == nil && m.Kind == framing.KindControl && m.Control.Type == framing.ControlClaimed {
			result = m.Control.Body
		}
	}
	if result == nil || result[8] != framing.ClaimRefused || binary.BigEndian.Uint64(result) != binary.BigEndian.Uint64(claim[framing.ControlHeaderSize:]) {
		t.Fatalf("the replayed claim was answered %x, want refused", result)
	}
	if n := r.Srv.Counters().ClaimsRefused.Load(); n != 1 {
		t.Fatalf("claims_refused = %d", n)
	}
	// The session's replies still go to the client.
	from := r.SessionLocal(t, 0x7e57)
	r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd1d1d1d1, 99, 200), from)
	if got, _ := relaytest.Recv(t, r.Site); len(got) != 200 {
		t.Fatal("the session's replies left the client")
	}
	s.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, _ := io.Copy(io.Discard, s); n != 0 {
		t.Fatalf("the stranger got %d more bytes", n)
	}
}
