package integration

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/relay"
)

// upTunnel builds the lab with a carrier that drops all UDP, starts the
// tunnel over iketcp and brings it up. It returns the site's IKE SA.
func upTunnel(t *testing.T, ctx context.Context, capture bool) (*lab.Tunnel, lab.IKESA, *lab.Capture) {
	t.Helper()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	var cp *lab.Capture
	if capture {
		var err error
		cp, err = l.Carrier.Capture(ctx, lab.CarrierHubIface, "tcp port 4500", filepath.Join(l.Dir, "carrier-hub.pcap"))
		if err != nil {
			t.Fatal(err)
		}
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sa, err := tun.Initiate(ctx)
	if err != nil {
		t.Fatalf("initiate: %v", err)
	}
	t.Logf("IKE SA %s established over iketcp in %v (site %s, hub sees it from %s)",
		sa.InitiatorSPI, time.Since(start).Round(time.Millisecond), sa.LocalHost, sa.RemoteHost)
	if sa.State != "ESTABLISHED" || !sa.HasInstalledChild() || !sa.Encap {
		t.Fatalf("site IKE SA: %+v", sa)
	}
	return tun, sa, cp
}

func hubSA(t *testing.T, ctx context.Context, tun *lab.Tunnel) lab.IKESA {
	t.Helper()
	sas, err := tun.Hub.ListSAs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(sas) != 1 {
		t.Fatalf("hub has %d IKE SAs, want 1: %+v", len(sas), sas)
	}
	return sas[0]
}

func serverSession(t *testing.T, ctx context.Context, tun *lab.Tunnel) relay.SessionStatus {
	t.Helper()
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Sessions) != 1 {
		t.Fatalf("server has %d sessions, want 1: %+v", len(st.Sessions), st.Sessions)
	}
	return st.Sessions[0]
}

func hasIKESA(s relay.SessionStatus, ispi string) bool {
	for _, sa := range s.IKESAs {
		if sa.InitiatorSPI == ispi {
			return true
		}
	}
	return false
}

