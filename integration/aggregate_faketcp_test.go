package integration

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// routeCarriersWithoutNAT makes both carriers of a two-carrier lab plain
// routers: they stop masquerading, and the hub routes each of the site's
// uplink networks back through its carrier. The hub then sees each of the
// site's connections with the source address it left the site with.
func routeCarriersWithoutNAT(t *testing.T, ctx context.Context, l *lab.Lab) {
	t.Helper()
	for _, c := range l.Carriers() {
		if out, err := c.Run(ctx, "nft", "flush", "chain", "inet", lab.CarrierTable, "postrouting"); err != nil {
			t.Fatalf("%s: stop masquerading: %v: %s", c.Name, err, out)
		}
	}
	for _, r := range [][]string{
		{lab.SiteOuterNet, lab.CarrierHub, lab.HubIface},
		{lab.SiteOuter2Net, lab.Carrier2Hub, lab.HubIface2},
	} {
		if out, err := l.Hub.Run(ctx, "ip", "route", "add", r[0], "via", r[1], "dev", r[2]); err != nil {
			t.Fatalf("hub: route %s via %s: %v: %s", r[0], r[1], err, out)
		}
	}
}

// TestAggregateFakeTCP: an aggregate of two members over fake-TCP, each
// from its own uplink address through a carrier of its own to an address
// of the hub's, both ends in fake-TCP mode, round-robin. Both members
// join on both sides; 200 pings cross with each member carrying about
// half each way; the hub sees each member coming from its own uplink
// address (the carriers do no NAT here), and the site shows it as the
// member's local address. Then the second carrier drops
// everything while pings cross: the gap stays under a second, the IKE SA
// is the same, and once healed the member rejoins and carries pings.
func TestAggregateFakeTCP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{TwoCarriers: true})
	routeCarriersWithoutNAT(t, ctx, l)
	tun, sa := upAggregateIn(t, ctx, l, lab.TunnelOptions{ServerArgs: hubFakeTCPArgs},
		append(append([]string{}, siteFakeTCPArgs...), "--aggregate", "round-robin")...)

	srv, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if srv.Mode != "fake-tcp" || len(srv.Sessions) != 1 {
		t.Fatalf("server: mode %q, %d sessions, want fake-tcp and the one IKE SA's", srv.Mode, len(srv.Sessions))
	}
	uplinks := []string{lab.SiteOuter, lab.SiteOuter2}
	for _, m := range srv.Aggregates[0].Members {
		remote, err := netip.ParseAddrPort(m.Remote)
		if err != nil || int(m.Index) >= len(uplinks) || remote.Addr().String() != uplinks[m.Index] {
			t.Errorf("the hub sees member %d at %q, want its uplink address %s", m.Index, m.Remote, uplinks[min(int(m.Index), 1)])
		}
		t.Logf("hub: member %d from %s", m.Index, m.Remote)
	}
	cl, err := tun.ClientStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, m := range cl.Aggregates[0].Members {
		if !strings.HasPrefix(m.Local, uplinks[i]+":") {
			t.Errorf("site: member %s leaves from %q, want %s", m.Name, m.Local, uplinks[i])
		}
		t.Logf("site: member %s %s -> %s", m.Name, m.Local, m.Remote)
	}

	in0, out0 := memberCounts(t, ctx, tun, 0)
	got, err := tun.PingThrough(ctx, 200, 10*time.Millisecond)
	if err != nil || got < 195 {
		t.Fatalf("%d of 200 pings: %v", got, err)
	}
	in1, out1 := memberCounts(t, ctx, tun, 0)
	din, dout := diff(in1, in0), diff(out1, out0)
	t.Logf("%d of 200 pings; toward the hub %v (%.1f%% on wan1), toward the site %v (%.1f%% on wan1)",
		got, din, 100*share(din), dout, 100*share(dout))
	for what, s := range map[string]float64{"toward the hub": share(din), "toward the site": share(dout)} {
		if s < 0.4 || s > 0.6 {
			t.Errorf("%s: wan1 carried %.1f%%, want 40%% to 60%%", what, 100*s)
		}
	}

	failover(t, ctx, tun, sa)
	if srv, err := tun.ServerStatus(ctx); err == nil {
		for _, m := range srv.Aggregates[0].Members {
			t.Logf("hub after healing: member %d from %s", m.Index, m.Remote)
		}
	}
}
