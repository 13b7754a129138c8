package client_test

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/iketcp/iketcp/nat/packet"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/streamlink"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestFlowExpiresWhenDaemonIsSilent checks the client closes a flow, and
// its connection, once the daemon has sent nothing for FlowIdle, and that
// the daemon's keepalives count as something.
func TestFlowExpiresWhenDaemonIsSilent(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{Client: client.Config{FlowIdle: 300 * time.Millisecond}})
	r.Establish(0x6666, 0xc6, 0xd6)
	for range 6 { // keepalives alone keep the flow
		time.Sleep(100 * time.Millisecond)
		r.Site.Write([]byte{0xff})
	}
	if n := len(r.Cl.Status().Sessions); n != 1 {
		t.Fatalf("flow closed while the daemon sent keepalives: %d flows", n)
	}
	relaytest.Eventually(t, "flow expiry", func() bool { return len(r.Cl.Status().Sessions) == 0 })
	if relaytest.Counter(r.Cl.Counters(), "flows_expired") != 1 {
		t.Fatal("flow expiry not counted")
	}
	relaytest.Eventually(t, "server session to lose its connection", func() bool {
		st := r.Srv.Status()
		return len(st.Sessions) == 1 && st.Sessions[0].State == "waiting"
	})
}

// The UDP transport reaches the hub's daemon itself, on its NAT-T port:
// here the rig's backend socket plays it on both paths.
func toBackend(r *relaytest.Rig) uint16 {
	return r.Backend.LocalAddr().(*net.UDPAddr).AddrPort().Port()
}

// blackHole is a UDP port where datagrams vanish, as on a carrier that
// drops UDP: a bound socket that nobody reads.
func blackHole(t testing.TB) func(*relaytest.Rig) uint16 {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return func(*relaytest.Rig) uint16 { return uint16(c.LocalAddr().(*net.UDPAddr).Port) }
}

func flowStatus(t testing.TB, cl *client.Client) relay.SessionStatus {
	t.Helper()
	st := cl.Status()
	if len(st.Sessions) != 1 {
		t.Fatalf("%d flows, want 1", len(st.Sessions))
	}
	return st.Sessions[0]
}

func TestTransportUDP(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{Client: client.Config{Transport: fallback.ModeUDP}, UDPTarget: toBackend})
	init := relaytest.IKE(0x10, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	r.Site.Write(init)
	got, from := relaytest.Recv(t, r.Backend)
	if !bytes.Equal(got, init) {
		t.Fatal("IKE_SA_INIT changed on the UDP path")
	}
	// The hub answers the client's UDP socket, as any NAT-T peer would.
	resp := relaytest.IKE(0x10, 0x20, framing.IKESAInit, framing.FlagResponse, 180)
	r.Backend.WriteToUDPAddrPort(resp, from)
	if got, _ := relaytest.Recv(t, r.Site); !bytes.Equal(got, resp) {
		t.Fatal("response changed on the UDP path")
	}
	// NAT keepalives go out on UDP: they keep the carrier's mapping.
	r.Site.Write([]byte{0xff})
	if got, from2 := relaytest.Recv(t, r.Backend); !bytes.Equal(got, []byte{0xff}) || from2 != from {
		t.Fatalf("keepalive: got %x from %v", got, from2)
	}
	esp := relaytest.ESP(0xc1, 1, 1400)
	r.Site.Write(esp)
	if got, _ := relaytest.Recv(t, r.Backend); !bytes.Equal(got, esp) {
		t.Fatal("ESP changed on the UDP path")
	}
	relaytest.Eventually(t, "3 datagrams out and 1 in on the UDP path", func() bool {
		s := flowStatus(t, r.Cl)
		return s.Transport == "UDP" && s.PacketsOut == 3 && s.PacketsIn == 1
	})
	if relaytest.Counter(r.Cl.Counters(), "conns_dialed") != 0 || relaytest.Counter(r.Srv.Counters(), "conns_accepted") != 0 {
		t.Fatal("the UDP transport opened a TCP connection")
	}
}

