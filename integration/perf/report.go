package perf

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// Markdown renders the results as the report docs/bench.md holds.
func (r *Results) Markdown() string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	mode := "full run"
	if r.Quick {
		mode = "quick run (--quick: short steps, few samples; for smoke tests, not for figures)"
	}
	w("# iketcp benchmarks")
	w("")
	w("Measured by `iketcp-lab bench` (`make bench`), %s, on %s.", mode, r.Started.UTC().Format("2006-01-02 15:04 MST"))
	w("")
	w("| | |")
	w("|---|---|")
	w("| machine | %s, %d cores, Linux %s |", r.Machine.CPU, r.Machine.Cores, r.Machine.Kernel)
	w("| iketcp measured | `%s` |", r.Iketcp)
	w("| commit | `%s` |", r.Commit)
	w("| Go | %s |", r.Machine.Go)
	w("| run took | %v |", r.Took.Round(time.Second))
	w("| load average (1, 5 min) before, after | %s; %s (%d cores: above %d, other work shared the machine) |", r.Machine.LoadBefore, r.Machine.LoadAfter, r.Machine.Cores, r.Machine.Cores)
	w("")
	w("Every ratio compares figures of this one run: the machine's speed drifts over minutes, so compare")
	w("ratios, not absolute figures across runs. All datagrams are 1400 bytes unless said otherwise.")
	if len(r.Errors) > 0 {
		w("")
		w("**Parts that failed in this run:**")
		for _, e := range r.Errors {
			w("- %s", strings.ReplaceAll(e, "\n", " "))
		}
	}
	r.summary(w)
	r.throughputTable(w)
	r.roundTripTable(w)
	r.loadedTable(w)
	r.scaleTable(w)
	r.calibrationTable(w)
	w("")
	w("## How it was measured")
	w("")
	w("- **Paths.** Two network namespaces joined by one veth pair. *Direct UDP*: the blaster at the site sends")
	w("  straight to the sink at the hub. *iketcp*: `iketcp client` at the site (the blaster sends to its `--listen`")
	w("  on loopback), `iketcp server` at the hub (the sink is its `--backend` on loopback), default flags but the")
	w("  addresses and, in fake-TCP mode, `--fake-tcp-net`; the blaster first opens a session with an IKE_SA_INIT that")
	w("  the sink answers. *udptunnel*: Debian's `udptunnel -c`/`-s`, which frames each datagram with a 16-bit")
	w("  length over one TCP connection, as RFC 9329 does. All paths are up at once and the harness takes turns between them at each rate.")
	w("- **Blaster and sink** are the harness's own sockets inside the namespaces, the same on every path, in the")
	w("  I/O mode that delivered most on direct UDP (the last table: every mode is measured in the same run).")
	w("- **A step** offers a rate for %v; the first fifth is left out, and over the rest the harness reads the", r.stepTime())
	w("  sink's count (delivered/s) and the relays' utime+stime from `/proc/PID/stat` (client plus server). Loss")
	w("  counts everything received once the path has drained. *Flat out* sends as fast as the blaster can; on a")
	w("  2-core machine it then takes a core from the relays, as any heavy sender would.")
	w("- **Round trip**: one 1400-byte datagram in flight, the sink echoing it back through the path.")
	w("- **Latency under load**: three namespaces (site, carrier, hub) with strongSwan at both ends (userspace ESP,")
	w("  kernel-libipsec), the carrier a tbf of 20 Mbit/s toward the hub with a 30 ms queue; a flood of %d-byte UDP", floodPayload)
	w("  datagrams at 40 Mbit/s (inner IP) from the site's protected address to the hub's, through the tunnel, and")
	w("  `ping -i 0.05` beside it. *Plain UDP* is strongSwan alone (the carrier lets UDP through); the iketcp")
	w("  variants run as in `make demo`, the carrier dropping UDP.")
	w("- **Scale ladder**: a fresh `iketcp server` on the hub's loopback for each rung, its limits raised; each session")
	w("  is a TCP connection of its own with an IKE_SA_INIT answered by the backend (which carries the responder")
	w("  SPI), then ESP with an SPI per session, spread round-robin. Memory is VmRSS from `/proc/PID/status`")
	w("  before and after, divided by the sessions.")
	return b.String()
}

