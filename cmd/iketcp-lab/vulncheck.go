package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"github.com/urfave/cli/v2"
)

// vulncheckCommand runs govulncheck over the module against a local
// vulnerability database, and fails on any vulnerability the code calls
// that the project can fix itself (a module it requires). A called
// vulnerability of the standard library that only a newer Go fixes than
// the toolchain at hand (GOTOOLCHAIN=local) is listed, with the version
// that fixes it, and does not fail: the fix is a toolchain upgrade.
func vulncheckCommand() *cli.Command {
	return &cli.Command{
		Name:      "vulncheck",
		Usage:     "govulncheck the module: fail on called vulnerabilities in required modules, list the standard library's",
		ArgsUsage: "[packages]",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "govulncheck", Value: "govulncheck", Usage: "the govulncheck binary"},
			&cli.StringFlag{Name: "db", Required: true, Usage: "a local vulnerability database (a directory in the vuln.go.dev layout)"},
		},
		Action: runVulncheck,
	}
}

// vulnFinding is the part of a govulncheck JSON finding we read.
type vulnFinding struct {
	OSV          string `json:"osv"`
	FixedVersion string `json:"fixed_version"`
	Trace        []struct {
		Module   string `json:"module"`
		Version  string `json:"version"`
		Package  string `json:"package"`
		Function string `json:"function"`
		Receiver string `json:"receiver"`
	} `json:"trace"`
}

func runVulncheck(c *cli.Context) error {
	pkgs := c.Args().Slice()
	if len(pkgs) == 0 {
		pkgs = []string{"./..."}
	}
	db := c.String("db")
	if !strings.Contains(db, "://") {
		abs, err := filepath.Abs(db)
		if err != nil {
			return err
		}
		db = "file://" + abs
	}
	args := append([]string{"-db", db, "-format", "json"}, pkgs...)
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(c.Context, c.String("govulncheck"), args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("govulncheck: %w\n%s", err, errOut.String())
	}
	called, err := calledFindings(&out)
	if err != nil {
		return err
	}
	toolchain := "v" + strings.TrimPrefix(runtime.Version(), "go")
	var fail []string
	for _, f := range called {
		t := f.Trace[0]
		where := fmt.Sprintf("%s %s (%s@%s; fixed in %s)", f.OSV, t.Package+"."+t.Function, t.Module, t.Version, orNone(f.FixedVersion))
		switch {
		case t.Module == "stdlib" && f.FixedVersion != "" && newerGo(f.FixedVersion, toolchain):
			fmt.Printf("vulncheck: standard library, fixed only in a newer Go than this toolchain (%s): %s\n", runtime.Version(), where)
		default:
			fail = append(fail, where)
		}
	}
	if len(fail) > 0 {
		return fmt.Errorf("vulncheck: the code calls vulnerabilities the project can fix (upgrade the module in go.mod):\n  %s", strings.Join(fail, "\n  "))
	}
	fmt.Printf("vulncheck: no called vulnerability in the module's dependencies (%d in the standard library, listed above)\n", len(called))
	return nil
}

// calledFindings reads govulncheck's JSON stream and returns one finding
// per vulnerability whose trace reaches a function (the code calls it),
// sorted by ID.
func calledFindings(r io.Reader) ([]vulnFinding, error) {
	dec := json.NewDecoder(r)
	byID := map[string]vulnFinding{}
	for {
		var msg struct {
			Finding *vulnFinding `json:"finding"`
		}
		if err := dec.Decode(&msg); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("reading govulncheck's output: %w", err)
		}
		if f := msg.Finding; f != nil && len(f.Trace) > 0 && f.Trace[0].Function != "" {
			byID[f.OSV] = *f
		}
	}
	out := make([]vulnFinding, 0, len(byID))
	for _, f := range byID {
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].OSV < out[j].OSV })
	return out, nil
}

func orNone(s string) string {
	if s == "" {
		return "no release yet"
	}
	return s
}

// newerGo reports whether Go version a (v1.26.9) is newer than b
// (v1.26.8); a pre-release or malformed part counts as 0.
func newerGo(a, b string) bool {
	pa, pb := goVersionParts(a), goVersionParts(b)
	for i := range pa {
		if pa[i] != pb[i] {
			return pa[i] > pb[i]
		}
	}
	return false
}

func goVersionParts(v string) [3]int {
	var p [3]int
	v, _, _ = strings.Cut(strings.TrimPrefix(v, "v"), "-")
	for i, f := range strings.SplitN(v, ".", 3) {
		n := 0
		for _, r := range f {
			if r < '0' || r > '9' {
				break
			}
			n = n*10 + int(r-'0')
		}
		p[i] = n
	}
	return p
}
