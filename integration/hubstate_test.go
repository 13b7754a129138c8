package integration

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// redirectTable is the nftables table `iketcp server --ike-tcp-port`
// installs at the hub, as `nft list ruleset` names it.
const redirectTable = "table inet iketcp_redirect {"

// nftRuleset returns `nft list ruleset` in ns.
func nftRuleset(t *testing.T, ctx context.Context, ns *lab.Namespace) string {
	t.Helper()
	out, err := ns.Run(ctx, "nft", "list", "ruleset")
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// initiateAndPing brings the tunnel's connection up from the site and
// pings across it, failing the test unless every ping comes back.
func initiateAndPing(t *testing.T, ctx context.Context, tun *lab.Tunnel, pings int) lab.IKESA {
	t.Helper()
	start := time.Now()
	sa, err := tun.Initiate(ctx)
	if err != nil {
		t.Fatalf("initiate: %v", err)
	}
	if sa.State != "ESTABLISHED" || !sa.HasInstalledChild() {
		t.Fatalf("site IKE SA: %+v", sa)
	}
	took := time.Since(start)
	if got, err := tun.PingThrough(ctx, pings, 100*time.Millisecond); err != nil || got != pings {
		t.Fatalf("ping %s -> %s through the tunnel: %d of %d (%v)", lab.SiteInner, lab.HubInner, got, pings, err)
	}
	t.Logf("IKE SA %s/%s up in %v; %d of %d pings crossed", sa.InitiatorSPI, sa.ResponderSPI, took.Round(time.Millisecond), pings, pings)
	return sa
}

// TestIKETCPPort443 runs the server as FortiOS's ike-tcp-port 443 asks:
// it listens on 4500 and 11443 and redirects 443 to 11443 with an
// nftables table of its own. The client dials the hub's 443 through a
// carrier that drops UDP; the tunnel comes up and the connection lands on
// 11443. A SIGKILLed server leaves its table behind, the next start
// removes it and installs its own, and a new IKE SA comes up through it;
// a plain exit removes the table.
func TestIKETCPPort443(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	if rs := nftRuleset(t, ctx, l.Hub); strings.Contains(rs, "iketcp_redirect") {
		t.Fatalf("the hub has a redirect table before the server started:\n%s", rs)
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:       iketcpBinary,
		ServerListen: []string{}, // --ike-tcp-port says where
		ServerArgs:   []string{"--ike-tcp-port", "443"},
		Peer:         net.JoinHostPort(lab.HubOuter, "443"),
	})
	if err != nil {
		t.Fatal(err)
	}
	sa := initiateAndPing(t, ctx, tun, 5)

	// The table is in, and the connection the site made to 443 is the one
	// the server accepted on 11443.
	rs := nftRuleset(t, ctx, l.Hub)
	if strings.Count(rs, redirectTable) != 1 || !strings.Contains(rs, "443") || !strings.Contains(rs, "11443") {
		t.Fatalf("nft list ruleset at the hub while the server runs:\n%s", rs)
	}
	t.Logf("the hub's redirect table while the server runs:\n%s", tableText(rs, redirectTable))
	site, err := l.Site.EstablishedTCP(ctx, 443)
	if err != nil {
		t.Fatal(err)
	}
	hub, err := l.Hub.EstablishedTCP(ctx, 11443)
	if err != nil {
		t.Fatal(err)
	}
	if len(site) != 1 || site[0].Remote != netip.MustParseAddrPort(lab.HubOuter+":443") {
		t.Fatalf("site's connections to port 443: %v, want one to %s:443", site, lab.HubOuter)
	}
	if len(hub) != 1 || hub[0].Local != netip.MustParseAddrPort(lab.HubOuter+":11443") || hub[0].Remote.Addr() != netip.MustParseAddr(lab.CarrierHub) {
		t.Fatalf("hub's connections on 11443: %v, want one from %s to %s:11443", hub, lab.CarrierHub, lab.HubOuter)
	}
	t.Logf("site dialled %s; the hub accepted %s", site[0], hub[0])
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(st.Listen, ":4500") || !strings.Contains(st.Listen, ":11443") {
		t.Fatalf("server listens on %q, want 4500 and 11443", st.Listen)
	}
	if s := serverSession(t, ctx, tun); s.State != "up" || !hasIKESA(s, sa.InitiatorSPI) {
		t.Fatalf("server session: %+v", s)
	}
	// The output chain: the hub's own connection to its address at 443
	// reaches the server too.
	accepted := counter(t, st, "conns_accepted")
	local, err := l.Hub.DialRFC9329(ctx, net.JoinHostPort(lab.HubOuter, "443"))
	if err != nil {
		t.Fatalf("from the hub itself: %v", err)
	}
	waitFor(t, "the server to accept the hub's own connection to 443", func() bool {
		st, err := tun.ServerStatus(ctx)
		return err == nil && counter(t, st, "conns_accepted") == accepted+1
	})
	t.Logf("the hub's own connection from %s to %s:443 reached the server too", local.LocalAddr(), lab.HubOuter)
	if err := local.Close(); err != nil {
		t.Fatal(err)
	}

	// A crash leaves the table; the next start removes it first.
	if err := tun.KillServer(); err != nil {
		t.Fatal(err)
	}
	if rs := nftRuleset(t, ctx, l.Hub); !strings.Contains(rs, redirectTable) {
		t.Fatalf("a SIGKILLed server left no table: the stale case is not exercised:\n%s", rs)
	}
	killed := tun.Server
	if err := tun.StartServer(ctx); err != nil {
		t.Fatal(err)
	}
	line, err := tun.Server.WaitLog(ctx, "removed an nftables table that an earlier run left", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("server %d after server %d was killed: %s", tun.Server.PID(), killed.PID(), line)
	if rs := nftRuleset(t, ctx, l.Hub); strings.Count(rs, redirectTable) != 1 {
		t.Fatalf("after the restart, want the one redirect table:\n%s", rs)
	}
	// The old IKE SA's session died with the server: a new one comes up
	// through the new server, on 443 again.
	if err := tun.Site.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := tun.Hub.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	sa2 := initiateAndPing(t, ctx, tun, 3)
	if sa2.InitiatorSPI == sa.InitiatorSPI {
		t.Fatalf("the IKE SA after the restart is the old one: %s", sa.InitiatorSPI)
	}
	if s := serverSession(t, ctx, tun); !hasIKESA(s, sa2.InitiatorSPI) {
		t.Fatalf("the restarted server's session: %+v", s)
	}

	// A plain exit takes the table away.
	if err := tun.StopServer(); err != nil {
		t.Fatal(err)
	}
	if err := tun.Server.ExitErr(); err != nil {
		t.Fatalf("server exit on SIGTERM: %v\n%s", err, tun.Server.Log())
	}
	if _, err := tun.Server.WaitLog(ctx, "port redirect: removed its table", time.Second); err != nil {
		t.Fatal(err)
	}
	if rs := nftRuleset(t, ctx, l.Hub); strings.Contains(rs, "iketcp_redirect") {
		t.Fatalf("the redirect table outlived the server's plain exit:\n%s", rs)
	}
}

// tableText returns the block of one table from `nft list ruleset`.
func tableText(ruleset, header string) string {
	i := strings.Index(ruleset, header)
	if i < 0 {
		return ""
	}
	rest := ruleset[i:]
	if j := strings.Index(rest, "\n}"); j >= 0 {
		return rest[:j+2]
	}
	return rest
}

// realAddrTable is the policy routing table of --real-address.
const realAddrTable = "4501"

// hubHostState is what --real-address may change at the hub and must put
// back: the policy rules, the routes of its table and the nftables
// ruleset. A routing table that does not exist reads as an empty one:
// the kernel keeps a table once it has had a route, so a table emptied on
// exit still exists where none did before.
func hubHostState(ctx context.Context, ns *lab.Namespace) (string, error) {
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "-4", "rule"}, {"ip", "-6", "rule"},
		{"ip", "-4", "route", "show", "table", realAddrTable}, {"ip", "-6", "route", "show", "table", realAddrTable},
		{"nft", "list", "ruleset"},
	} {
		out, err := ns.Run(ctx, args[0], args[1:]...)
		if err != nil {
			if args[1] == "-4" || args[1] == "-6" {
				if strings.Contains(string(out), "FIB table does not exist") {
					out, err = nil, nil
				}
			}
			if err != nil {
				return "", err
			}
		}
		b.WriteString("# " + strings.Join(args, " ") + "\n")
		b.Write(out)
	}
	return b.String(), nil
}