// TestTunnelOverTCP is the spine: a real strongSwan tunnel through a
// carrier that masquerades and drops every UDP packet.
func TestTunnelOverTCP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tun, sa, capture := upTunnel(t, ctx, true)
	l := tun.Lab

	// The carrier really drops UDP: the hub's IKE ports are unreachable
	// over it, so only the TCP path can have carried the tunnel.
	dropped, err := l.UDPDropped(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, port := range []string{"500", "4500"} {
		c, err := l.Site.Dial(ctx, "udp", net.JoinHostPort(lab.HubOuter, port))
		if err != nil {
			t.Fatal(err)
		}
		c.Write(make([]byte, 64))
		c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		now, err := l.UDPDropped(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if now >= dropped+2 {
			t.Logf("carrier UDP drop counter: %d -> %d", dropped, now)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("carrier UDP drop counter stayed at %d after 2 UDP probes", now)
		}
		time.Sleep(50 * time.Millisecond)
	}

	hub := hubSA(t, ctx, tun)
	if hub.State != "ESTABLISHED" || !hub.HasInstalledChild() || hub.InitiatorSPI != sa.InitiatorSPI {
		t.Fatalf("hub IKE SA: %+v", hub)
	}

	got, err := tun.PingThrough(ctx, 5, 200*time.Millisecond)
	if err != nil || got != 5 {
		t.Fatalf("ping %s -> %s through the tunnel: %d of 5 replies (%v)", lab.SiteInner, lab.HubInner, got, err)
	}
	sas, err := tun.Site.ListSAs(ctx)
	if err != nil || len(sas) != 1 || len(sas[0].Children) != 1 {
		t.Fatalf("site SAs after ping: %+v %v", sas, err)
	}
	if child := sas[0].Children[0]; child.PacketsOut < 5 || child.PacketsIn < 5 {
		t.Fatalf("child SA counters after 5 pings: in %d out %d", child.PacketsIn, child.PacketsOut)
	}

	// The stream on the carrier is RFC 9329: it begins with the prefix.
	if err := capture.Stop(); err != nil {
		t.Fatal(err)
	}
	first, err := lab.FirstTCPPayload(capture.Path, lab.ServerPort, len(framing.Prefix))
	if err != nil {
		t.Fatal(err)
	}
	if string(first) != framing.Prefix {
		t.Fatalf("TCP stream begins with %q, want %q", first, framing.Prefix)
	}
	if tcp, err := l.TCPForwarded(ctx); err != nil || tcp == 0 {
		t.Fatalf("carrier forwarded %d TCP packets (%v)", tcp, err)
	}

	// iketcp status shows the session with the IKE SA's SPIs.
	s := serverSession(t, ctx, tun)
	if s.State != "up" || s.Transport != "TCP" || !hasIKESA(s, sa.InitiatorSPI) || s.PacketsIn < 5 || s.PacketsOut < 5 {
		t.Fatalf("server session: %+v", s)
	}
	if !strings.HasPrefix(s.Peer, lab.CarrierHub+":") {
		t.Fatalf("server sees the client at %s, want the carrier's address %s", s.Peer, lab.CarrierHub)
	}
	cst, err := tun.ClientStatus(ctx)
	if err != nil || len(cst.Sessions) != 1 || cst.Sessions[0].State != "up" || !hasIKESA(cst.Sessions[0], sa.InitiatorSPI) {
		t.Fatalf("client status: %+v %v", cst, err)
	}
	text, err := tun.StatusText(ctx, l.Hub, tun.ServerControl)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("iketcp status on the hub:\n%s", text)
	for _, want := range []string{"transport: TCP", "IKE SA: spi " + sa.InitiatorSPI} {
		if !strings.Contains(text, want) {
			t.Errorf("iketcp status lacks %q", want)
		}
	}
}

// TestReconnectKeepsIKESA cuts the TCP connection mid-traffic, first with
// ss -K and then by restarting iketcp client, and checks that traffic
// resumes within seconds on the same IKE SA, with MOBIKE left on.
func TestReconnectKeepsIKESA(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tun, sa, _ := upTunnel(t, ctx, false)
	l := tun.Lab
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("ping before the cut: %d of 3 (%v)", got, err)
	}
	const initLine = "generating IKE_SA_INIT request"
	inits := tun.Site.CountInLog(initLine)
	before := serverSession(t, ctx, tun)

	cuts := []struct {
		name string
		cut  func() error
	}{
		{"ss -K", func() error {
			out, err := l.Site.Run(ctx, "ss", "-K", "dst", lab.HubOuter, "dport", "=", fmt.Sprint(lab.ServerPort))
			t.Logf("ss -K: %s", strings.TrimSpace(string(out)))
			return err
		}},
		{"client restart", func() error {
			if err := tun.StopClient(); err != nil {
				return err
			}
			return tun.StartClient(ctx)
		}},
	}
	for i, c := range cuts {
		t.Run(c.name, func(t *testing.T) {
			// Traffic in flight while the connection goes.
			busy := make(chan int, 1)
			go func() {
				n, _ := tun.PingThrough(ctx, 10, 50*time.Millisecond)
				busy <- n
			}()
			time.Sleep(150 * time.Millisecond)
			cutAt := time.Now()
			if err := c.cut(); err != nil {
				t.Fatal(err)
			}
			<-busy
			var resumed time.Duration
			for attempt := 0; ; attempt++ {
				if got, _ := l.Ping(ctx, l.Site, lab.SiteInner, lab.HubInner, 1, 0); got == 1 {
					resumed = time.Since(cutAt)
					break
				}
				if attempt == 20 {
					t.Fatalf("no ping through the tunnel for %v after the cut", time.Since(cutAt).Round(time.Millisecond))
				}
			}
			t.Logf("traffic resumed %v after %s", resumed.Round(time.Millisecond), c.name)
			if resumed > 10*time.Second {
				t.Fatalf("traffic took %v to resume", resumed)
			}

			now, err := tun.Site.ListSAs(ctx)
			if err != nil || len(now) != 1 {
				t.Fatalf("site SAs: %+v %v", now, err)
			}
			if now[0].UniqueID != sa.UniqueID || now[0].InitiatorSPI != sa.InitiatorSPI || now[0].ResponderSPI != sa.ResponderSPI {
				t.Fatalf("IKE SA changed: was %s %s/%s, now %s %s/%s", sa.UniqueID, sa.InitiatorSPI, sa.ResponderSPI,
					now[0].UniqueID, now[0].InitiatorSPI, now[0].ResponderSPI)
			}
			if n := tun.Site.CountInLog(initLine); n != inits {
				t.Fatalf("site sent %d new IKE_SA_INIT requests", n-inits)
			}
			if hub := hubSA(t, ctx, tun); hub.InitiatorSPI != sa.InitiatorSPI {
				t.Fatalf("hub IKE SA changed: %+v", hub)
			}
			s := serverSession(t, ctx, tun)
			if s.ID != before.ID || s.Local != before.Local {
				t.Fatalf("server session moved: was %d from %s, now %d from %s", before.ID, before.Local, s.ID, s.Local)
			}
			if want := uint64(i + 2); s.Connections != want || s.State != "up" {
				t.Fatalf("server session: %d connections (want %d), state %s", s.Connections, want, s.State)
			}
		})
	}
}