// TestTransportFallback: UDP goes unanswered, so the first retransmission
// after the threshold goes over TCP, and the flow stays there.
func TestTransportFallback(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{
		Client:    client.Config{Transport: fallback.ModeFallback, FallbackThreshold: time.Second},
		UDPTarget: blackHole(t),
	})
	init := relaytest.IKE(0x11, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	start := time.Now()
	r.Site.Write(init)
	relaytest.ExpectNothing(t, r.Backend, "IKE_SA_INIT over UDP into the black hole")
	if s := flowStatus(t, r.Cl); s.Transport != "UDP" {
		t.Fatalf("before the threshold: %+v", s)
	}
	time.Sleep(time.Until(start.Add(time.Second + 50*time.Millisecond)))
	r.Site.Write(init) // the daemon's retransmission
	got, from := relaytest.Recv(t, r.Backend)
	if !bytes.Equal(got, init) {
		t.Fatal("retransmission changed on the TCP path")
	}
	if relaytest.Counter(r.Srv.Counters(), "conns_accepted") != 1 {
		t.Fatal("the retransmission did not come over TCP")
	}
	r.Backend.WriteToUDPAddrPort(relaytest.IKE(0x11, 0x21, framing.IKESAInit, framing.FlagResponse, 180), from)
	relaytest.Recv(t, r.Site)
	s := flowStatus(t, r.Cl)
	if s.Transport != "TCP" || !strings.Contains(s.TransportReason, "answered on tcp") {
		t.Fatalf("after the answer: %+v", s)
	}
	// Settled: even ESP long after goes over TCP.
	r.Site.Write(relaytest.ESP(0xc2, 1, 500))
	relaytest.Recv(t, r.Backend)
	relaytest.Eventually(t, "the server to count 2 datagrams over TCP", func() bool { return relaytest.Counter(r.Srv.Counters(), "packets_in") == 2 })
}

