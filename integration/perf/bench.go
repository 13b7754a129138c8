// Package perf measures iketcp as whole processes, as a user runs them,
// against the best baseline the machine offers, in one run: the harness
// behind `iketcp-lab bench`.
//
// It builds network namespaces with package lab and measures:
//
//   - each path between two namespaces joined by one veth pair: direct
//     UDP (the baseline), iketcp in RFC 9329 and in fake-TCP mode, and
//     Debian's udptunnel (the same length framing over TCP, the outside
//     baseline): delivered datagrams/s and loss at offered rates and flat
//     out, the relays' CPU per datagram, and the one-in-flight round trip;
//   - latency under load: a real strongSwan tunnel through a 20 Mbit/s
//     bottleneck flooded at 40 Mbit/s, pings beside the flood;
//   - a scale ladder: one iketcp server with up to 10,000 sessions,
//     memory per session and CPU per datagram.
//
// The blaster and the sink are this process's own sockets, opened inside
// the namespaces; they move datagrams with sendmmsg/recvmmsg and UDP
// GSO/GRO, in the mode that delivered most on direct UDP (every mode is
// measured first, and reported).
package perf

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// LabPrefix names the harness's namespaces, apart from the tests'.
const LabPrefix = "iktcbench"

// Config configures Run. The zero value (with Iketcp set) is the full run.
type Config struct {
	// Iketcp is the iketcp binary to measure.
	Iketcp string
	// UDPTunnel is Debian's udptunnel; found in $PATH if empty.
	UDPTunnel string
	// Quick is the smoke mode: fewer and shorter steps, two rungs of the
	// scale ladder, fewer pings, well under a minute in all.
	Quick bool
	// Log receives progress lines; nil discards them.
	Log io.Writer
	// Commit names the code measured (the harness adds iketcp's own
	// version).
	Commit string
}

// plan is what a run measures.
type plan struct {
	rates        []float64 // offered rates; 0 is flat out
	step         time.Duration
	calibrate    time.Duration
	roundTrips   int
	pings        int
	scale        []int
	scaleRate    float64
	scaleFor     time.Duration
	pingPongTime time.Duration // bound on one path's ping-pong
	idle         time.Duration // how long the relays' idle CPU is measured
}

func (c Config) plan() plan {
	if c.Quick {
		return plan{
			rates: []float64{25_000, 100_000, 0}, step: 600 * time.Millisecond, calibrate: 400 * time.Millisecond,
			roundTrips: 200, pings: 20, scale: []int{1, 100}, scaleRate: 5_000, scaleFor: 600 * time.Millisecond,
			pingPongTime: 10 * time.Second, idle: 500 * time.Millisecond,
		}
	}
	return plan{
		rates: []float64{25_000, 50_000, 100_000, 200_000, 400_000, 0}, step: 3 * time.Second, calibrate: 2 * time.Second,
		roundTrips: 2000, pings: 100, scale: []int{1, 100, 1000, 10_000}, scaleRate: 20_000, scaleFor: 3 * time.Second,
		pingPongTime: 60 * time.Second, idle: 2 * time.Second,
	}
}

// Machine describes where the run happened.
type Machine struct {
	CPU, Kernel, Go string
	Cores           int
	// LoadBefore and LoadAfter are /proc/loadavg's 1- and 5-minute load
	// averages when the run started and ended: other work on the machine
	// makes the figures noisier (the ratios less so).
	LoadBefore, LoadAfter string
}

// Calibration is the blaster and the sink against each other on direct
// UDP, flat out, in one I/O mode.
type Calibration struct {
	Mode IOMode
	Step Step
	// Messages is how many messages the kernel handed the sink per
	// datagram (below 1 with GRO).
	MessagesPerDatagram float64
}

// RoundTrip is the one-in-flight round trip of one path.
type RoundTrip struct {
	Path string
	RTTs RTTs
}

// Results is everything one run measured.
type Results struct {
	Started  time.Time
	Took     time.Duration
	Quick    bool
	Machine  Machine
	Commit   string
	Iketcp   string // `iketcp version`
	Baseline IOMode // the blaster's and sink's mode on every path

	Calibrations []Calibration
	// TCPCeiling is one plain TCP stream over the same veth: what no
	// encapsulation in one TCP connection can exceed here.
	TCPCeiling *TCPCeiling
	Paths      []string
	// IdleCores is each path's relays' CPU in cores with no traffic.
	IdleCores  map[string]float64
	Steps      []Step
	RoundTrips []RoundTrip
	Loaded     []Loaded
	Scale      []Scale
	// Errors are the parts that failed; the others are still reported.
	Errors []string
}

