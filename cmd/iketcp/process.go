package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"
)

// Exit codes, as the README documents them.
const (
	exitOK     = 0 // stopped by SIGTERM or SIGINT, after draining and removing what it installed
	exitFailed = 1 // failed while starting or running
	exitConfig = 2 // bad flags, environment or configuration file: nothing was started
)

// exitCode is the exit code for what a command returned.
func exitCode(err error) int {
	var ce *configError
	var coded cli.ExitCoder
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ce):
		return exitConfig
	case errors.As(err, &coded):
		return coded.ExitCode()
	}
	return exitFailed
}

// need records that an instance keeps n once everything is set up.
func (p *proc) need(n capNeed) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, have := range p.needs {
		if have.name == n.name && have.why == n.why {
			return
		}
	}
	p.needs = append(p.needs, n)
}

// proc is what the relays of one process share: the logger, whose level
// SIGHUP may change; the metrics endpoint; the signals that stop and
// reload it.
type proc struct {
	log     *slog.Logger
	level   *slog.LevelVar
	metrics *metricsServer // nil without --metrics
	sigs    chan os.Signal // SIGTERM, SIGINT, SIGHUP from newProc on: one that comes while relays start waits for run

	mu      sync.Mutex // guards the following
	drains  []func(context.Context)
	reloads []func(old, new *instance)
	needs   []capNeed // the capabilities the instances keep once set up
	ins     []*instance
}