// TestTransportRace: with Race, the first retransmission goes both ways
// and TCP, the only one that answers, wins at once.
func TestTransportRace(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{
		Client:    client.Config{Transport: fallback.ModeFallback, FallbackThreshold: 15 * time.Second, Race: true},
		UDPTarget: blackHole(t),
	})
	init := relaytest.IKE(0x12, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	start := time.Now()
	r.Site.Write(init)
	relaytest.ExpectNothing(t, r.Backend, "IKE_SA_INIT over UDP into the black hole")
	r.Site.Write(init) // the first retransmission
	_, from := relaytest.Recv(t, r.Backend)
	r.Backend.WriteToUDPAddrPort(relaytest.IKE(0x12, 0x22, framing.IKESAInit, framing.FlagResponse, 180), from)
	relaytest.Recv(t, r.Site)
	took := time.Since(start)
	s := flowStatus(t, r.Cl)
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
	r := relaytest.NewRig(t, relaytest.RigOptions{
		Client:    client.Config{Transport: fallback.ModeFallback, FallbackThreshold: time.Second, Race: true},
		UDPTarget: toBackend,
	})
	init := relaytest.IKE(0x13, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	r.Site.Write(init)
	_, from := relaytest.Recv(t, r.Backend)
	r.Backend.WriteToUDPAddrPort(relaytest.IKE(0x13, 0x23, framing.IKESAInit, framing.FlagResponse, 180), from)
	relaytest.Recv(t, r.Site)
	time.Sleep(1100 * time.Millisecond) // past the threshold
	r.Site.Write(relaytest.IKE(0x13, 0x23, framing.IKEAuth, framing.FlagInitiator, 300))
	if _, from2 := relaytest.Recv(t, r.Backend); from2 != from {
		t.Fatalf("IKE_AUTH came from %v, not the UDP path %v", from2, from)
	}
	if s := flowStatus(t, r.Cl); s.Transport != "UDP" || relaytest.Counter(r.Cl.Counters(), "conns_dialed") != 0 {
		t.Fatalf("flow %+v, %d connections", s, relaytest.Counter(r.Cl.Counters(), "conns_dialed"))
	}
}

// fakeTUN is a client.Device in memory: the test plays the daemon's kernel,
// putting the daemon's packets on in and reading the client's writes from
// out.
type fakeTUN struct {
	in     chan []byte
	out    chan []byte
	closed chan struct{}
	once   sync.Once
}

func newFakeTUN() *fakeTUN {
	return &fakeTUN{in: make(chan []byte, 64), out: make(chan []byte, 64), closed: make(chan struct{})}
}

func (d *fakeTUN) BatchSize() int { return 8 }

func (d *fakeTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	select {
	case p := <-d.in:
		sizes[0] = copy(bufs[0][offset:], p)
	case <-d.closed:
		return 0, net.ErrClosed
	}
	n := 1
	for ; n < len(bufs); n++ {
		select {
		case p := <-d.in:
			sizes[n] = copy(bufs[n][offset:], p)
		default:
			return n, nil
		}
	}
	return n, nil
}

func (d *fakeTUN) Write(bufs [][]byte, offset int) (int, error) {
	for i, b := range bufs {
		select {
		case d.out <- bytes.Clone(b[offset:]):
		case <-d.closed:
			return i, net.ErrClosed
		}
	}
	return len(bufs), nil
}

func (d *fakeTUN) Close() error {
	d.once.Do(func() { close(d.closed) })
	return nil
}

// send puts a UDP packet from the daemon into the device.
func (d *fakeTUN) send(t testing.TB, src, dst netip.AddrPort, payload []byte) {
	t.Helper()
	buf := make([]byte, packet.MaxHeader+len(payload))
	copy(buf[packet.MaxHeader:], payload)
	start, err := packet.PutUDP(buf, packet.MaxHeader, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	d.in <- buf[start:]
}

// sendESP puts a raw ESP packet (IP protocol 50) from the daemon in.
func (d *fakeTUN) sendESP(t testing.TB, src, dst netip.Addr, esp []byte) {
	t.Helper()
	buf := make([]byte, packet.MaxHeader+len(esp))
	copy(buf[packet.MaxHeader:], esp)
	start, err := packet.PutESP(buf, packet.MaxHeader, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	d.in <- buf[start:]
}

// reply reads the next packet the client wrote into the device.
func (d *fakeTUN) reply(t testing.TB) (packet.Info, []byte) {
	t.Helper()
	select {
	case p := <-d.out:
		var info packet.Info
		if err := packet.Parse(p, &info); err != nil {
			t.Fatalf("client wrote an unparsable packet: %v", err)
		}
		return info, p[info.PayloadOffset : info.PayloadOffset+info.PayloadLen]
	case <-time.After(2 * time.Second):
		t.Fatal("no packet written into the device")
		return packet.Info{}, nil
	}
}

func TestTransparentMode(t *testing.T) {
	for _, tc := range []struct{ name, daemon, peer, backendIP string }{
		{"IPv4", "100.64.0.2", "203.0.113.2", "127.0.0.1"},
		{"IPv6", "2001:db8:1::2", "2001:db8:2::1", "::1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			daemon, peer := netip.MustParseAddr(tc.daemon), netip.MustParseAddr(tc.peer)
			r := relaytest.NewRig(t, relaytest.RigOptions{IP: tc.backendIP, NoCl: true})
			var dialed []string
			var mu sync.Mutex
			dialer := streamlink.NewDialer(streamlink.Config{})
			dialer.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
				mu.Lock()
				dialed = append(dialed, addr)
				mu.Unlock()
				return r.DialServer(ctx, network, addr) // the peer's server, here on loopback
			}
			dev := newFakeTUN()
			cl := relaytest.ServeTUN(t, r, client.Config{
				Peers: []netip.Addr{peer}, TCPPort: 4500,
				Dialer: dialer,
			}, dev)

			// IKE_SA_INIT from port 500: no marker on the wire, so the
			// client adds it.
			init := relaytest.IKE(0x9999, 0, framing.IKESAInit, framing.FlagInitiator, 200)
			dev.send(t, netip.AddrPortFrom(daemon, 500), netip.AddrPortFrom(peer, 500), init[framing.MarkerSize:])
			got, from := relaytest.Recv(t, r.Backend)
			if !bytes.Equal(got, init) {
				t.Fatalf("backend got %d bytes, want the IKE_SA_INIT behind the marker (%d)", len(got), len(init))
			}
			// The reply reaches port 500 from the peer's 500, without the marker.
			resp := relaytest.IKE(0x9999, 0x77, framing.IKESAInit, framing.FlagResponse, 180)
			r.Backend.WriteToUDPAddrPort(resp, from)
			info, payload := dev.reply(t)
			if info.Src != peer || info.SrcPort != 500 || info.Dst != daemon || info.DstPort != 500 || info.Proto != packet.ProtoUDP {
				t.Fatalf("reply %v:%d -> %v:%d proto %d", info.Src, info.SrcPort, info.Dst, info.DstPort, info.Proto)
			}
			if !bytes.Equal(payload, resp[framing.MarkerSize:]) {
				t.Fatal("reply to port 500 is not the IKE message without the marker")
			}

			// The daemon floats to 4500: same flow, same connection.
			auth := relaytest.IKE(0x9999, 0x77, framing.IKEAuth, framing.FlagInitiator, 300)
			dev.send(t, netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(peer, 4500), auth)
			if got, from2 := relaytest.Recv(t, r.Backend); !bytes.Equal(got, auth) || from2 != from {
				t.Fatalf("IKE_AUTH after the float: equal=%v, backend socket %v (was %v)", bytes.Equal(got, auth), from2, from)
			}
			authResp := relaytest.IKE(0x9999, 0x77, framing.IKEAuth, framing.FlagResponse, 260)
			r.Backend.WriteToUDPAddrPort(authResp, from)
			info, payload = dev.reply(t)
			if info.SrcPort != 4500 || info.DstPort != 4500 || !bytes.Equal(payload, authResp) {
				t.Fatalf("reply after the float: ports %d -> %d, marker kept: %v", info.SrcPort, info.DstPort, bytes.Equal(payload, authResp))
			}

			// ESP in UDP both ways; keepalives stay home.
			esp := relaytest.ESP(0xc5, 1, 1400)
			dev.send(t, netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(peer, 4500), esp)
			if got, _ := relaytest.Recv(t, r.Backend); !bytes.Equal(got, esp) {
				t.Fatal("ESP in UDP from the daemon changed on the way")
			}
			dev.send(t, netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(peer, 4500), []byte{0xff})
			relaytest.ExpectNothing(t, r.Backend, "daemon's keepalive")
			espBack := relaytest.ESP(0xd5, 1, 1400)
			r.Backend.WriteToUDPAddrPort(espBack, from)
			info, payload = dev.reply(t)
			if info.Proto != packet.ProtoUDP || info.SrcPort != 4500 || info.DstPort != 4500 || !bytes.Equal(payload, espBack) {
				t.Fatalf("ESP reply: proto %d ports %d -> %d", info.Proto, info.SrcPort, info.DstPort)
			}

			// Raw ESP (no UDP encapsulation) is carried too, and answered raw.
			raw := relaytest.ESP(0xc5, 2, 500)
			dev.sendESP(t, daemon, peer, raw)
			if got, _ := relaytest.Recv(t, r.Backend); !bytes.Equal(got, raw) {
				t.Fatal("raw ESP from the daemon changed on the way")
			}
			rawBack := relaytest.ESP(0xd5, 2, 500)
			r.Backend.WriteToUDPAddrPort(rawBack, from)
			info, payload = dev.reply(t)
			if info.Proto != packet.ProtoESP || info.Src != peer || info.Dst != daemon || !bytes.Equal(payload, rawBack) {
				t.Fatalf("raw ESP reply: proto %d %v -> %v", info.Proto, info.Src, info.Dst)
			}

			// Traffic for an address that is not a --peer is dropped.
			other := netip.MustParseAddr(map[bool]string{true: "198.51.100.7", false: "2001:db8:3::7"}[daemon.Is4()])
			dev.send(t, netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(other, 4500), esp)
			relaytest.Eventually(t, "foreign_packets", func() bool { return relaytest.Counter(cl.Counters(), "foreign_packets") == 1 })

			mu.Lock()
			wantDial := net.JoinHostPort(peer.String(), "4500")
			if len(dialed) != 1 || dialed[0] != wantDial {
				t.Fatalf("dialed %v, want one connection to %s", dialed, wantDial)
			}
			mu.Unlock()
			st := cl.Status()
			if st.Mode != "transparent" || len(st.Sessions) != 1 {
				t.Fatalf("status: mode %q, %d flows", st.Mode, len(st.Sessions))
			}
			if want := "IKE 4500->4500, ESP raw (IP protocol 50)"; st.Sessions[0].Intercepted != want {
				t.Fatalf("intercepted %q, want %q", st.Sessions[0].Intercepted, want)
			}
			var text strings.Builder
			st.WriteText(&text, time.Now())
			if !strings.Contains(text.String(), "(transparent mode)") || !strings.Contains(text.String(), "intercepted: IKE 4500->4500") {
				t.Fatalf("status text:\n%s", text.String())
			}
		})
	}
}

// TestTransparentModeDropsOversizedPackets checks that a packet longer than
// the client's buffers, which the device cuts, is counted and dropped
// rather than relayed in part, and that traffic after it flows.
func TestTransparentModeDropsOversizedPackets(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	daemon, peer := netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("203.0.113.2")
	dev := newFakeTUN()
	cl := relaytest.ServeTUN(t, r, client.Config{Peers: []netip.Addr{peer}, MaxDatagram: 1500}, dev)

	src, dst := netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(peer, 4500)
	dev.send(t, src, dst, relaytest.ESP(0xc1, 1, 3000))
	relaytest.Eventually(t, "oversized_datagrams", func() bool { return relaytest.Counter(cl.Counters(), "oversized_datagrams") == 1 })
	ike := relaytest.IKE(0x42, 0, framing.IKESAInit, framing.FlagInitiator, 100)
	dev.send(t, src, dst, ike)
	if got, _ := relaytest.Recv(t, r.Backend); !bytes.Equal(got, ike) {
		t.Fatalf("backend got %d bytes after the oversized packet, want the IKE message", len(got))
	}
	if relaytest.Counter(cl.Counters(), "malformed") != 0 {
		t.Fatal("the oversized packet was counted as malformed")
	}
}

// TestTransparentModeDropsGarbage checks that intercepted datagrams that
// are not IKE, ESP or keepalives (a stray program writing to the peer's
// port 500 or 4500) are counted and dropped at the client, and never
// start a flow or a connection.
func TestTransparentModeDropsGarbage(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	src, peer := netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("203.0.113.2")
	dev := newFakeTUN()
	cl := relaytest.ServeTUN(t, r, client.Config{Peers: []netip.Addr{peer}}, dev)
	for _, port := range []uint16{500, 4500} {
		dev.send(t, netip.AddrPortFrom(src, 40000), netip.AddrPortFrom(peer, port), make([]byte, 64)) // zeros: marker, no IKEv2 header
	}
	dev.send(t, netip.AddrPortFrom(src, 40000), netip.AddrPortFrom(peer, 4500), []byte{1, 2, 3}) // too short for ESP
	relaytest.Eventually(t, "malformed", func() bool { return relaytest.Counter(cl.Counters(), "malformed") == 3 })
	if n := len(cl.Status().Sessions); n != 0 {
		t.Fatalf("garbage started %d flows", n)
	}
	relaytest.ExpectNothing(t, r.Backend, "garbage")
	if relaytest.Counter(cl.Counters(), "conns_dialed") != 0 {
		t.Fatal("garbage opened a connection")
	}
}

// TestExplicitModeRefusesPort500: a daemon on port 500 sends IKE without
// the non-ESP marker, which explicit mode would relay as ESP: it is
// refused and counted, and starts no flow.
func TestExplicitModeRefusesPort500(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	daemon, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 500})
	if err != nil {
		nattest.SkipOrFail(t, []string{"the right to bind UDP port 500 (" + err.Error() + ")"}, "to play a daemon on port 500")
	}
	defer daemon.Close()
	ike := relaytest.IKE(0x500, 0, framing.IKESAInit, framing.FlagInitiator, 100)[framing.MarkerSize:]
	if _, err := daemon.WriteToUDP(ike, r.Site.RemoteAddr().(*net.UDPAddr)); err != nil {
		t.Fatal(err)
	}
	relaytest.Eventually(t, "port500_refused", func() bool { return relaytest.Counter(r.Cl.Counters(), "port500_refused") == 1 })
	relaytest.ExpectNothing(t, r.Backend, "IKE from port 500")
	if n := len(r.Cl.Status().Sessions); n != 0 {
		t.Fatalf("port 500 started %d flows", n)
	}
}

