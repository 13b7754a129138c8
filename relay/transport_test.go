package relay

import (
	"bytes"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/framing"
)

// The UDP transport reaches the hub's daemon itself, on its NAT-T port:
// here the rig's backend socket plays it on both paths.
func toBackend(r *rig) uint16 { return r.backend.LocalAddr().(*net.UDPAddr).AddrPort().Port() }

// blackHole is a UDP port where datagrams vanish, as on a carrier that
// drops UDP: a bound socket that nobody reads.
func blackHole(t testing.TB) func(*rig) uint16 {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return func(*rig) uint16 { return uint16(c.LocalAddr().(*net.UDPAddr).Port) }
}

func flowStatus(t testing.TB, cl *Client) SessionStatus {
	t.Helper()
	st := cl.Status()
	if len(st.Sessions) != 1 {
		t.Fatalf("%d flows, want 1", len(st.Sessions))
	}
	return st.Sessions[0]
}

func TestTransportUDP(t *testing.T) {
	r := newRig(t, rigOptions{client: ClientConfig{Transport: fallback.ModeUDP}, udpTarget: toBackend})
	init := ikeDatagram(0x10, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	r.site.Write(init)
	got, from := recv(t, r.backend)
	if !bytes.Equal(got, init) {
		t.Fatal("IKE_SA_INIT changed on the UDP path")
	}
	// The hub answers the client's UDP socket, as any NAT-T peer would.
	resp := ikeDatagram(0x10, 0x20, framing.IKESAInit, framing.FlagResponse, 180)
	r.backend.WriteToUDPAddrPort(resp, from)
	if got, _ := recv(t, r.site); !bytes.Equal(got, resp) {
		t.Fatal("response changed on the UDP path")
	}
	// NAT keepalives go out on UDP: they keep the carrier's mapping.
	r.site.Write([]byte{0xff})
	if got, from2 := recv(t, r.backend); !bytes.Equal(got, []byte{0xff}) || from2 != from {
		t.Fatalf("keepalive: got %x from %v", got, from2)
	}
	esp := espDatagram(0xc1, 1, 1400)
	r.site.Write(esp)
	if got, _ := recv(t, r.backend); !bytes.Equal(got, esp) {
		t.Fatal("ESP changed on the UDP path")
	}
	eventually(t, "3 datagrams out and 1 in on the UDP path", func() bool {
		s := flowStatus(t, r.cl)
		return s.Transport == "UDP" && s.PacketsOut == 3 && s.PacketsIn == 1
	})
	if counter(r.cl.Counters(), "conns_dialed") != 0 || counter(r.srv.Counters(), "conns_accepted") != 0 {
		t.Fatal("the UDP transport opened a TCP connection")
	}
}

// TestTransportFallback: UDP goes unanswered, so the first retransmission
// after the threshold goes over TCP, and the flow stays there.
func TestTransportFallback(t *testing.T) {
	r := newRig(t, rigOptions{
		client:    ClientConfig{Transport: fallback.ModeFallback, FallbackThreshold: time.Second},
		udpTarget: blackHole(t),
	})
	init := ikeDatagram(0x11, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	start := time.Now()
	r.site.Write(init)
	expectNothing(t, r.backend, "IKE_SA_INIT over UDP into the black hole")
	if s := flowStatus(t, r.cl); s.Transport != "UDP" {
		t.Fatalf("before the threshold: %+v", s)
	}
	time.Sleep(time.Until(start.Add(time.Second + 50*time.Millisecond)))
	r.site.Write(init) // the daemon's retransmission
	got, from := recv(t, r.backend)
	if !bytes.Equal(got, init) {
		t.Fatal("retransmission changed on the TCP path")
	}
	if counter(r.srv.Counters(), "conns_accepted") != 1 {
		t.Fatal("the retransmission did not come over TCP")
	}
	r.backend.WriteToUDPAddrPort(ikeDatagram(0x11, 0x21, framing.IKESAInit, framing.FlagResponse, 180), from)
	recv(t, r.site)
	s := flowStatus(t, r.cl)
	if s.Transport != "TCP" || !strings.Contains(s.TransportReason, "answered on tcp") {
		t.Fatalf("after the answer: %+v", s)
	}
	// Settled: even ESP long after goes over TCP.
	r.site.Write(espDatagram(0xc2, 1, 500))
	recv(t, r.backend)
	eventually(t, "the server to count 2 datagrams over TCP", func() bool { return counter(r.srv.Counters(), "packets_in") == 2 })
}

// TestTransportRace: with Race, the first retransmission goes both ways
// and TCP, the only one that answers, wins at once.
func TestTransportRace(t *testing.T) {
	r := newRig(t, rigOptions{
		client:    ClientConfig{Transport: fallback.ModeFallback, FallbackThreshold: 15 * time.Second, Race: true},
		udpTarget: blackHole(t),
	})
	init := ikeDatagram(0x12, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	start := time.Now()
	r.site.Write(init)
	expectNothing(t, r.backend, "IKE_SA_INIT over UDP into the black hole")
	r.site.Write(init) // the first retransmission
	_, from := recv(t, r.backend)
	r.backend.WriteToUDPAddrPort(ikeDatagram(0x12, 0x22, framing.IKESAInit, framing.FlagResponse, 180), from)
	recv(t, r.site)
	took := time.Since(start)
	s := flowStatus(t, r.cl)
	if s.Transport != "TCP" || !strings.Contains(s.TransportReason, "tcp answered first") {
		t.Fatalf("after the race: %+v", s)
	}
	if took > 2*time.Second {
		t.Fatalf("race took %v", took)
	}
}

// TestTransportFallbackStaysOnUDP: where UDP answers, a fallback flow
// never opens a TCP connection.
func TestTransportFallbackStaysOnUDP(t *testing.T) {
	r := newRig(t, rigOptions{
		client:    ClientConfig{Transport: fallback.ModeFallback, FallbackThreshold: time.Second, Race: true},
		udpTarget: toBackend,
	})
	init := ikeDatagram(0x13, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	r.site.Write(init)
	_, from := recv(t, r.backend)
	r.backend.WriteToUDPAddrPort(ikeDatagram(0x13, 0x23, framing.IKESAInit, framing.FlagResponse, 180), from)
	recv(t, r.site)
	time.Sleep(1100 * time.Millisecond) // past the threshold
	r.site.Write(ikeDatagram(0x13, 0x23, framing.IKEAuth, framing.FlagInitiator, 300))
	if _, from2 := recv(t, r.backend); from2 != from {
		t.Fatalf("IKE_AUTH came from %v, not the UDP path %v", from2, from)
	}
	if s := flowStatus(t, r.cl); s.Transport != "UDP" || counter(r.cl.Counters(), "conns_dialed") != 0 {
		t.Fatalf("flow %+v, %d connections", s, counter(r.cl.Counters(), "conns_dialed"))
	}
}