// newProc sets up logging and --metrics for the instances ins of c.
func newProc(c *cli.Context, ins []*instance) (*proc, error) {
	first := ins[0].ctx
	level := new(slog.LevelVar)
	log, err := newLogger(first, os.Stderr, level)
	if err != nil {
		return nil, err
	}
	p := &proc{log: log, level: level, ins: ins, sigs: make(chan os.Signal, 4)}
	if addr := first.String("metrics"); addr != "" {
		if p.metrics, err = startMetrics(addr, log); err != nil {
			return nil, err
		}
	}
	signal.Notify(p.sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	return p, nil
}

// close stops what newProc started: the metrics endpoint and the signal
// handling. The caller defers it.
func (p *proc) close() {
	signal.Stop(p.sigs)
	if p.metrics != nil {
		p.metrics.close()
	}
}

// onDrain adds what to do when SIGTERM asks the process to stop: stop
// taking new work and let what is in flight out, within ctx.
func (p *proc) onDrain(f func(context.Context)) {
	p.mu.Lock()
	p.drains = append(p.drains, f)
	p.mu.Unlock()
}

// onReload adds what to do with a changed configuration on SIGHUP.
func (p *proc) onReload(f func(old, new *instance)) {
	p.mu.Lock()
	p.reloads = append(p.reloads, f)
	p.mu.Unlock()
}

// run runs the instances' relays until one fails, or a signal stops the
// process: SIGTERM and SIGINT drain within --shutdown-timeout, then stop;
// SIGHUP reloads the configuration. run returns once every relay has
// returned, having removed what it installed.
func (p *proc) run(c *cli.Context, relays []func(context.Context) error) error {
	// Every instance is set up: the process keeps only the capabilities
	// they still need (capabilities belong to the process, not to one
	// instance).
	p.mu.Lock()
	needs := p.needs
	p.mu.Unlock()
	dropCapabilities(p.log, needs)
	ctx, cancel := context.WithCancel(c.Context)
	defer cancel()
	sigs := p.sigs

	errs := make(chan error, len(relays))
	for _, r := range relays {
		go func() { errs <- r(ctx) }()
	}
	if p.metrics != nil {
		p.metrics.setReady(true)
	}
	bound := p.ins[0].ctx.Duration("shutdown-timeout")
	var first error
	var draining sync.WaitGroup
	defer func() {
		cancel() // the drain ends with ctx
		draining.Wait()
	}()
	pending := len(relays)
	stopping := false
	for pending > 0 {
		select {
		case err := <-errs:
			pending--
			if err != nil && first == nil {
				first = err
			}
			cancel() // one relay ending ends them all
		case s := <-sigs:
			if s == syscall.SIGHUP {
				p.reload(c)
				continue
			}
			if stopping {
				p.log.Warn("second signal: stopping without waiting for the drain", "signal", s.String())
				cancel()
				continue
			}
			stopping = true
			if p.metrics != nil {
				p.metrics.setReady(false)
			}
			draining.Add(1)
			go func() {
				defer draining.Done()
				p.drain(ctx, s, bound)
				cancel()
			}()
		}
	}
	return first
}

// drain runs every drain hook at once, within bound.
func (p *proc) drain(ctx context.Context, s os.Signal, bound time.Duration) {
	start := time.Now()
	p.log.Info("draining: new connections and flows are refused, queued frames go out", "signal", s.String(), "within", bound.String())
	dctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	p.mu.Lock()
	drains := slices.Clone(p.drains)
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, d := range drains {
		wg.Add(1)
		go func() { defer wg.Done(); d(dctx) }()
	}
	wg.Wait()
	if dctx.Err() != nil && ctx.Err() == nil {
		p.log.Warn("drain cut short by --shutdown-timeout: what was still queued is dropped", "after", time.Since(start).Round(time.Millisecond).String())
		return
	}
	p.log.Info("drained", "in", time.Since(start).Round(time.Millisecond).String())
}

// reload reads the configuration file again and applies what may change
// while sessions run; it logs every change that needs a restart.
func (p *proc) reload(c *cli.Context) {
	path := p.ins[0].ctx.String("config")
	if path == "" {
		p.log.Info("SIGHUP: no --config file to reload; TLS certificates are reloaded where configured")
		return
	}
	file, err := readConfigFile(path, c.Command.Name, roleFlags)
	var ins []*instance
	if err == nil {
		ins, err = buildInstances(c, c.Command, cmdArgs(c), file)
	}
	if err == nil {
		for _, in := range ins {
			if err = in.located(checkInstance(c.Command.Name, in.ctx)); err != nil {
				break
			}
		}
	}
	if err != nil {
		p.log.Error("SIGHUP: the configuration file was not reloaded; the running configuration stays", "err", err)
		return
	}
	p.mu.Lock()
	old := p.ins
	reloads := slices.Clone(p.reloads)
	p.mu.Unlock()
	if len(ins) != len(old) {
		p.log.Warn("SIGHUP: the file's tunnels changed in number; tunnels are added or removed only by a restart",
			"running", len(old), "in_file", len(ins))
	}
	for i, nw := range ins {
		if i >= len(old) {
			break
		}
		o := old[i]
		if o.name != nw.name {
			p.log.Warn("SIGHUP: a tunnel was renamed or moved; restart to apply", "running", o.name, "in_file", nw.name)
			continue
		}
		for _, name := range changedFlags(o, nw) {
			if !slices.Contains(reloadable(c.Command.Name), name) {
				p.log.Warn("SIGHUP: this setting takes a restart; the running value stays", "tunnel", o.name, "key", name,
					"running", fmt.Sprint(o.ctx.Value(name)), "in_file", fmt.Sprint(nw.ctx.Value(name)))
			}
		}
		if i == 0 {
			if lv := nw.ctx.String("log-level"); lv != o.ctx.String("log-level") {
				var l slog.Level
				l.UnmarshalText([]byte(lv)) // checked above
				p.level.Set(l)
				p.log.Info("SIGHUP: log level changed", "level", lv)
			}
		}
		for _, r := range reloads {
			r(o, nw)
		}
	}
	p.mu.Lock()
	for i := range min(len(ins), len(old)) {
		if old[i].name == ins[i].name {
			p.ins[i] = ins[i]
		}
	}
	p.mu.Unlock()
	p.log.Info("SIGHUP: configuration reloaded", "file", path)
}

// reloadable lists what SIGHUP applies without a restart for a command.
func reloadable(cmd string) []string {
	r := []string{"log-level"}
	if cmd == "server" {
		r = append(r, serverLimits...)
	}
	return r
}

// changedFlags lists the flags whose effective value differs.
func changedFlags(a, b *instance) []string {
	var out []string
	for _, f := range a.ctx.Command.Flags {
		n := f.Names()[0]
		if fmt.Sprint(a.ctx.Value(n)) != fmt.Sprint(b.ctx.Value(n)) {
			out = append(out, n)
		}
	}
	return out
}
