package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/integration/perf"
)

func benchCommand() *cli.Command {
	return &cli.Command{
		Name: "bench",
		Usage: "measure iketcp as whole processes against direct UDP and udptunnel, under load and at scale; " +
			"write OUT/bench.md, OUT/bench.png and OUT/bench.json and print the table (needs root)",
		UsageText: "iketcp-lab bench [--quick] [--iketcp PATH] [--out DIR]\n\n" +
			"Examples:\n\n" +
			"   iketcp-lab bench --iketcp bin/iketcp --out docs   # the end of make bench\n" +
			"   iketcp-lab bench --quick --out /tmp/bench          # a 35-second smoke run",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "iketcp", Value: defaultBinary(), Usage: "the iketcp binary to measure"},
			&cli.StringFlag{Name: "out", Value: "docs", Usage: "directory for bench.md, bench.png and bench.json"},
			&cli.BoolFlag{Name: "quick", Usage: "smoke mode: short steps and few samples, well under a minute (figures not for reading)"},
			&cli.DurationFlag{Name: "timeout", Value: 20 * time.Minute, Usage: "give up after this long"},
		},
		Action: runBench,
	}
}

func runBench(c *cli.Context) error {
	bin, err := exec.LookPath(c.String("iketcp"))
	if err != nil {
		return fmt.Errorf("iketcp binary %q: %w (run make build)", c.String("iketcp"), err)
	}
	if bin, err = filepath.Abs(bin); err != nil {
		return err
	}
	out := c.String("out")
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	res, runErr := perf.Run(ctx, perf.Config{
		Iketcp: bin,
		Quick:  c.Bool("quick"),
		Log:    os.Stderr,
		Commit: commit(ctx),
	})
	if res == nil {
		return runErr
	}
	md := res.Markdown()
	fmt.Println(md)
	var errs []error
	if err := os.WriteFile(filepath.Join(out, "bench.md"), []byte(md), 0o644); err != nil {
		errs = append(errs, err)
	}
	if js, err := json.MarshalIndent(res, "", "  "); err != nil {
		errs = append(errs, err)
	} else if err := os.WriteFile(filepath.Join(out, "bench.json"), append(js, '\n'), 0o644); err != nil {
		errs = append(errs, err)
	}
	chartCtx, cancelChart := context.WithTimeout(context.Background(), time.Minute)
	defer cancelChart()
	if err := res.Chart(chartCtx, filepath.Join(out, "bench.png")); err != nil {
		errs = append(errs, err)
	}
	fmt.Fprintf(os.Stderr, "wrote %s, %s and %s in %v\n", filepath.Join(out, "bench.md"), filepath.Join(out, "bench.png"),
		filepath.Join(out, "bench.json"), res.Took.Round(time.Second))
	return errors.Join(append(errs, runErr)...)
}

// commit names the checkout the harness runs in: the commit, and "dirty"
// if it has changes.
func commit(ctx context.Context) string {
	out, err := exec.CommandContext(ctx, "git", "describe", "--always", "--dirty", "--abbrev=12").Output()
	if err != nil {
		return "unknown (not a git checkout)"
	}
	return strings.TrimSpace(string(out))
}