func (r *Results) stepTime() time.Duration {
	if r.Quick {
		return 600 * time.Millisecond
	}
	return 3 * time.Second
}

func (r *Results) step(path string, target float64) (Step, bool) {
	for _, s := range r.Steps {
		if s.Path == path && s.Target == target {
			return s, true
		}
	}
	return Step{}, false
}

func (r *Results) roundTrip(path string) (RoundTrip, bool) {
	for _, t := range r.RoundTrips {
		if t.Path == path {
			return t, true
		}
	}
	return RoundTrip{}, false
}

func (r *Results) targets() []float64 {
	var out []float64
	seen := map[float64]bool{}
	for _, s := range r.Steps {
		if !seen[s.Target] {
			seen[s.Target] = true
			out = append(out, s.Target)
		}
	}
	return out
}

func ratio(v, base float64) string {
	if base == 0 || math.IsNaN(v) || math.IsNaN(base) {
		return "—"
	}
	if r := v / base; r < 0.1 {
		return fmt.Sprintf("%.3f", r)
	}
	return fmt.Sprintf("%.2f", v/base)
}

func rate(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.2fM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.1fk", v/1e3)
	}
	return fmt.Sprintf("%.0f", v)
}

func us(d time.Duration) string {
	if d == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f µs", float64(d)/float64(time.Microsecond))
}

func ms(d time.Duration) string {
	switch {
	case d == 0:
		return "—"
	case d < time.Millisecond:
		return fmt.Sprintf("%.1f µs", float64(d)/float64(time.Microsecond))
	}
	return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
}

func pct(v float64) string {
	if v > 0 && v < 0.001 {
		return "<0.1%"
	}
	return fmt.Sprintf("%.1f%%", 100*v)
}

// summary is one line per path: what the relay team looks at first.
func (r *Results) summary(w func(string, ...any)) {
	if len(r.Paths) == 0 {
		return
	}
	w("")
	w("## Summary")
	w("")
	w("Ratios are to direct UDP measured in the same run (for CPU, to udptunnel: direct UDP has no relay).")
	w("")
	w("| path | most delivered/s (offered) | ratio | highest offered rate with < 1%% loss | round trip p50 | ratio | p99 | ratio | relay CPU per datagram at 100k/s | ratio to udptunnel | relay CPU idle |")
	w("|---|---|---|---|---|---|---|---|---|---|---|")
	peak := func(p string) Step {
		var best Step
		for _, s := range r.Steps {
			if s.Path == p && s.Delivered > best.Delivered {
				best = s
			}
		}
		return best
	}
	peakBase := peak(PathDirect)
	rtBase, _ := r.roundTrip(PathDirect)
	cpuBase, _ := r.step(PathUDPTunnel, 100_000)
	for _, p := range r.Paths {
		top := peak(p)
		at := "flat out"
		if top.Target > 0 {
			at = rate(top.Target) + "/s"
		}
		best := "none"
		for _, t := range r.targets() {
			if s, ok := r.step(p, t); ok && t > 0 && s.Loss < 0.01 {
				best = rate(t) + "/s"
			}
		}
		rt, _ := r.roundTrip(p)
		at100, _ := r.step(p, 100_000)
		cpuRatio := "—"
		if at100.RelayCPU > 0 && cpuBase.RelayCPU > 0 {
			cpuRatio = ratio(float64(at100.RelayCPU), float64(cpuBase.RelayCPU))
		}
		idle := "—"
		if c, ok := r.IdleCores[p]; ok {
			idle = fmt.Sprintf("%.3f cores", c)
		}
		w("| %s | %s (%s) | %s | %s | %s | %s | %s | %s | %s | %s | %s |", p, rate(top.Delivered), at, ratio(top.Delivered, peakBase.Delivered), best,
			ms(rt.RTTs.Quantile(0.5)), ratio(float64(rt.RTTs.Quantile(0.5)), float64(rtBase.RTTs.Quantile(0.5))),
			ms(rt.RTTs.Quantile(0.99)), ratio(float64(rt.RTTs.Quantile(0.99)), float64(rtBase.RTTs.Quantile(0.99))),
			us(at100.RelayCPU), cpuRatio, idle)
	}
	if c := r.TCPCeiling; c != nil && peakBase.Delivered > 0 {
		w("")
		w("One plain TCP stream over the same veth, with no relay at all, carries %s datagrams/s (%.3f of direct UDP): the ceiling", rate(c.Datagrams), c.Datagrams/peakBase.Delivered)
		w("of anything that puts datagrams in one TCP connection here; it costs %s of CPU per datagram, sender and receiver", us(c.CPU))
		w("together (see the baseline section).")
	}
	if len(r.Loaded) > 0 {
		w("")
		w("Latency under load (ping through a strongSwan tunnel, 20 Mbit/s bottleneck flooded at 40 Mbit/s):")
		for _, l := range r.Loaded {
			w("%s p50/p99 %s/%s, %s loss;", l.Path, ms(l.RTTs.Quantile(0.5)), ms(l.RTTs.Quantile(0.99)), pct(l.Loss()))
		}
	}
}

