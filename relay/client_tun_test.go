package relay

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/nat/packet"
)

// fakeTUN is a PacketDevice in memory: the test plays the daemon's kernel,
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

// serveTUN starts a transparent-mode client on dev for the test's life.
// Unless cfg has a Dial, the client dials the rig's server, whatever the
// peer's address.
func serveTUN(tb testing.TB, r *rig, cfg ClientConfig, dev PacketDevice) *Client {
	tb.Helper()
	cfg.Logger = testLogger(tb)
	if cfg.Dial == nil {
		cfg.Dial = func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, r.srvAddr)
		}
	}
	cl, err := NewClient(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cl.ServeTUN(ctx, dev, "tun-under-test") }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("ServeTUN: %v", err)
		}
	})
	return cl
}

func TestTransparentMode(t *testing.T) {
	for _, tc := range []struct{ name, daemon, peer, backendIP string }{
		{"IPv4", "100.64.0.2", "203.0.113.2", "127.0.0.1"},
		{"IPv6", "2001:db8:1::2", "2001:db8:2::1", "::1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			daemon, peer := netip.MustParseAddr(tc.daemon), netip.MustParseAddr(tc.peer)
			r := newRig(t, rigOptions{ip: tc.backendIP, noCl: true})
			var dialed []string
			var mu sync.Mutex
			dev := newFakeTUN()
			cl := serveTUN(t, r, ClientConfig{
				Peers: []netip.Addr{peer}, TCPPort: 4500,
				Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
					mu.Lock()
					dialed = append(dialed, addr)
					mu.Unlock()
					var d net.Dialer
					return d.DialContext(ctx, network, r.srvAddr) // the peer's server, here on loopback
				},
			}, dev)

			// IKE_SA_INIT from port 500: no marker on the wire, so the
			// client adds it.
			init := ikeDatagram(0x9999, 0, framing.IKESAInit, framing.FlagInitiator, 200)
			dev.send(t, netip.AddrPortFrom(daemon, 500), netip.AddrPortFrom(peer, 500), init[framing.MarkerSize:])
			got, from := recv(t, r.backend)
			if !bytes.Equal(got, init) {
				t.Fatalf("backend got %d bytes, want the IKE_SA_INIT behind the marker (%d)", len(got), len(init))
			}
			// The reply reaches port 500 from the peer's 500, without the marker.
			resp := ikeDatagram(0x9999, 0x77, framing.IKESAInit, framing.FlagResponse, 180)
			r.backend.WriteToUDPAddrPort(resp, from)
			info, payload := dev.reply(t)
			if info.Src != peer || info.SrcPort != 500 || info.Dst != daemon || info.DstPort != 500 || info.Proto != packet.ProtoUDP {
				t.Fatalf("reply %v:%d -> %v:%d proto %d", info.Src, info.SrcPort, info.Dst, info.DstPort, info.Proto)
			}
			if !bytes.Equal(payload, resp[framing.MarkerSize:]) {
				t.Fatal("reply to port 500 is not the IKE message without the marker")
			}

			// The daemon floats to 4500: same flow, same connection.
			auth := ikeDatagram(0x9999, 0x77, framing.IKEAuth, framing.FlagInitiator, 300)
			dev.send(t, netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(peer, 4500), auth)
			if got, from2 := recv(t, r.backend); !bytes.Equal(got, auth) || from2 != from {
				t.Fatalf("IKE_AUTH after the float: equal=%v, backend socket %v (was %v)", bytes.Equal(got, auth), from2, from)
			}
			authResp := ikeDatagram(0x9999, 0x77, framing.IKEAuth, framing.FlagResponse, 260)
			r.backend.WriteToUDPAddrPort(authResp, from)
			info, payload = dev.reply(t)
			if info.SrcPort != 4500 || info.DstPort != 4500 || !bytes.Equal(payload, authResp) {
				t.Fatalf("reply after the float: ports %d -> %d, marker kept: %v", info.SrcPort, info.DstPort, bytes.Equal(payload, authResp))
			}

			// ESP in UDP both ways; keepalives stay home.
			esp := espDatagram(0xc5, 1, 1400)
			dev.send(t, netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(peer, 4500), esp)
			if got, _ := recv(t, r.backend); !bytes.Equal(got, esp) {
				t.Fatal("ESP in UDP from the daemon changed on the way")
			}
			dev.send(t, netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(peer, 4500), []byte{0xff})
			expectNothing(t, r.backend, "daemon's keepalive")
			espBack := espDatagram(0xd5, 1, 1400)
			r.backend.WriteToUDPAddrPort(espBack, from)
			info, payload = dev.reply(t)
			if info.Proto != packet.ProtoUDP || info.SrcPort != 4500 || info.DstPort != 4500 || !bytes.Equal(payload, espBack) {
				t.Fatalf("ESP reply: proto %d ports %d -> %d", info.Proto, info.SrcPort, info.DstPort)
			}

			// Raw ESP (no UDP encapsulation) is carried too, and answered raw.
			raw := espDatagram(0xc5, 2, 500)
			dev.sendESP(t, daemon, peer, raw)
			if got, _ := recv(t, r.backend); !bytes.Equal(got, raw) {
				t.Fatal("raw ESP from the daemon changed on the way")
			}
			rawBack := espDatagram(0xd5, 2, 500)
			r.backend.WriteToUDPAddrPort(rawBack, from)
			info, payload = dev.reply(t)
			if info.Proto != packet.ProtoESP || info.Src != peer || info.Dst != daemon || !bytes.Equal(payload, rawBack) {
				t.Fatalf("raw ESP reply: proto %d %v -> %v", info.Proto, info.Src, info.Dst)
			}

			// Traffic for an address that is not a --peer is dropped.
			other := netip.MustParseAddr(map[bool]string{true: "198.51.100.7", false: "2001:db8:3::7"}[daemon.Is4()])
			dev.send(t, netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(other, 4500), esp)
			eventually(t, "foreign_packets", func() bool { return counter(cl.Counters(), "foreign_packets") == 1 })

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

func TestDaemonPortsDefaults(t *testing.T) {
	var p daemonPorts
	if got := p.load(); got != (portSet{ikeDaemon: 4500, ikePeer: 4500, espDaemon: 4500, espPeer: 4500}) {
		t.Fatalf("nothing seen: %+v", got)
	}
	p.note(framing.KindIKE, false, 500, 500)
	if got := p.load(); got.ikePeer != 500 || got.espPeer != 4500 || got.espDaemon != 4500 {
		t.Fatalf("IKE on 500: %+v", got)
	}
	p.note(framing.KindIKE, false, 4501, 4500) // a daemon whose NAT-T port is not 4500
	if got := p.load(); got.ikeDaemon != 4501 || got.espDaemon != 4501 || got.espPeer != 4500 {
		t.Fatalf("IKE on 4501->4500, no ESP yet: %+v", got)
	}
	p.note(framing.KindESP, false, 4502, 4500)
	if got := p.load(); got.espDaemon != 4502 || got.ikeDaemon != 4501 {
		t.Fatalf("ESP seen: %+v", got)
	}
	var q daemonPorts
	q.note(framing.KindESP, false, 4500, 4500) // flow first seen through ESP
	if got := q.load(); got.ikeDaemon != 4500 || got.ikePeer != 4500 {
		t.Fatalf("IKE ports after ESP only: %+v", got)
	}
}

// TestTransparentModeDropsOversizedPackets checks that a packet longer than
// the client's buffers, which the device cuts, is counted and dropped
// rather than relayed in part, and that traffic after it flows.
func TestTransparentModeDropsOversizedPackets(t *testing.T) {
	r := newRig(t, rigOptions{noCl: true})
	daemon, peer := netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("203.0.113.2")
	dev := newFakeTUN()
	cl := serveTUN(t, r, ClientConfig{Peers: []netip.Addr{peer}, MaxDatagram: 1500}, dev)

	src, dst := netip.AddrPortFrom(daemon, 4500), netip.AddrPortFrom(peer, 4500)
	dev.send(t, src, dst, espDatagram(0xc1, 1, 3000))
	eventually(t, "oversized_datagrams", func() bool { return counter(cl.Counters(), "oversized_datagrams") == 1 })
	ike := ikeDatagram(0x42, 0, framing.IKESAInit, framing.FlagInitiator, 100)
	dev.send(t, src, dst, ike)
	if got, _ := recv(t, r.backend); !bytes.Equal(got, ike) {
		t.Fatalf("backend got %d bytes after the oversized packet, want the IKE message", len(got))
	}
	if counter(cl.Counters(), "malformed") != 0 {
		t.Fatal("the oversized packet was counted as malformed")
	}
}

// TestTransparentModeDropsGarbage checks that intercepted datagrams that
// are not IKE, ESP or keepalives (a stray program writing to the peer's
// port 500 or 4500) are counted and dropped at the client, and never
// start a flow or a connection.
func TestTransparentModeDropsGarbage(t *testing.T) {
	r := newRig(t, rigOptions{noCl: true})
	src, peer := netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("203.0.113.2")
	dev := newFakeTUN()
	cl := serveTUN(t, r, ClientConfig{Peers: []netip.Addr{peer}}, dev)
	for _, port := range []uint16{500, 4500} {
		dev.send(t, netip.AddrPortFrom(src, 40000), netip.AddrPortFrom(peer, port), make([]byte, 64)) // zeros: marker, no IKEv2 header
	}
	dev.send(t, netip.AddrPortFrom(src, 40000), netip.AddrPortFrom(peer, 4500), []byte{1, 2, 3}) // too short for ESP
	eventually(t, "malformed", func() bool { return counter(cl.Counters(), "malformed") == 3 })
	if n := len(cl.Status().Sessions); n != 0 {
		t.Fatalf("garbage started %d flows", n)
	}
	expectNothing(t, r.backend, "garbage")
	if counter(cl.Counters(), "conns_dialed") != 0 {
		t.Fatal("garbage opened a connection")
	}
}