// Run measures everything and returns the results; parts that fail are
// listed in Results.Errors, and Run returns an error too.
func Run(ctx context.Context, cfg Config) (*Results, error) {
	if cfg.Iketcp == "" {
		return nil, errors.New("perf: no iketcp binary given")
	}
	if cfg.UDPTunnel == "" {
		cfg.UDPTunnel = lab.ToolPath("udptunnel")
		if cfg.UDPTunnel == "" {
			return nil, errors.New("udptunnel not found: run iketcp-lab deps (apt-get install udptunnel)")
		}
	}
	if reason := lab.MissingRequirements(); reason != "" {
		return nil, errors.New(reason)
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	p := cfg.plan()
	res := &Results{Started: time.Now(), Quick: cfg.Quick, Machine: machine(), Commit: cfg.Commit}
	if out, err := exec.Command(cfg.Iketcp, "version").Output(); err == nil {
		res.Iketcp = strings.TrimSpace(string(out))
	} else {
		return nil, fmt.Errorf("%s version: %w", cfg.Iketcp, err)
	}
	logf := func(format string, args ...any) { fmt.Fprintf(cfg.Log, format+"\n", args...) }
	fail := func(part string, err error) {
		logf("%s: FAILED: %v", part, err)
		res.Errors = append(res.Errors, part+": "+err.Error())
	}
	dir, err := os.MkdirTemp("", "iketcp-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	opts := lab.Options{Dir: dir, Prefix: LabPrefix, Logf: func(string, ...any) {}}

	if err := runPaths(ctx, cfg, p, opts, res, logf); err != nil {
		fail("paths", err)
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	for _, v := range []string{LoadedPlainUDP, LoadedRFC9329, LoadedFakeTCP} {
		logf("latency under load: %s", v)
		r, err := runLoaded(ctx, opts, cfg.Iketcp, v, p.pings)
		if err != nil {
			fail("latency under load, "+v, err)
			continue
		}
		logf("  ping p50 %v p99 %v, loss %.0f%%, flood %.1f of %.1f Mbit/s delivered", r.RTTs.Quantile(0.5), r.RTTs.Quantile(0.99),
			100*r.Loss(), r.FloodDelivered/1e6, r.FloodOffered/1e6)
		res.Loaded = append(res.Loaded, r)
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if err := runScaleLadder(ctx, cfg, p, opts, res, logf); err != nil {
		fail("scale ladder", err)
	}
	res.Took = time.Since(res.Started)
	res.Machine.LoadAfter = loadavg()
	if len(res.Errors) > 0 {
		return res, fmt.Errorf("%d part(s) failed: %s", len(res.Errors), strings.Join(res.Errors, "; "))
	}
	return res, ctx.Err()
}

// runPaths builds a Pair lab, calibrates the blaster and the sink on
// direct UDP, then brings every path up and takes turns between them at
// each offered rate.
func runPaths(ctx context.Context, cfg Config, p plan, opts lab.Options, res *Results, logf func(string, ...any)) error {
	opts.Pair = true
	setup, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	l, err := lab.New(setup, opts)
	if err != nil {
		return err
	}
	defer l.Close()

	logf("baseline: the blaster and the sink against each other on direct UDP, flat out, %v each", p.calibrate)
	modes := []IOMode{{Batch: 1}, {Batch: 64}, {Batch: 64, GSO: true}, {Batch: 64, GSO: true, GRO: true}}
	best := -1
	for _, m := range modes {
		path, err := openDirect(l, m)
		if err != nil {
			logf("  %v: unavailable: %v", m, err)
			continue
		}
		st, err := runStep(ctx, path, 0, p.calibrate)
		msgs := path.Sink.Messages()
		dgs := path.Sink.Datagrams()
		path.Close()
		if err != nil {
			return err
		}
		c := Calibration{Mode: m, Step: st}
		if dgs > 0 {
			c.MessagesPerDatagram = float64(msgs) / float64(dgs)
		}
		res.Calibrations = append(res.Calibrations, c)
		logf("  %-40v offered %9.0f/s  delivered %9.0f/s  loss %5.1f%%  harness %v/datagram", m, st.Offered, st.Delivered, 100*st.Loss, st.HarnessCPU)
		if best < 0 || st.Delivered > res.Calibrations[best].Step.Delivered {
			best = len(res.Calibrations) - 1
		}
	}
	if best < 0 {
		return errors.New("no I/O mode works on direct UDP")
	}
	mode := res.Calibrations[best].Mode
	res.Baseline = mode
	logf("baseline mode: %v", mode)
	if c, err := measureTCPCeiling(ctx, l, p.calibrate); err != nil {
		res.Errors = append(res.Errors, err.Error())
		logf("%v", err)
	} else {
		res.TCPCeiling = &c
		logf("one plain TCP stream over the veth: %.0f MB/s, %.0f datagrams/s of %d bytes, %v of CPU per datagram", c.BytesPerSecond/1e6, c.Datagrams, DatagramSize, c.CPU)
	}

	var paths []*Path
	defer func() {
		for _, path := range paths {
			if err := path.Close(); err != nil {
				logf("closing %s: %v", path.Name, err)
			}
		}
	}()
	open := []func() (*Path, error){
		func() (*Path, error) { return openDirect(l, mode) },
		func() (*Path, error) { return openIketcp(setup, l, cfg.Iketcp, false, mode) },
		func() (*Path, error) { return openIketcp(setup, l, cfg.Iketcp, true, mode) },
		func() (*Path, error) { return openUDPTunnel(setup, l, cfg.UDPTunnel, mode) },
	}
	for _, o := range open {
		path, err := o()
		if err != nil {
			return err
		}
		paths = append(paths, path)
		res.Paths = append(res.Paths, path.Name)
	}

	idle, err := idleCores(paths, p.idle)
	if err != nil {
		return err
	}
	res.IdleCores = idle
	for name, c := range idle {
		logf("idle %-16s relays use %.3f cores", name, c)
	}
	for _, path := range paths {
		path.Sink.SetEcho(true)
		pctx, cancel := context.WithTimeout(ctx, p.pingPongTime)
		r, err := path.Blaster.PingPong(pctx, p.roundTrips, time.Second)
		cancel()
		path.Sink.SetEcho(false)
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%s: round trips: %w", path.Name, err)
		}
		res.RoundTrips = append(res.RoundTrips, RoundTrip{Path: path.Name, RTTs: r})
		logf("round trip %-16s p50 %8v  p99 %8v  (%d of %d, %d lost)", path.Name, r.Quantile(0.5), r.Quantile(0.99), len(r.Sorted), p.roundTrips, r.Lost)
		drain(ctx, path.Sink)
	}

	for _, rate := range p.rates {
		for _, path := range paths {
			st, err := runStep(ctx, path, rate, p.step)
			if err != nil {
				return err
			}
			res.Steps = append(res.Steps, st)
			logf("%-16s %-9s offered %9.0f/s  delivered %9.0f/s  loss %5.1f%%  relay %7v/datagram, %.2f cores",
				path.Name, rateName(rate), st.Offered, st.Delivered, 100*st.Loss, st.RelayCPU, st.RelayCores)
		}
	}
	return nil
}

func rateName(r float64) string {
	if r == 0 {
		return "flat out"
	}
	return fmt.Sprintf("%.0fk/s", r/1000)
}

// runScaleLadder runs each rung of the scale ladder on a fresh server in
// one namespace.
func runScaleLadder(ctx context.Context, cfg Config, p plan, opts lab.Options, res *Results, logf func(string, ...any)) error {
	opts.Pair = true
	setup, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	l, err := lab.New(setup, opts)
	if err != nil {
		return err
	}
	defer l.Close()
	backend, err := NewSink(l.Hub, SinkConfig{Local: netipLoopback(scaleBackendPort), Mode: IOMode{Batch: 64}, AnswerIKE: true})
	if err != nil {
		return err
	}
	defer backend.Close()
	for _, n := range p.scale {
		logf("scale: %d session(s)", n)
		r, err := runScale(ctx, l.Hub, l.Dir, cfg.Iketcp, backend, n, p.scaleRate, p.scaleFor)
		if err != nil {
			return err
		}
		logf("  opened in %v; RSS %s -> %s (%s/session), after traffic %s/session; %.0f of %.0f datagrams/s delivered, server %v/datagram",
			r.Open.Round(time.Millisecond), kib(r.RSSBefore), kib(r.RSSOpen), kib(int64(r.PerSession())), kib(int64(r.PerSessionTraffic())),
			r.Delivered, r.Rate, r.CPU)
		res.Scale = append(res.Scale, r)
	}
	return nil
}

func kib(b int64) string {
	if b >= 10<<20 || b <= -10<<20 {
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%.1f KiB", float64(b)/1024)
}

// machine describes this machine.
func machine() Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	m.LoadBefore = loadavg()
	return m
}

// loadavg returns the 1- and 5-minute load averages, "1.02 0.87".
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return "?"
	}
	return f[0] + " " + f[1]
}
