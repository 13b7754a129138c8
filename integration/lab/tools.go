package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// CharonPath is where Debian's charon-systemd package installs the daemon.
const CharonPath = "/usr/sbin/charon-systemd"

// DebianPackages are the packages that provide every tool the lab uses.
var DebianPackages = []string{
	"strongswan-swanctl", "charon-systemd", "libcharon-extra-plugins",
	"iputils-ping", "tcpdump", "nftables", "iproute2", "iptables",
	// For iketcp-lab bench: the outside baseline and the chart.
	"udptunnel", "gnuplot-nox",
}

// requiredTools are the programs the lab runs, in the order MissingTools
// reports them.
var requiredTools = []string{"ip", "nft", "charon-systemd", "swanctl", "tcpdump", "ss", "ping", "iptables-legacy"}

// benchTools are the programs only iketcp-lab bench runs: Debian's
// udptunnel, the outside baseline, and gnuplot, which draws the chart.
var benchTools = []string{"udptunnel", "gnuplot"}

// toolDirs are searched after $PATH: test runners and CI often start with a
// PATH that lacks the sbin directories.
var toolDirs = []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"}

// toolPath returns the absolute path of a tool, or "" when it is not
// installed.
func toolPath(name string) string {
	if name == "charon-systemd" {
		if isExecutable(CharonPath) {
			return CharonPath
		}
		return ""
	}
	if p, err := exec.LookPath(name); err == nil {
		if abs, err := filepath.Abs(p); err == nil {
			return abs
		}
		return p
	}
	for _, dir := range toolDirs {
		p := filepath.Join(dir, name)
		if isExecutable(p) {
			return p
		}
	}
	return ""
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// mustTool returns the path of a tool or an error telling the user how to
// install it.
func mustTool(name string) (string, error) {
	if p := toolPath(name); p != "" {
		return p, nil
	}
	return "", fmt.Errorf("%s not found: run make deps (apt-get install %s)", name, strings.Join(DebianPackages, " "))
}

// MissingTools reports which of the programs the lab needs (ip, nft,
// charon-systemd, swanctl, tcpdump, ss, ping) are not installed.
// charon-systemd is looked for at [CharonPath]; the others in $PATH and the
// usual sbin/bin directories.
func MissingTools() []string {
	var missing []string
	for _, name := range requiredTools {
		if toolPath(name) == "" {
			missing = append(missing, name)
		}
	}
	return missing
}

// MissingBenchTools reports which of the programs that only the
// benchmark harness needs (udptunnel, gnuplot) are not installed.
func MissingBenchTools() []string {
	var missing []string
	for _, name := range benchTools {
		if toolPath(name) == "" {
			missing = append(missing, name)
		}
	}
	return missing
}

// ToolPath returns the absolute path of an installed tool, or "" when it
// is not installed.
func ToolPath(name string) string { return toolPath(name) }

// InstallPackages installs [DebianPackages] with apt-get (update, then
// install -y, non-interactively), writing apt's output to out. It needs root.
func InstallPackages(ctx context.Context, out io.Writer) error {
	if os.Geteuid() != 0 {
		return errors.New("installing the lab's packages needs root: run make deps as root")
	}
	if out == nil {
		out = io.Discard
	}
	aptGet := toolPath("apt-get")
	if aptGet == "" {
		return errors.New("apt-get not found: install these packages by hand: " + strings.Join(DebianPackages, " "))
	}
	steps := [][]string{
		{"update"},
		append([]string{"install", "-y"}, DebianPackages...),
	}
	for _, args := range steps {
		cmd := exec.CommandContext(ctx, aptGet, args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout = out
		cmd.Stderr = out
		cmd.WaitDelay = waitDelay
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("apt-get %s: %w", strings.Join(args, " "), err)
		}
	}
	return nil
}

// MissingRequirements describes what keeps the lab from running here (root,
// tools), or returns "" when nothing is missing.
func MissingRequirements() string {
	missing := MissingTools()
	root := os.Geteuid() == 0
	switch {
	case root && len(missing) == 0:
		return ""
	case !root && len(missing) == 0:
		return "integration tests need root (run them as root)"
	case !root:
		return "integration tests need root and: " + strings.Join(missing, ", ") + " (install with make deps, then run as root)"
	default:
		return "integration tests need root and: " + strings.Join(missing, ", ") + " (install with make deps)"
	}
}

// Require skips the test when the lab cannot run here (not root, or tools
// missing). When the environment variable CI is "true" it fails the test
// instead, so that a CI machine without the tools does not pass silently.
func Require(t testing.TB) {
	t.Helper()
	reason := MissingRequirements()
	if reason == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s", reason)
	}
	t.Skipf("%s", reason)
}