// TestReceiveOffloadTrial: the daemon side starts with receive offload
// and turns it off once the daemon has sent a trial's worth of datagrams
// without a run; relaying goes on unharmed.
func TestReceiveOffloadTrial(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	r.Establish(0x4242, 0xc9, 0xd9)
	if !client.DaemonGRO(r.Cl) {
		t.Skip("no UDP_GRO here (Linux 5.0)")
	}
	const n = 5000
	for i := range n {
		if _, err := r.Site.Write(relaytest.ESP(0xc9, uint32(i+2), 200)); err != nil {
			t.Fatal(err)
		}
		if i%256 == 255 {
			for range 256 {
				relaytest.Recv(t, r.Backend)
			}
		}
	}
	for range n % 256 {
		relaytest.Recv(t, r.Backend)
	}
	if client.DaemonGRO(r.Cl) {
		t.Fatalf("receive offload still on after %d datagrams without a run", n)
	}
	esp := relaytest.ESP(0xc9, n+2, 1400)
	r.Site.Write(esp)
	if got, _ := relaytest.Recv(t, r.Backend); !bytes.Equal(got, esp) {
		t.Fatal("relaying after the offload went off: the datagram changed")
	}
}

// TestDrain: once the client drains, a new daemon address gets no flow,
// while the running flow still carries traffic both ways.
func TestDrain(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	from := r.Establish(0x7777, 0xc7, 0xd7)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r.Cl.Drain(ctx)
	other, err := net.DialUDP("udp", nil, r.Site.RemoteAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	other.Write(relaytest.Init(0x8888))
	relaytest.Eventually(t, "flows_rejected", func() bool { return relaytest.Counter(r.Cl.Counters(), "flows_rejected") == 1 })
	relaytest.ExpectNothing(t, r.Backend, "a new flow's IKE_SA_INIT while draining")
	esp := relaytest.ESP(0xc7, 2, 1400)
	r.Site.Write(esp)
	if got, from2 := relaytest.Recv(t, r.Backend); !bytes.Equal(got, esp) || from2 != from {
		t.Fatalf("the running flow while draining: %d bytes from %v", len(got), from2)
	}
	back := relaytest.ESP(0xd7, 2, 1400)
	r.Backend.WriteToUDPAddrPort(back, from)
	if got, _ := relaytest.Recv(t, r.Site); !bytes.Equal(got, back) {
		t.Fatal("the running flow's return traffic while draining")
	}
}
