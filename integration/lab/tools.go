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

// DebianPackages are the packages that provide every tool the lab uses:
// strongSwan and the network tools, and the third parties the front door
// meets (haproxy in front of the server, nginx behind it, tinyproxy on the
// carrier, curl as a browser). Of tinyproxy only the executable: its
// service package would start a proxy in the host's namespace. The
// services of haproxy and nginx are kept from starting while they install
// (see InstallPackages); the lab runs its own instances in its namespaces.
var DebianPackages = []string{
	"strongswan-swanctl", "charon-systemd", "libcharon-extra-plugins",
	"iputils-ping", "tcpdump", "nftables", "iproute2", "iptables",
	"haproxy", "nginx", "tinyproxy-bin", "curl",
	// For iketcp-lab bench: the outside baseline and the chart.
	"udptunnel", "gnuplot-nox",
	// promtool, which checks what --metrics serves (its service kept from
	// starting as the others').
	"prometheus",
	// For deploy's tests: systemd-analyze checks the units, podman builds
	// the image (crun and uidmap come with it).
	"systemd", "podman",
	// For the fault tests: flushing the carrier NAT's mappings; and
	// setpriv, for the privilege tests (Essential in Debian, listed for
	// hosts that trimmed it).
	"conntrack", "util-linux",
}

// requiredTools are the programs the lab runs, in the order MissingTools
// reports them.
var requiredTools = []string{"ip", "nft", "charon-systemd", "swanctl", "tcpdump", "ss", "ping", "iptables-legacy",
	"haproxy", "nginx", "tinyproxy", "curl", "promtool"}

// benchTools are the programs only iketcp-lab bench runs: Debian's
// udptunnel, the outside baseline, and gnuplot, which draws the chart.
var benchTools = []string{"udptunnel", "gnuplot"}

// packagingTools are the programs only deploy's tests run: systemd-analyze
// verifies the units, podman builds the container image.
var packagingTools = []string{"systemd-analyze", "podman"}

// MissingPackagingTools reports which of the programs deploy's tests need
// (systemd-analyze, podman) are not installed.
func MissingPackagingTools() []string {
	var missing []string
	for _, name := range packagingTools {
		if toolPath(name) == "" {
			missing = append(missing, name)
		}
	}
	return missing
}

// faultTools are the programs only the fault and privilege tests run:
// conntrack, which makes the carrier's NAT forget its mappings
// (RebindNAT), and setpriv, which starts iketcp as an ordinary user with
// chosen capabilities (Privileges).
var faultTools = []string{"conntrack", "setpriv"}

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
// charon-systemd, swanctl, tcpdump, ss, ping, iptables-legacy, haproxy,
// nginx, tinyproxy, curl, promtool) are not installed.
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

// policyRCD is where Debian's invoke-rc.d asks whether a package may
// start its service.
const policyRCD = "/usr/sbin/policy-rc.d"

// denyServices is a policy-rc.d that refuses every service start (101:
// action forbidden).
const denyServices = "#!/bin/sh\n# iketcp-lab: no service starts while the lab's packages install.\nexit 101\n"

// aptLockWait is how long apt-get waits for another apt or dpkg to finish.
const aptLockWait = "120"

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

// MissingFaultTools reports which of the programs that only the fault
// and privilege tests need (conntrack, setpriv) are not installed.
func MissingFaultTools() []string {
	var missing []string
	for _, name := range faultTools {
		if toolPath(name) == "" {
			missing = append(missing, name)
		}
	}
	return missing
}

// mustFaultTool returns the path of a fault test's tool, or an error that
// says how to install it.
func mustFaultTool(name string) (string, error) {
	if p := toolPath(name); p != "" {
		return p, nil
	}
	return "", fmt.Errorf("%s not found: run make deps (apt-get install conntrack util-linux)", name)
}

// ToolPath returns the absolute path of an installed tool, or "" when it
// is not installed.
func ToolPath(name string) string { return toolPath(name) }

// InstallPackages installs [DebianPackages] with apt-get (update, then
// install -y, non-interactively), writing apt's output to out. It needs root.
//
// No service starts in the host's namespace: unless the host has a
// policy-rc.d of its own (which is left alone), one that forbids every
// start is in place for the install and removed after it, so haproxy's
// and nginx's packages install without starting their daemons.
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
	restore, err := holdServices()
	if err != nil {
		return err
	}
	defer restore()
	steps := [][]string{
		{"-o", "DPkg::Lock::Timeout=" + aptLockWait, "update"},
		append([]string{"-o", "DPkg::Lock::Timeout=" + aptLockWait, "install", "-y"}, DebianPackages...),
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

// holdServices puts a policy-rc.d that forbids service starts in place,
// unless one is there already, and returns what removes it again.
func holdServices() (restore func(), err error) {
	f, err := os.OpenFile(policyRCD, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if errors.Is(err, os.ErrExist) {
		return func() {}, nil // the host's own: it decides
	}
	if err != nil {
		return nil, fmt.Errorf("keeping services from starting during the install: %w", err)
	}
	if _, err := f.WriteString(denyServices); err != nil {
		f.Close()
		os.Remove(policyRCD)
		return nil, fmt.Errorf("write %s: %w", policyRCD, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(policyRCD)
		return nil, fmt.Errorf("write %s: %w", policyRCD, err)
	}
	return func() { os.Remove(policyRCD) }, nil
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