func (r *Results) throughputTable(w func(string, ...any)) {
	if len(r.Steps) == 0 {
		return
	}
	w("")
	w("## Throughput at offered rates")
	w("")
	w("Relay CPU is utime+stime of client and server together per datagram delivered, then split between")
	w("them; *cores* is the same CPU time per second. *Harness* is the blaster's and sink's CPU per datagram.")
	w("")
	w("| offered | path | reached | delivered/s | ratio to direct | loss | relay CPU/datagram | client + server | relay cores | harness CPU/datagram |")
	w("|---|---|---|---|---|---|---|---|---|---|")
	for _, t := range r.targets() {
		base, _ := r.step(PathDirect, t)
		for _, p := range r.Paths {
			s, ok := r.step(p, t)
			if !ok {
				continue
			}
			name := rate(t) + "/s"
			if t == 0 {
				name = "flat out"
			}
			cores := "—"
			if s.RelayCPU > 0 {
				cores = fmt.Sprintf("%.2f", s.RelayCores)
			}
			split := "—"
			if s.ClientCPU > 0 || s.ServerCPU > 0 {
				split = fmt.Sprintf("%.1f + %.1f µs", float64(s.ClientCPU)/1e3, float64(s.ServerCPU)/1e3)
			}
			w("| %s | %s | %s/s | %s | %s | %s | %s | %s | %s | %s |", name, p, rate(s.Offered), rate(s.Delivered), ratio(s.Delivered, base.Delivered),
				pct(s.Loss), us(s.RelayCPU), split, cores, us(s.HarnessCPU))
		}
	}
}

func (r *Results) roundTripTable(w func(string, ...any)) {
	if len(r.RoundTrips) == 0 {
		return
	}
	w("")
	w("## Round trip, one datagram in flight")
	w("")
	w("| path | round trips | p50 | ratio to direct | p99 | ratio to direct | lost |")
	w("|---|---|---|---|---|---|---|")
	base, _ := r.roundTrip(PathDirect)
	for _, t := range r.RoundTrips {
		w("| %s | %d | %s | %s | %s | %s | %d |", t.Path, len(t.RTTs.Sorted), ms(t.RTTs.Quantile(0.5)),
			ratio(float64(t.RTTs.Quantile(0.5)), float64(base.RTTs.Quantile(0.5))),
			ms(t.RTTs.Quantile(0.99)), ratio(float64(t.RTTs.Quantile(0.99)), float64(base.RTTs.Quantile(0.99))), t.RTTs.Lost)
	}
}

func (r *Results) loadedTable(w func(string, ...any)) {
	if len(r.Loaded) == 0 {
		return
	}
	w("")
	w("## Latency under load")
	w("")
	w("A real strongSwan tunnel through the carrier's 20 Mbit/s bottleneck (30 ms queue), flooded at 40 Mbit/s")
	w("through the tunnel; pings beside the flood. The baseline is plain UDP, strongSwan alone.")
	w("")
	w("| path | pings | ping p50 | ratio to plain UDP | p99 | ratio to plain UDP | loss | flood delivered |")
	w("|---|---|---|---|---|---|---|---|")
	var base Loaded
	for _, l := range r.Loaded {
		if l.Path == LoadedPlainUDP {
			base = l
		}
	}
	for _, l := range r.Loaded {
		w("| %s | %d | %s | %s | %s | %s | %s | %.1f of %.1f Mbit/s |", l.Path, l.Pings, ms(l.RTTs.Quantile(0.5)),
			ratio(float64(l.RTTs.Quantile(0.5)), float64(base.RTTs.Quantile(0.5))), ms(l.RTTs.Quantile(0.99)),
			ratio(float64(l.RTTs.Quantile(0.99)), float64(base.RTTs.Quantile(0.99))), pct(l.Loss()),
			l.FloodDelivered/1e6, l.FloodOffered/1e6)
	}
}

