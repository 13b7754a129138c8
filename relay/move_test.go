package relay_test

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/relaytest"
)

// exchange sends an IKE request from the site and the backend's answer
// back, and returns the backend-side address the request came from.
func exchange(t *testing.T, r *relaytest.Rig, ispi uint64, x framing.ExchangeType, msgID uint32, to netip.AddrPort) netip.AddrPort {
	t.Helper()
	req := relaytest.IKEMsg(ispi, ispi^0x5151, x, framing.FlagInitiator, msgID, 120)
	if x == framing.IKESAInit {
		req = relaytest.IKEMsg(ispi, 0, x, framing.FlagInitiator, 0, 120)
	}
	r.Site.Write(req)
	got, from := relaytest.Recv(t, r.Backend)
	if !bytes.Equal(got, req) {
		t.Fatalf("backend got %d bytes, want the %v request", len(got), x)
	}
	if to.IsValid() && from != to {
		t.Fatalf("the %v request of IKE SA %x came from %v, want %v", x, ispi, from, to)
	}
	resp := relaytest.IKEMsg(ispi, ispi^0x5151, x, framing.FlagResponse, msgID, 110)
	r.Backend.WriteToUDPAddrPort(resp, from)
	if got, _ := relaytest.Recv(t, r.Site); !bytes.Equal(got, resp) {
		t.Fatalf("site got %d bytes, want the %v response", len(got), x)
	}
	return from
}

// TestMoveFollowsThePeersAnswer: two IKE SAs through one client; B's IKE
// SA is rekeyed, then A's child SA. A's new ESP SPI is guessed onto B's
// connection at first; when the hub's side of that child SA answers on
// A's connection, the client moves the SPI there and proves to the
// server, with B's ticket, that it may: the server then delivers it from
// A's session. A stranger's move proves nothing.
func TestMoveFollowsThePeersAnswer(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	const a, b, bb = 0xaaa0, 0xbbb0, 0xbbb1
	fromA := exchange(t, r, a, framing.IKESAInit, 0, netip.AddrPort{})
	exchange(t, r, a, framing.IKEAuth, 1, fromA)
	fromB := exchange(t, r, b, framing.IKESAInit, 0, netip.AddrPort{})
	exchange(t, r, b, framing.IKEAuth, 1, fromB)
	if fromA == fromB {
		t.Fatal("two IKE SAs share a session")
	}
	// Their first child SAs, used in order.
	r.Site.Write(relaytest.ESP(0xc1000001, 1, 200))
	if _, from := relaytest.Recv(t, r.Backend); from != fromA {
		t.Fatalf("A's first ESP came from %v", from)
	}
	r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd1000001, 1, 200), fromA)
	relaytest.Recv(t, r.Site)
	r.Site.Write(relaytest.ESP(0xc2000001, 1, 200))
	if _, from := relaytest.Recv(t, r.Backend); from != fromB {
		t.Fatalf("B's first ESP came from %v", from)
	}
	r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd2000001, 1, 200), fromB)
	relaytest.Recv(t, r.Site)

	exchange(t, r, b, framing.CreateChildSA, 2, fromB) // B's IKE SA, rekeyed into bb
	exchange(t, r, a, framing.CreateChildSA, 2, fromA) // A's child SA
	// A's new child SA: guessed onto B's connection first.
	r.Site.Write(relaytest.ESP(0xc3000001, 1, 200))
	if _, from := relaytest.Recv(t, r.Backend); from != fromB {
		t.Fatalf("the guess went to %v; this test expects it on B (%v)", from, fromB)
	}
	// The hub's side of A's new child SA answers on A.
	r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd3000001, 1, 200), fromA)
	relaytest.Recv(t, r.Site)
	relaytest.Eventually(t, "spi_moves", func() bool { return r.Srv.Counters().SPIMoves.Load() == 1 })
	r.Site.Write(relaytest.ESP(0xc3000001, 2, 200))
	if _, from := relaytest.Recv(t, r.Backend); from != fromA {
		t.Fatalf("after the move, A's ESP came from %v, want A's session %v", from, fromA)
	}
	// B's new IKE SA stays on B.
	exchange(t, r, bb, framing.CreateChildSA, 0, fromB)
	if n := r.Srv.Counters().StrayFrames.Load(); n != 0 {
		t.Fatalf("stray_frames = %d", n)
	}

	// A stranger with a hello of its own, moving the SPI back.
	s := r.RawConn(true)
	hello := framing.AppendControl(nil, framing.ControlHello, bytes.Repeat([]byte{9}, framing.ControlKeySize))
	move := framing.AppendControl(nil, framing.ControlMove, binary.BigEndian.AppendUint32(nil, 0xc3000001),
		binary.BigEndian.AppendUint64(nil, 1), make([]byte, framing.ControlMACSize))
	relaytest.Frame(t, s, hello)
	ds := framing.NewDecoder(s, 0, false)
	relaytest.Frame(t, s, relaytest.Init(0x5eed)) // a confirmed session of its own
	_, fromS := relaytest.Recv(t, r.Backend)
	r.Backend.WriteToUDPAddrPort(relaytest.InitResponse(0x5eed), fromS)
	for range 3 { // the server's hello, the ticket, the answer
		relaytest.ReadFrame(t, s, ds)
	}
	relaytest.Frame(t, s, move)
	relaytest.Eventually(t, "claims_refused", func() bool { return r.Srv.Counters().ClaimsRefused.Load() == 1 })
	r.Site.Write(relaytest.ESP(0xc3000001, 3, 200))
	if _, from := relaytest.Recv(t, r.Backend); from != fromA {
		t.Fatalf("after the stranger's move, A's ESP came from %v", from)
	}
}
