package integration

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// get fetches http://addr/path inside ns with curl, and returns the body
// and the HTTP status.
func get(t *testing.T, ctx context.Context, ns *lab.Namespace, addr, path string) (string, int) {
	t.Helper()
	out, err := ns.Run(ctx, lab.ToolPath("curl"), "-sS", "--max-time", "5", "-w", "\n%{http_code}", "http://"+addr+path)
	if err != nil {
		t.Fatalf("GET %s%s in %s: %v", addr, path, ns.Name, err)
	}
	i := bytes.LastIndexByte(out, '\n')
	n, err := strconv.Atoi(strings.TrimSpace(string(out[i+1:])))
	if i < 0 || err != nil {
		t.Fatalf("GET %s%s: no status in %q", addr, path, out)
	}
	return string(out[:i+1]), n
}

// sample returns the value of one series of a scrape, or -1 if it is
// absent.
func sample(text, series string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return -1
			}
			return f
		}
	}
	return -1
}

// TestMetricsAndStatusLive runs real strongSwan through a carrier that
// drops UDP, with --metrics on both iketcps. It scrapes /metrics before
// and after traffic and finds the counters moving and the gauges right,
// checks the scrape with promtool, checks /healthz and /readyz, and checks
// `iketcp status --json` and `--session` of the live pair against each
// other and against strongSwan's own view.
func TestMetricsAndStatusLive(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	const srvMetrics, clMetrics = "127.0.0.1:9451", "127.0.0.1:9452"
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary,
		ServerArgs: []string{"--metrics", srvMetrics}, ClientArgs: []string{"--metrics", clMetrics}})
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range []struct {
		ns   *lab.Namespace
		addr string
	}{{l.Hub, srvMetrics}, {l.Site, clMetrics}} {
		for _, path := range []string{"/healthz", "/readyz"} {
			if _, code := get(t, ctx, ep.ns, ep.addr, path); code != 200 {
				t.Errorf("%s%s in %s: %d", ep.addr, path, ep.ns.Name, code)
			}
		}
	}
	const (
		srvIn     = `iketcp_frames_total{direction="in",kind="esp",role="server",tunnel=""}`
		srvOut    = `iketcp_frames_total{direction="out",kind="esp",role="server",tunnel=""}`
		srvIKEIn  = `iketcp_frames_total{direction="in",kind="ike",role="server",tunnel=""}`
		clOut     = `iketcp_frames_total{direction="out",kind="esp",role="client",tunnel=""}`
		srvUp     = `iketcp_sessions{role="server",state="up",tunnel=""}`
		clUp      = `iketcp_sessions{role="client",state="up",tunnel=""}`
		clLinksUp = `iketcp_links{role="client",state="up",tunnel=""}`
		accepted  = `iketcp_conns_accepted_total{role="server",tunnel=""}`
	)
	before, _ := get(t, ctx, l.Hub, srvMetrics, "/metrics")
	if v := sample(before, srvUp); v != 0 {
		t.Errorf("before the tunnel: %s = %v, want 0", srvUp, v)
	}

	sa, err := tun.Initiate(ctx)
	if err != nil {
		t.Fatalf("initiate: %v", err)
	}
	const pings = 10
	if n, err := tun.PingThrough(ctx, pings, 100*time.Millisecond); err != nil || n != pings {
		t.Fatalf("%d of %d pings crossed: %v", n, pings, err)
	}
	after, _ := get(t, ctx, l.Hub, srvMetrics, "/metrics")
	cl, _ := get(t, ctx, l.Site, clMetrics, "/metrics")
	t.Logf("server: %s %v -> %v, %s %v -> %v, %s %v; client: %s %v", srvIn, sample(before, srvIn), sample(after, srvIn),
		srvIKEIn, sample(before, srvIKEIn), sample(after, srvIKEIn), srvOut, sample(after, srvOut), clOut, sample(cl, clOut))
	// Each ping is an ESP datagram each way; IKE_SA_INIT and IKE_AUTH
	// are two IKE requests in at the server.
	if d := sample(after, srvIn) - sample(before, srvIn); d < pings {
		t.Errorf("%s rose by %v, want at least %d", srvIn, d, pings)
	}
	if d := sample(after, srvIKEIn) - sample(before, srvIKEIn); d < 2 {
		t.Errorf("%s rose by %v, want at least 2", srvIKEIn, d)
	}
	if v := sample(after, srvOut); v < pings {
		t.Errorf("%s = %v, want at least %d", srvOut, v, pings)
	}
	if v := sample(cl, clOut); v < pings {
		t.Errorf("%s = %v, want at least %d", clOut, v, pings)
	}
	for _, c := range []struct {
		text, series string
		want         float64
	}{{after, srvUp, 1}, {after, accepted, 1}, {cl, clUp, 1}, {cl, clLinksUp, 1}} {
		if v := sample(c.text, c.series); v != c.want {
			t.Errorf("%s = %v, want %v", c.series, v, c.want)
		}
	}

	promtool := lab.ToolPath("promtool")
	if promtool == "" {
		t.Fatal("promtool not found: run make deps (Debian's prometheus package)")
	}
	for name, text := range map[string]string{"server": after, "client": cl} {
		cmd := exec.CommandContext(ctx, promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(text)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool check metrics on the %s's scrape: %v\n%s", name, err, out)
		}
	}

	// status --json of the live pair: one session, the IKE SA strongSwan
	// established, the traffic the metrics counted, and the client's link
	// carrying the server's session.
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Sessions) != 1 {
		t.Fatalf("server status: %d sessions, want 1", len(st.Sessions))
	}
	s := st.Sessions[0]
	if s.State != "up" || !hasIKESA(s, sa.InitiatorSPI) || len(s.ESPIn) == 0 || len(s.ESPOut) == 0 {
		t.Errorf("server session: state %s, IKE SAs %v (strongSwan's %s), ESP in %v out %v", s.State, s.IKESAs, sa.InitiatorSPI, s.ESPIn, s.ESPOut)
	}
	if float64(s.PacketsIn) < sample(after, srvIn)+sample(after, srvIKEIn) || float64(s.PacketsOut) < sample(after, srvOut) {
		t.Errorf("server session counted %d in, %d out; the scrape before it %v, %v", s.PacketsIn, s.PacketsOut, sample(after, srvIn), sample(after, srvOut))
	}
	cst, err := tun.ClientStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(cst.Sessions) != 1 || len(cst.Sessions[0].Links) != 1 || cst.Sessions[0].Links[0].Session != s.ID {
		t.Fatalf("client status: %+v, want one flow with one link carrying server session %d", cst.Sessions, s.ID)
	}
	if out := cst.Sessions[0].Links[0].ESPOut; len(out) == 0 || out[0] != s.ESPIn[0] {
		t.Errorf("client link's ESP out %v, the server's ESP in %v", out, s.ESPIn)
	}
	text, err := l.Hub.Run(ctx, iketcpBinary, "status", "--control", tun.ServerControl, "--session", s.ESPIn[0])
	if err != nil || !strings.Contains(string(text), fmt.Sprintf("name: session-%d\n", s.ID)) || !strings.Contains(string(text), "IKE SA: spi "+sa.InitiatorSPI) {
		t.Errorf("status --session %s: %v\n%s", s.ESPIn[0], err, text)
	}
	t.Logf("iketcp status --session %s:\n%s", s.ESPIn[0], text)
	if all, err := tun.StatusText(ctx, l.Hub, tun.ServerControl); err == nil {
		t.Logf("iketcp status:\n%s", all)
	}
}