// startRealAddress starts a tunnel through a UDP-blocking carrier whose
// server runs --real-address toward the hub's charon on the hub's own
// address, and returns it with the hub's host state from before the
// server started.
func startRealAddress(t *testing.T, ctx context.Context) (*lab.Tunnel, string) {
	t.Helper()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	var before string
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:     iketcpBinary,
		Backend:    net.JoinHostPort(lab.HubOuter, "4500"),
		ServerArgs: []string{"--real-address"},
		BeforeServer: func(ctx context.Context) (err error) {
			before, err = hubHostState(ctx, l.Hub)
			return err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return tun, before
}

// TestRealAddress runs the server with --real-address and the backend on
// the hub's own address: the hub's charon sees its peer at the client's
// carrier address, not at 127.0.0.1, and pings cross. After a plain exit
// of the server, the hub's policy rules, its table 4501 and its nftables
// ruleset are as they were before it started.
func TestRealAddress(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tun, before := startRealAddress(t, ctx)
	l := tun.Lab
	sa := initiateAndPing(t, ctx, tun, 5)

	// The hub's charon sees the client's carrier address.
	hub := hubSA(t, ctx, tun)
	host, _, err := net.SplitHostPort(hub.RemoteHost)
	if err != nil || host != lab.CarrierHub || hub.InitiatorSPI != sa.InitiatorSPI {
		t.Fatalf("the hub's charon sees its peer at %s (IKE SA %s), want %s", hub.RemoteHost, hub.InitiatorSPI, lab.CarrierHub)
	}
	out, err := tun.Hub.Swanctl(ctx, "--list-sas")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), lab.CarrierHub+"[") || strings.Contains(string(out), "127.0.0.1[") {
		t.Fatalf("swanctl --list-sas at the hub does not show the peer at %s:\n%s", lab.CarrierHub, out)
	}
	t.Logf("swanctl --list-sas at the hub:\n%s", out)
	s := serverSession(t, ctx, tun)
	if !strings.HasPrefix(s.Peer, lab.CarrierHub+":") || !strings.HasPrefix(s.Local, lab.CarrierHub+":") {
		t.Fatalf("server session from %s, backend socket %s: want both at %s", s.Peer, s.Local, lab.CarrierHub)
	}
	if s.Local != hub.RemoteHost {
		t.Fatalf("the session's backend socket is %s, but the hub's charon sees %s", s.Local, hub.RemoteHost)
	}
	// Not vacuous: while it runs, the mode's rule, route and table are in.
	during, err := hubHostState(ctx, l.Hub)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"fwmark 0x4501 lookup " + realAddrTable, "local default dev lo", "table inet iketcp_realaddr"} {
		if !strings.Contains(during, want) {
			t.Fatalf("while the server runs, the hub lacks %q:\n%s", want, during)
		}
	}

	if err := tun.StopServer(); err != nil {
		t.Fatal(err)
	}
	if err := tun.Server.ExitErr(); err != nil {
		t.Fatalf("server exit on SIGTERM: %v\n%s", err, tun.Server.Log())
	}
	after, err := hubHostState(ctx, l.Hub)
	if err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Fatalf("the hub after the server's exit differs from before it started:\n--- before\n%s\n--- during\n%s\n--- after\n%s", before, during, after)
	}
	t.Logf("the hub before the server started and after it exited:\n%s", before)
}