func (r *Results) scaleTable(w func(string, ...any)) {
	if len(r.Scale) == 0 {
		return
	}
	w("")
	w("## Scale ladder: one iketcp server, many sessions")
	w("")
	w("Each session is a TCP connection of its own on the server's loopback, as RFC 9329 clients open them,")
	w("unless the open-file limit cannot hold that many: the server needs a descriptor per connection and one per")
	w("session's backend socket, so with %d files 10,000 sessions need a few connections that carry two", r.fileLimit())
	w("(*connections* says how many). RSS is the server's VmRSS; *per session* is the growth divided by the")
	w("sessions (coarse for one session: RSS moves by pages and heap arenas). The ESP offered is spread")
	w("round-robin over all sessions; CPU is the server's per datagram delivered.")
	w("")
	w("| sessions | connections | opened in | RSS idle | RSS with sessions | per session | per session after traffic | offered/s | delivered/s | loss | server CPU/datagram |")
	w("|---|---|---|---|---|---|---|---|---|---|---|")
	for _, s := range r.Scale {
		loss := 0.0
		if s.Sent > 0 {
			loss = max(0, 1-float64(s.Received)/float64(s.Sent))
		}
		w("| %d | %d | %v | %s | %s | %s | %s | %s | %s | %s | %s |", s.Sessions, s.Conns, s.Open.Round(time.Millisecond), kib(s.RSSBefore), kib(s.RSSOpen),
			kib(int64(s.PerSession())), kib(int64(s.PerSessionTraffic())), rate(s.Rate), rate(s.Delivered), pct(loss), us(s.CPU))
	}
}

func (r *Results) fileLimit() uint64 {
	for _, s := range r.Scale {
		return s.FileLimit
	}
	return 0
}

func (r *Results) calibrationTable(w func(string, ...any)) {
	if len(r.Calibrations) == 0 {
		return
	}
	w("")
	w("## The baseline: the blaster and the sink against each other")
	w("")
	w("Direct UDP, flat out, in each I/O mode the harness has. The mode that delivered most (**bold**) is the")
	w("one every path uses, so the baseline is the best this machine does between two namespaces, and the")
	w("harness is never what limits a relay: each relay delivers far less than this.")
	w("")
	w("| blaster and sink | offered/s | delivered/s | loss | messages per datagram at the sink | harness CPU/datagram |")
	w("|---|---|---|---|---|---|")
	for _, c := range r.Calibrations {
		name := c.Mode.String()
		if c.Mode == r.Baseline {
			name = "**" + name + "**"
		}
		w("| %s | %s | %s | %s | %.3f | %s |", name, rate(c.Step.Offered), rate(c.Step.Delivered), pct(c.Step.Loss), c.MessagesPerDatagram, us(c.Step.HarnessCPU))
	}
	if c := r.TCPCeiling; c != nil {
		best := 0.0
		for _, c := range r.Calibrations {
			best = max(best, c.Step.Delivered)
		}
		w("")
		w("The ceiling of any TCP encapsulation here: one plain TCP stream between the same two addresses, written")
		w("flat out in 256 KiB writes and read in 256 KiB reads, nothing framed or relayed, carried %.0f MB/s, the", c.BytesPerSecond/1e6)
		w("same as %s datagrams/s of %d bytes with their 2-byte length field, for %s of CPU per datagram (sender,", rate(c.Datagrams), DatagramSize, us(c.CPU))
		w("receiver and the kernel's work for both: what TCP alone costs a relay pair per datagram here)")
		if best > 0 {
			w("(%.3f of the best direct UDP above).", c.Datagrams/best)
		} else {
			w("(no direct UDP figure to compare).")
		}
	}
}

