package metrics_test

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/iketcp/iketcp/relay/metrics"
)

var (
	selector = regexp.MustCompile(`([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{`)
	ours     = regexp.MustCompile(`\biketcp_[a-z0-9_]+\b`)
)

// dashboardQueries returns every PromQL text of a Grafana dashboard: the
// panels' targets and the template variables' queries.
func dashboardQueries(t *testing.T, raw []byte) []string {
	t.Helper()
	var d struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("dashboard: %v", err)
	}
	var qs []string
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q queries nothing", p.Title)
		}
		for _, tg := range p.Targets {
			qs = append(qs, tg.Expr)
		}
	}
	for _, v := range d.Templating.List {
		if v.Definition != "" {
			qs = append(qs, v.Definition)
		}
	}
	return qs
}

// unexported returns the metrics queries name that the binary does not
// export, and those it does.
func unexported(queries []string) (missing, used []string) {
	names := metrics.Names()
	for _, q := range queries {
		var refs []string
		for _, m := range selector.FindAllStringSubmatch(q, -1) {
			refs = append(refs, m[1])
		}
		refs = append(refs, ours.FindAllString(q, -1)...)
		for _, r := range refs {
			switch {
			case slices.Contains(names, r):
				if !slices.Contains(used, r) {
					used = append(used, r)
				}
			case !slices.Contains(missing, r):
				missing = append(missing, r)
			}
		}
	}
	return missing, used
}

// TestDashboardReferencesOnlyExportedMetrics reads deploy/grafana's
// dashboard: every metric its queries name is one the Collector exports,
// and it draws the ones operators look at first.
func TestDashboardReferencesOnlyExportedMetrics(t *testing.T) {
	raw, err := os.ReadFile("../../deploy/grafana/iketcp.json")
	if err != nil {
		t.Fatal(err)
	}
	missing, used := unexported(dashboardQueries(t, raw))
	if len(missing) > 0 {
		t.Errorf("the dashboard queries metrics iketcp does not export: %v", missing)
	}
	for _, want := range []string{"iketcp_frames_total", "iketcp_sessions", "iketcp_transport_fallbacks_total",
		"iketcp_dropped_total", "iketcp_refused_total", "iketcp_queue_delay_seconds_bucket"} {
		if !slices.Contains(used, want) {
			t.Errorf("the dashboard does not draw %s", want)
		}
	}
	// The check itself finds a metric that is not exported, ours or not.
	bad := strings.Replace(string(raw), "iketcp_frames_total", "iketcp_frame_total", 1)
	bad = strings.Replace(bad, "iketcp_bytes_total{", "node_network_receive_bytes_total{", 1)
	if m, _ := unexported(dashboardQueries(t, []byte(bad))); !slices.Equal(m, []string{"iketcp_frame_total", "node_network_receive_bytes_total"}) {
		t.Errorf("a dashboard with two unknown metrics: found %v", m)
	}
}
