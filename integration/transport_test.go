package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/relay"
)

// startTransport builds the lab, with the carrier dropping UDP or not,
// and starts the tunnel's pieces with the client's transport arguments.
// The UDP path goes straight to the hub's charon on 203.0.113.2:4500; the
// TCP path to iketcp server on the same address.
func startTransport(t *testing.T, ctx context.Context, blockUDP, transparent bool, clientArgs ...string) *lab.Tunnel {
	t.Helper()
	l := lab.NewForTest(t, lab.Options{})
	if blockUDP {
		if err := l.BlockUDP(ctx); err != nil {
			t.Fatal(err)
		}
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary, Transparent: transparent, ClientArgs: clientArgs})
	if err != nil {
		t.Fatal(err)
	}
	return tun
}

// initiateTimed brings the tunnel up and returns how long it took from
// swanctl --initiate to ESTABLISHED.
func initiateTimed(t *testing.T, ctx context.Context, tun *lab.Tunnel) (lab.IKESA, time.Duration) {
	t.Helper()
	start := time.Now()
	sa, err := tun.Initiate(ctx)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("initiate (after %v): %v", took.Round(time.Millisecond), err)
	}
	if sa.State != "ESTABLISHED" || !sa.HasInstalledChild() {
		t.Fatalf("site IKE SA: %+v", sa)
	}
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("ping through the tunnel: %d of 3 (%v)", got, err)
	}
	return sa, took
}

// TestTransportAutoStaysOnUDP: where the carrier lets UDP through, auto
// brings the tunnel up over UDP and never opens a TCP connection, in
// explicit mode and in transparent mode. In transparent mode the client's
// own UDP socket sends to the very peer and port the TUN intercepts: its
// bypass mark is what keeps it from looping into the TUN.
func TestTransportAutoStaysOnUDP(t *testing.T) {
	for _, transparent := range []bool{false, true} {
		name := map[bool]string{false: "explicit", true: "transparent"}[transparent]
		t.Run(name, func(t *testing.T) { testAutoStaysOnUDP(t, transparent) })
	}
}

func testAutoStaysOnUDP(t *testing.T, transparent bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tun := startTransport(t, ctx, false, transparent, "--transport", "auto", "--fallback-threshold", "3s", "--race")
	_, took := initiateTimed(t, ctx, tun)
	t.Logf("initiate to ESTABLISHED over UDP: %v", took.Round(time.Millisecond))

	// The hub's charon sees the site through the carrier's NAT, not
	// through iketcp server.
	if hub := hubSA(t, ctx, tun); !strings.HasPrefix(hub.RemoteHost, lab.CarrierHub+":") {
		t.Fatalf("hub sees its peer at %s, want the carrier %s", hub.RemoteHost, lab.CarrierHub)
	}
	srv, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := counterValue(t, srv.Counters, "conns_accepted"); n != 0 {
		t.Fatalf("iketcp server accepted %d connections", n)
	}
	cl, err := tun.ClientStatus(ctx)
	if err != nil || len(cl.Sessions) != 1 {
		t.Fatalf("client status: %+v %v", cl, err)
	}
	if s := cl.Sessions[0]; s.Transport != "UDP" || s.TransportReason != "answered on udp" || counterValue(t, cl.Counters, "conns_dialed") != 0 {
		t.Fatalf("client flow: transport %s (%s), %d connections dialed", s.Transport, s.TransportReason, counterValue(t, cl.Counters, "conns_dialed"))
	}
	if n, err := tun.Lab.TCPForwarded(ctx); err != nil || n != 0 {
		t.Fatalf("carrier forwarded %d TCP packets (%v)", n, err)
	}
}

// TestTransportAutoFallsBack: the carrier drops UDP, the threshold is 3 s:
// the daemon's first retransmission after 3 s goes over TCP, and the
// tunnel is up in under threshold + 3 s.
func TestTransportAutoFallsBack(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const threshold = 3 * time.Second
	tun := startTransport(t, ctx, true, false, "--transport", "auto", "--fallback-threshold", threshold.String())
	_, took := initiateTimed(t, ctx, tun)
	t.Logf("initiate to ESTABLISHED, UDP blocked, threshold %v: %v", threshold, took.Round(time.Millisecond))
	if took >= threshold+3*time.Second {
		t.Fatalf("took %v, want under %v", took, threshold+3*time.Second)
	}
	if took < threshold {
		t.Fatalf("took %v, less than the threshold: it cannot have tried UDP first", took)
	}
	assertOnTCP(t, ctx, tun, "no answer to IKE_SA_INIT in 3s")
	if dropped, err := tun.Lab.UDPDropped(ctx); err != nil || dropped == 0 {
		t.Fatalf("carrier dropped %d UDP packets (%v): UDP was not tried", dropped, err)
	}
}

// TestTransportAutoRace: the same blocking, with --race: TCP starts beside
// UDP after the first unanswered retransmission, and the tunnel is up in
// under 3 s although the threshold is FortiOS's default 15 s.
func TestTransportAutoRace(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tun := startTransport(t, ctx, true, false, "--transport", "auto", "--race")
	_, took := initiateTimed(t, ctx, tun)
	t.Logf("initiate to ESTABLISHED, UDP blocked, --race, threshold 15s: %v", took.Round(time.Millisecond))
	if took >= 3*time.Second {
		t.Fatalf("took %v, want under 3s", took)
	}
	assertOnTCP(t, ctx, tun, "racing TCP against UDP")
}

// assertOnTCP checks the flow settled on TCP, that the client logged the
// switch from UDP with the given reason, and that the hub sees its peer
// through iketcp server.
func assertOnTCP(t *testing.T, ctx context.Context, tun *lab.Tunnel, logged string) {
	t.Helper()
	cl, err := tun.ClientStatus(ctx)
	if err != nil || len(cl.Sessions) != 1 {
		t.Fatalf("client status: %+v %v", cl, err)
	}
	if s := cl.Sessions[0]; s.Transport != "TCP" || s.State != "up" {
		t.Fatalf("client flow: transport %s (%s), state %s", s.Transport, s.TransportReason, s.State)
	}
	want := "transport udp->"
	var line string
	for _, l := range strings.Split(tun.Client.Log(), "\n") {
		if strings.Contains(l, want) && strings.Contains(l, logged) {
			line = l
		}
	}
	if line == "" {
		t.Fatalf("client log has no line with %q and %q:\n%s", want, logged, tun.Client.Log())
	}
	t.Logf("client logged: %s", line)
	if !strings.Contains(line, "for "+lab.HubOuter) {
		t.Fatalf("the transport decision does not name the peer %s: %s", lab.HubOuter, line)
	}
	if hub := hubSA(t, ctx, tun); !strings.HasPrefix(hub.RemoteHost, "127.0.0.1:") {
		t.Fatalf("hub sees its peer at %s, want iketcp server's socket on 127.0.0.1", hub.RemoteHost)
	}
}

// counterValue finds a counter of a status by name; a name that is not
// there fails the test rather than reading as zero.
func counterValue(t *testing.T, counters []relay.Counter, name string) uint64 {
	t.Helper()
	for _, c := range counters {
		if c.Name == name {
			return c.Value
		}
	}
	t.Fatalf("status has no counter %q", name)
	return 0
}