// Chart draws the PNG: delivered against offered rate per path, and the
// round trip under load per path. It runs gnuplot (Debian's gnuplot-nox,
// installed by iketcp-lab deps).
func (r *Results) Chart(ctx context.Context, png string) error {
	gp := lab.ToolPath("gnuplot")
	if gp == "" {
		return errors.New("gnuplot not found: run iketcp-lab deps (apt-get install gnuplot-nox)")
	}
	dir, err := os.MkdirTemp("", "iketcp-chart-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	abs, err := filepath.Abs(png)
	if err != nil {
		return err
	}
	var plots []string
	for i, p := range r.Paths {
		var b strings.Builder
		for _, t := range r.targets() {
			if s, ok := r.step(p, t); ok && s.Delivered > 0 {
				fmt.Fprintf(&b, "%g\t%g\n", s.Offered, s.Delivered)
			}
		}
		f := filepath.Join(dir, fmt.Sprintf("path%d.tsv", i))
		if err := os.WriteFile(f, []byte(b.String()), 0o644); err != nil {
			return err
		}
		plots = append(plots, fmt.Sprintf("%s using 1:2 with linespoints lw 2 pt 7 title %s", gpString(f), gpString(p)))
	}
	plots = append(plots, `x with lines dt 2 lc rgb "gray50" title "offered = delivered"`)
	var lb strings.Builder
	var xtics []string
	for i, l := range r.Loaded {
		label := l.Path
		if l.Path == LoadedPlainUDP {
			label = "plain UDP"
		}
		fmt.Fprintf(&lb, "%g\t%g\n", float64(l.RTTs.Quantile(0.5))/1e6, float64(l.RTTs.Quantile(0.99))/1e6)
		// xtics labels are formats: a literal % is %%.
		xtics = append(xtics, fmt.Sprintf("%s %d", gpString(label+"\\n"+strings.ReplaceAll(pct(l.Loss()), "%", "%%")+" loss"), i))
	}
	loaded := filepath.Join(dir, "loaded.tsv")
	if err := os.WriteFile(loaded, []byte(lb.String()), 0o644); err != nil {
		return err
	}
	title := fmt.Sprintf("iketcp bench: %s, %d cores, Linux %s; %s", r.Machine.CPU, r.Machine.Cores, r.Machine.Kernel, r.Iketcp)
	script := fmt.Sprintf(`set terminal pngcairo size 1400,560 font "sans,10"
set output %s
set datafile separator "\t"
set multiplot layout 1,2 title %s
set title "Delivered against offered, 1400-byte datagrams (rightmost point: flat out)"
set logscale xy
set xlabel "offered, datagrams/s"
set ylabel "delivered, datagrams/s"
set format x "%%.0s%%c"
set format y "%%.0s%%c"
set key top left
set grid
plot %s
unset logscale
set format x "%%g"
set format y "%%g"
set title "Ping round trip under load: 20 Mbit/s bottleneck, 40 Mbit/s flood"
set ylabel "ms"
set xlabel ""
set yrange [0:*]
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set key top left
set grid ytics
set bmargin 5
set xtics (%s)
set offsets 0, 0, graph 0.08, 0
plot %s using 1 title "p50", '' using 2 title "p99", \
     '' using ($0-1/6.):1:(sprintf("%%.0f", $1)) with labels offset 0,0.7 notitle, \
     '' using ($0+1/6.):2:(sprintf("%%.0f", $2)) with labels offset 0,0.7 notitle
unset multiplot
`, gpString(abs), gpString(title), strings.Join(plots, ", \\\n     "), strings.Join(xtics, ", "), gpString(loaded))
	if len(r.Loaded) == 0 {
		// Nothing to draw on the right: only the first panel.
		script = strings.Replace(script, "set multiplot layout 1,2", "set multiplot layout 1,1", 1)
		script = script[:strings.Index(script, "unset logscale")] + "unset multiplot\n"
	}
	sf := filepath.Join(dir, "chart.gp")
	if err := os.WriteFile(sf, []byte(script), 0o644); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, gp, sf)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("gnuplot: %w: %s", err, out)
	}
	return nil
}

// gpString quotes s for gnuplot (double quotes: \n is a line break).
func gpString(s string) string {
	return `"` + strings.NewReplacer(`"`, `\"`).Replace(s) + `"`
}
