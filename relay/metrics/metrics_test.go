package metrics_test

import (
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/metrics"
	"github.com/iketcp/iketcp/relay/sendq"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func sources() []metrics.Source {
	sc, cc := new(relay.Counters), new(relay.Counters)
	sc.PacketsIn.Store(7)
	sc.IKEIn.Store(2)
	sc.ESPIn.Store(5)
	cc.PacketsOut.Store(4)
	cc.IKEOut.Store(1)
	cc.ESPOut.Store(2)
	cc.KeepalivesOut.Store(1)
	sc.BytesOut.Store(1398)
	sc.QueueFull.Store(3)
	sc.ConnsRejected.Store(2)
	sc.ConnsAccepted.Store(5)
	sc.QueueDelay[sendq.Bulk].Observe(int64(3 * time.Millisecond))
	sc.QueueDelay[sendq.Bulk].Observe(int64(40 * time.Millisecond))
	cc.Fallbacks.Store(1)
	started := time.Unix(1700000000, 0)
	return []metrics.Source{
		{Role: relay.RoleServer, Counters: sc, Status: func() *relay.Status {
			return &relay.Status{Role: relay.RoleServer, Mode: "rfc9329", Version: "v1", Started: started,
				Sessions: []relay.SessionStatus{{ID: 1, State: "up"}, {ID: 2, State: "half-open"}, {ID: 3, State: "up"}},
				Aggregates: []relay.AggregateStatus{{LocationID: "1.1.1.1", Algorithm: "round-robin", Session: 3,
					Reorder: relay.ReorderStatus{OutOfOrder: 4},
					Members: []relay.MemberStatus{
						{Name: "wan1", State: "up", RTTms: 12.5, Loss: 0.25, Rate: 1000, PacketsIn: 10, BytesIn: 1400, PacketsOut: 20, BytesOut: 2800},
						{Name: "wan2", State: "down"},
					}}}}
		}},
		{Role: relay.RoleClient, Tunnel: "hub-a", Counters: cc, Status: func() *relay.Status {
			return &relay.Status{Role: relay.RoleClient, Mode: "explicit", Started: started,
				Sessions: []relay.SessionStatus{{ID: 1, State: "up", Links: []relay.LinkStatus{{State: "up"}, {State: "connecting"}}}}}
		}},
	}
}

// TestCollector reads relays' counters and status into metrics with
// Prometheus's names and conventions (promlint finds nothing to say).
func TestCollector(t *testing.T) {
	c := new(metrics.Collector)
	for _, s := range sources() {
		c.Add(s)
	}
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
	want := `# HELP iketcp_frames_total Datagrams relayed, by direction (in: from the far end to the local daemon; out: from the daemon toward the far end) and kind (ike, esp, keepalive).
# TYPE iketcp_frames_total counter
iketcp_frames_total{direction="in",kind="esp",role="client",tunnel="hub-a"} 0
iketcp_frames_total{direction="in",kind="esp",role="server",tunnel=""} 5
iketcp_frames_total{direction="in",kind="ike",role="client",tunnel="hub-a"} 0
iketcp_frames_total{direction="in",kind="ike",role="server",tunnel=""} 2
iketcp_frames_total{direction="in",kind="keepalive",role="client",tunnel="hub-a"} 0
iketcp_frames_total{direction="out",kind="esp",role="client",tunnel="hub-a"} 2
iketcp_frames_total{direction="out",kind="esp",role="server",tunnel=""} 0
iketcp_frames_total{direction="out",kind="ike",role="client",tunnel="hub-a"} 1
iketcp_frames_total{direction="out",kind="ike",role="server",tunnel=""} 0
iketcp_frames_total{direction="out",kind="keepalive",role="client",tunnel="hub-a"} 1
# HELP iketcp_sessions Server sessions (IKE SAs) or client flows, by state: up, connecting, waiting, half-open.
# TYPE iketcp_sessions gauge
iketcp_sessions{role="client",state="connecting",tunnel="hub-a"} 0
iketcp_sessions{role="client",state="up",tunnel="hub-a"} 1
iketcp_sessions{role="client",state="waiting",tunnel="hub-a"} 0
iketcp_sessions{role="server",state="half-open",tunnel=""} 1
iketcp_sessions{role="server",state="up",tunnel=""} 2
iketcp_sessions{role="server",state="waiting",tunnel=""} 0
# HELP iketcp_links A client's links to the server (one per IKE SA), by state.
# TYPE iketcp_links gauge
iketcp_links{role="client",state="connecting",tunnel="hub-a"} 1
iketcp_links{role="client",state="up",tunnel="hub-a"} 1
iketcp_links{role="client",state="waiting",tunnel="hub-a"} 0
# HELP iketcp_transport_fallbacks_total Client flows whose transport went from UDP to TCP.
# TYPE iketcp_transport_fallbacks_total counter
iketcp_transport_fallbacks_total{role="client",tunnel="hub-a"} 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "iketcp_frames_total", "iketcp_sessions", "iketcp_links", "iketcp_transport_fallbacks_total"); err != nil {
		t.Error(err)
	}
	text := scrapeText(t)
	for _, line := range []string{
		`iketcp_dropped_total{reason="queue_full",role="server",tunnel=""} 3`,
		`iketcp_refused_total{reason="conns_rejected",role="server",tunnel=""} 2`,
		`iketcp_conns_accepted_total{role="server",tunnel=""} 5`,
		`iketcp_queue_delay_seconds_bucket{lane="esp",role="server",tunnel="",le="0.005"} 1`,
		`iketcp_queue_delay_seconds_bucket{lane="esp",role="server",tunnel="",le="0.05"} 2`,
		`iketcp_queue_delay_seconds_count{lane="esp",role="server",tunnel=""} 2`,
		`iketcp_queue_delay_seconds_sum{lane="esp",role="server",tunnel=""} 0.043`,
		`iketcp_info{mode="rfc9329",role="server",tunnel="",version="v1"} 1`,
		`iketcp_aggregate_member_up{location_id="1.1.1.1",member="wan1",role="server",session="3",tunnel=""} 1`,
		`iketcp_aggregate_member_up{location_id="1.1.1.1",member="wan2",role="server",session="3",tunnel=""} 0`,
		`iketcp_aggregate_member_rtt_seconds{location_id="1.1.1.1",member="wan1",role="server",session="3",tunnel=""} 0.0125`,
		`iketcp_aggregate_member_probe_loss_ratio{location_id="1.1.1.1",member="wan1",role="server",session="3",tunnel=""} 0.25`,
		`iketcp_aggregate_member_packets_total{direction="out",location_id="1.1.1.1",member="wan1",role="server",session="3",tunnel=""} 20`,
		`iketcp_aggregate_member_bytes_total{direction="in",location_id="1.1.1.1",member="wan1",role="server",session="3",tunnel=""} 1400`,
		`iketcp_aggregate_out_of_order_total{location_id="1.1.1.1",role="server",session="3",tunnel=""} 4`,
	} {
		if !strings.Contains(text, line+"\n") {
			t.Errorf("scrape lacks %s", line)
		}
	}
	// Names lists exactly what is exported.
	var got []string
	for _, m := range regexp.MustCompile(`(?m)^(iketcp_[a-z_]+)[{ ]`).FindAllStringSubmatch(text, -1) {
		if !slices.Contains(got, m[1]) {
			got = append(got, m[1])
		}
	}
	names := metrics.Names()
	slices.Sort(got)
	slices.Sort(names)
	if !slices.Equal(got, names) {
		t.Errorf("exported %v\nNames() %v", got, names)
	}
}

// scrapeText serves the sources and returns one scrape of /metrics.
func scrapeText(t *testing.T) string {
	t.Helper()
	s, err := metrics.Listen("127.0.0.1:0", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, src := range sources() {
		s.Collector.Add(src)
	}
	code, body := get(t, "http://"+s.Addr()+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	return body
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	cl := &http.Client{Timeout: 5 * time.Second}
	resp, err := cl.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	cl.CloseIdleConnections()
	return resp.StatusCode, string(b)
}

func TestHealthAndReady(t *testing.T) {
	s, err := metrics.Listen("127.0.0.1:0", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	base := "http://" + s.Addr()
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz: %d", code)
	}
	if code, _ := get(t, base+"/readyz"); code != 503 {
		t.Errorf("/readyz before SetReady: %d, want 503", code)
	}
	s.SetReady(true)
	if code, _ := get(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz when ready: %d", code)
	}
	s.SetReady(false)
	if code, _ := get(t, base+"/readyz"); code != 503 {
		t.Errorf("/readyz while draining: %d, want 503", code)
	}
	if _, err := metrics.Listen(s.Addr(), slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "--metrics") {
		t.Errorf("a second endpoint on the same address: %v, want advice naming --metrics", err)
	}
}
