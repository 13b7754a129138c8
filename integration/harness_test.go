package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/integration/perf"
)

// TestBenchQuick runs `iketcp-lab bench --quick`, the benchmark harness's
// smoke mode, as a user would (the program, built from this checkout, not
// under the race detector), and checks that every path delivered
// something, every part of the run reported, and the table, the JSON and
// the chart were written.
func TestBenchQuick(t *testing.T) {
	lab.Require(t)
	if missing := lab.MissingBenchTools(); len(missing) > 0 {
		msg := "iketcp-lab bench needs " + strings.Join(missing, ", ") + " (run make deps)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	dir := t.TempDir()
	labBin := filepath.Join(dir, "iketcp-lab")
	if out, err := exec.Command("go", "build", "-o", labBin, "github.com/iketcp/iketcp/cmd/iketcp-lab").CombinedOutput(); err != nil {
		t.Fatalf("building iketcp-lab: %v\n%s", err, out)
	}
	out := filepath.Join(dir, "docs")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, labBin, "bench", "--quick", "--iketcp", iketcpBinary, "--out", out, "--timeout", "150s")
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	t.Logf("iketcp-lab bench --quick took %v; its log:\n%s", time.Since(start).Round(time.Millisecond), stderr.String())
	if err != nil {
		t.Fatalf("iketcp-lab bench --quick: %v", err)
	}

	md, err := os.ReadFile(filepath.Join(out, "bench.md"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stdout.String(), "## Summary") || !strings.Contains(string(md), "## Summary") {
		t.Errorf("no summary table on stdout or in bench.md:\n%s", md)
	}
	png, err := os.ReadFile(filepath.Join(out, "bench.png"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) || len(png) < 10_000 {
		t.Errorf("bench.png is not a chart (%d bytes)", len(png))
	}
	js, err := os.ReadFile(filepath.Join(out, "bench.json"))
	if err != nil {
		t.Fatal(err)
	}
	var res perf.Results
	if err := json.Unmarshal(js, &res); err != nil {
		t.Fatal(err)
	}
	want := []string{perf.PathDirect, perf.PathRFC9329, perf.PathFakeTCP, perf.PathUDPTunnel}
	for _, p := range want {
		var got uint64
		for _, s := range res.Steps {
			if s.Path == p {
				got += s.Received
			}
		}
		if got == 0 {
			t.Errorf("%s delivered nothing", p)
		}
		if !strings.Contains(string(md), "| "+p+" |") {
			t.Errorf("bench.md has no row for %s", p)
		}
	}
	for _, rt := range res.RoundTrips {
		if len(rt.RTTs.Sorted) == 0 {
			t.Errorf("%s: no round trip came back", rt.Path)
		}
	}
	if len(res.RoundTrips) != len(want) || len(res.Loaded) != 3 || len(res.Scale) == 0 {
		t.Errorf("%d round trips, %d loaded variants, %d scale rungs: want %d, 3 and some", len(res.RoundTrips), len(res.Loaded), len(res.Scale), len(want))
	}
	for _, s := range res.Scale {
		if s.Received == 0 {
			t.Errorf("scale ladder, %d sessions: nothing delivered", s.Sessions)
		}
	}
	if len(res.Errors) > 0 {
		t.Errorf("parts failed: %v", res.Errors)
	}
}
