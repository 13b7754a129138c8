package integration

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// TestTransparentTunnel runs the site's strongSwan unchanged (the hub's
// real address, default ports, MOBIKE on) behind `iketcp client --tun`,
// through a carrier that drops all UDP. It checks that the tunnel comes
// up and carries pings, that none of the daemon's UDP leaks to the
// carrier, that a crashed client's leftovers are cleaned at the next
// start, and that after iketcp exits the site's rules, routes and links
// are as they were before it started.
func TestTransparentTunnel(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	// Strict reverse-path filtering, as hardened hosts have it: the replies
	// iketcp writes into its TUN come from the peer's address.
	if out, err := l.Site.Run(ctx, "sysctl", "-w", "net.ipv4.conf.all.rp_filter=1"); err != nil {
		t.Fatalf("sysctl: %v %s", err, out)
	}
	var before string
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:      iketcpBinary,
		Transparent: true,
		BeforeClient: func(ctx context.Context) (err error) {
			before, err = lab.RoutingSnapshot(ctx, l.Site)
			return err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sa, err := tun.Initiate(ctx)
	if err != nil {
		t.Fatalf("initiate: %v", err)
	}
	t.Logf("IKE SA %s established through the TUN in %v: site %s -> %s", sa.InitiatorSPI,
		time.Since(start).Round(time.Millisecond), sa.LocalHost, sa.RemoteHost)
	if sa.State != "ESTABLISHED" || !sa.HasInstalledChild() || !sa.Encap {
		t.Fatalf("site IKE SA: %+v", sa)
	}
	// The daemon believes it talks to the hub's real address; it started on
	// 500 and floated to 4500 after detecting NAT, all through the TUN.
	if sa.RemoteHost != lab.HubOuter+":4500" || !strings.HasPrefix(sa.LocalHost, lab.SiteOuter+":") {
		t.Fatalf("site sees %s -> %s, want %s:* -> %s:4500", sa.LocalHost, sa.RemoteHost, lab.SiteOuter, lab.HubOuter)
	}
	if n := tun.Site.CountInLog("sending packet: from " + lab.SiteOuter + "[500] to " + lab.HubOuter + "[500]"); n == 0 {
		t.Fatal("the site's charon never sent from port 500: the test does not exercise the port-500 path")
	}
	if got, err := tun.PingThrough(ctx, 5, 200*time.Millisecond); err != nil || got != 5 {
		t.Fatalf("ping through the tunnel: %d of 5 (%v)", got, err)
	}

	// None of the daemon's UDP reached the carrier: it was all intercepted.
	if dropped, err := l.UDPDropped(ctx); err != nil || dropped != 0 {
		t.Fatalf("carrier dropped %d UDP packets before any probe (%v): the daemon's traffic leaked past the TUN", dropped, err)
	}
	// And the carrier does drop UDP: a probe from another socket is lost.
	if c, err := l.Site.Dial(ctx, "udp", net.JoinHostPort(lab.HubOuter, "5000")); err == nil {
		c.Write(make([]byte, 32))
		c.Close()
	}
	waitFor(t, "the carrier to drop the probe", func() bool {
		n, err := l.UDPDropped(ctx)
		return err == nil && n == 1
	})

	cst, err := tun.ClientStatus(ctx)
	if err != nil || cst.Mode != "transparent" || len(cst.Sessions) != 1 {
		t.Fatalf("client status: %+v %v", cst, err)
	}
	if got, want := cst.Sessions[0].Intercepted, "IKE 4500->4500, ESP in UDP 4500->4500"; got != want {
		t.Fatalf("intercepted %q, want %q", got, want)
	}
	if cst.Sessions[0].Local != lab.SiteOuter || !hasIKESA(cst.Sessions[0], sa.InitiatorSPI) {
		t.Fatalf("client flow: %+v", cst.Sessions[0])
	}
	if s := serverSession(t, ctx, tun); s.State != "up" || !hasIKESA(s, sa.InitiatorSPI) {
		t.Fatalf("server session: %+v", s)
	}

	// A crash leaves the rules and routes behind; the next start cleans
	// them and the SA carries on.
	if err := tun.KillClient(); err != nil {
		t.Fatal(err)
	}
	crashed, err := lab.RoutingSnapshot(ctx, l.Site)
	if err != nil {
		t.Fatal(err)
	}
	if crashed == before {
		t.Fatal("a SIGKILLed client left nothing behind: the stale-state case is not exercised")
	}
	if err := tun.StartClient(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "traffic after the restart", func() bool {
		n, _ := l.Ping(ctx, l.Site, lab.SiteInner, lab.HubInner, 1, 0)
		return n == 1
	})
	if now, err := tun.Site.ListSAs(ctx); err != nil || len(now) != 1 || now[0].InitiatorSPI != sa.InitiatorSPI {
		t.Fatalf("IKE SA after the restart: %+v %v", now, err)
	}

	// A clean exit restores everything. The daemon's own routes for the
	// child SA go when the SA does.
	if err := tun.Site.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := tun.StopClient(); err != nil {
		t.Fatal(err)
	}
	var after string
	deadline := time.Now().Add(5 * time.Second)
	for {
		if after, err = lab.RoutingSnapshot(ctx, l.Site); err != nil {
			t.Fatal(err)
		}
		if after == before || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if after != before {
		t.Fatalf("routing after iketcp exited differs from before it started:\n--- before\n%s\n--- after\n%s", before, after)
	}
	if log := tun.Client.Log(); !strings.Contains(log, "interception removed") {
		t.Fatalf("client did not report removing its interception:\n%s", log)
	}
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}
