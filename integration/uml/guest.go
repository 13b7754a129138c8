package uml

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

const (
	// bootTimeout bounds a guest's boot, up to guestinit's ready file.
	bootTimeout = 60 * time.Second
	// shutdownTimeout bounds a clean power-off before the lab kills it.
	shutdownTimeout = 20 * time.Second
	// guestLifetime is how long a guest lives at most (seconds): a guest
	// whose owner died powers itself off.
	guestLifetime = 900
	// pollInterval is the pause between polls of the shared directory.
	pollInterval = 20 * time.Millisecond
)

// GuestOptions configure Boot.
type GuestOptions struct {
	// Kernel is the UML kernel to boot.
	Kernel *Kernel
	// Init is guestinit's executable (BuildInit).
	Init string
	// Namespace is where the guest's TAP device lives.
	Namespace *lab.Namespace
	// Dir is the guest's own directory: it is shared with the guest
	// read-write at the same path (scripts, results, logs). Created.
	Dir string
	// Tap names the TAP device (at most 15 bytes). HostAddr is its
	// address with prefix length, e.g. "100.64.1.1/24"; GuestAddr the
	// guest's on vec0, e.g. "100.64.1.2/24".
	Tap, HostAddr, GuestAddr string
	// MAC is the guest's fixed MAC address (a random one per boot leaves
	// stale neighbour entries on the host side).
	MAC string
	// Loopback are extra addresses (CIDR) on the guest's lo.
	Loopback []string
	// Routes are `ip route add` argument lists run in the guest after its
	// addresses, e.g. {"203.0.113.0/24", "via", "100.64.1.1"}.
	Routes [][]string
	// Libreswan, if set, is made available as /usr/libexec/ipsec.
	Libreswan *Libreswan
	// Mem is the guest's memory (default "256M").
	Mem string
	// Logf receives one line per step. Nil discards them.
	Logf func(format string, args ...any)
}

// Guest is a booted UML guest. Its methods are safe for concurrent use.
type Guest struct {
	Opts GuestOptions
	// Proc is the UML kernel's host process.
	Proc *lab.Process
	// BootTime is from start to guestinit's ready file, network included.
	BootTime time.Duration

	mu   sync.Mutex
	next int
	down bool
}

// BuildInit builds guestinit as a static executable at dir/guestinit.
func BuildInit(ctx context.Context, dir string) (string, error) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("building guestinit needs the go command in PATH: %w", err)
	}
	out := filepath.Join(dir, "guestinit")
	cmd := exec.CommandContext(ctx, goTool, "build", "-o", out, "github.com/iketcp/iketcp/integration/uml/guestinit")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build guestinit: %w: %s", err, b)
	}
	return out, nil
}

// Boot creates the TAP device in the namespace, boots the guest with the
// host's / as its read-only root, and configures its network. The lab
// stops the guest's process on Close if Shutdown has not.
func Boot(ctx context.Context, opts GuestOptions) (*Guest, error) {
	if opts.Kernel == nil || opts.Init == "" || opts.Namespace == nil || opts.Dir == "" {
		return nil, errors.New("uml.Boot: Kernel, Init, Namespace and Dir are required")
	}
	if len(opts.Tap) == 0 || len(opts.Tap) > 15 {
		return nil, fmt.Errorf("uml.Boot: TAP name %q: want 1 to 15 bytes", opts.Tap)
	}
	if opts.Mem == "" {
		opts.Mem = "256M"
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	if strings.ContainsAny(opts.Dir, " \t\n,") {
		return nil, fmt.Errorf("uml.Boot: directory %q must not contain spaces or commas (it goes on the kernel command line)", opts.Dir)
	}
	if err := os.MkdirAll(filepath.Join(opts.Dir, "cmd"), 0o755); err != nil {
		return nil, err
	}
	ns := opts.Namespace
	for _, args := range [][]string{
		{"tuntap", "add", "dev", opts.Tap, "mode", "tap"},
		{"addr", "add", opts.HostAddr, "dev", opts.Tap},
		{"link", "set", opts.Tap, "up"},
	} {
		if _, err := ns.Run(ctx, "ip", args...); err != nil {
			return nil, fmt.Errorf("guest TAP: %w", err)
		}
	}
	args := []string{
		"mem=" + opts.Mem,
		"root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro",
		"init=" + opts.Init,
		"umid=" + opts.Tap, "uml_dir=" + opts.Dir,
		"vec0:transport=tap,ifname=" + opts.Tap + ",mac=" + opts.MAC,
		"con=null", "con0=null,fd:1",
		"UML_DIR=" + opts.Dir,
		"UML_LIFETIME=" + strconv.Itoa(guestLifetime),
	}
	if opts.Libreswan != nil {
		args = append(args, "UML_LIBRESWAN="+opts.Libreswan.Root)
	}
	start := time.Now()
	proc, err := ns.Start(ctx, filepath.Join(opts.Dir, "console.log"), opts.Kernel.Path, args...)
	if err != nil {
		return nil, err
	}
	g := &Guest{Opts: opts, Proc: proc}
	if err := g.waitReady(ctx); err != nil {
		return nil, err
	}
	script := "set -e\nip link set lo up\n"
	for _, a := range opts.Loopback {
		script += "ip addr add " + a + " dev lo\n"
	}
	script += "ip addr add " + opts.GuestAddr + " dev vec0\nip link set vec0 up\n"
	for _, r := range opts.Routes {
		script += "ip route add " + strings.Join(r, " ") + "\n"
	}
	if _, err := g.Run(ctx, script); err != nil {
		return nil, fmt.Errorf("guest network: %w", err)
	}
	g.BootTime = time.Since(start)
	logf("uml: guest %s booted in %s (kernel %s, pid %d)", opts.Tap, g.BootTime.Round(time.Millisecond), opts.Kernel.Version, proc.PID())
	return g, nil
}

func (g *Guest) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, bootTimeout)
	defer cancel()
	ready := filepath.Join(g.Opts.Dir, "ready")
	for range int(bootTimeout/pollInterval) + 1 {
		if isFile(ready) {
			return nil
		}
		if g.Proc.Exited() {
			return fmt.Errorf("guest %s exited while booting (%v); console:\n%s", g.Opts.Tap, g.Proc.ExitErr(), tail(g.Proc.Log(), 4000))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("guest %s did not boot within %s; console:\n%s", g.Opts.Tap, bootTimeout, tail(g.Proc.Log(), 4000))
		case <-time.After(pollInterval):
		}
	}
	return fmt.Errorf("guest %s did not boot within %s", g.Opts.Tap, bootTimeout)
}

// Run runs a shell script in the guest (as root, with /bin/sh) and
// returns its combined output. A script that exits non-zero is an error
// that holds its output. ctx bounds the wait; the guest kills a script
// after 60 s.
func (g *Guest) Run(ctx context.Context, script string) (string, error) {
	g.mu.Lock()
	if g.down {
		g.mu.Unlock()
		return "", fmt.Errorf("guest %s is shut down", g.Opts.Tap)
	}
	n := g.next
	g.next++
	g.mu.Unlock()
	base := filepath.Join(g.Opts.Dir, "cmd", strconv.Itoa(n))
	if err := os.WriteFile(base+".tmp", []byte(script), 0o644); err != nil {
		return "", err
	}
	if err := os.Rename(base+".tmp", base+".sh"); err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	for range int(90*time.Second/pollInterval) + 1 {
		if rc, err := os.ReadFile(base + ".rc"); err == nil {
			out, _ := os.ReadFile(base + ".out")
			code, _ := strconv.Atoi(strings.TrimSpace(string(rc)))
			if code != 0 {
				return string(out), fmt.Errorf("guest %s: script exited %d:\n%s\noutput:\n%s", g.Opts.Tap, code, script, out)
			}
			return string(out), nil
		}
		if g.Proc.Exited() {
			return "", fmt.Errorf("guest %s is gone (%v); console:\n%s", g.Opts.Tap, g.Proc.ExitErr(), tail(g.Proc.Log(), 3000))
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("guest %s: no result for script %d: %w", g.Opts.Tap, n, ctx.Err())
		case <-time.After(pollInterval):
		}
	}
	return "", fmt.Errorf("guest %s: no result for script %d", g.Opts.Tap, n)
}

// Shutdown asks guestinit to stop every process and power off, and waits
// (at most 20 s) for the kernel's process to exit; then it kills it. It
// returns how long the clean shutdown took.
func (g *Guest) Shutdown() (time.Duration, error) {
	g.mu.Lock()
	already := g.down
	g.down = true
	g.mu.Unlock()
	if already || g.Proc.Exited() {
		return 0, nil
	}
	start := time.Now()
	if err := os.WriteFile(filepath.Join(g.Opts.Dir, "cmd", "stop"), nil, 0o644); err != nil {
		return 0, err
	}
	select {
	case <-g.Proc.Done():
		return time.Since(start), nil
	case <-time.After(shutdownTimeout):
	}
	if err := g.Proc.Kill(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("guest %s did not power off within %s; killed", g.Opts.Tap, shutdownTimeout)
}

// View returns the guest's own view of its IPsec state, for test logs:
// the XFRM states and policies, its TCP sockets with their ULP (ss shows
// tcp-ulp-espintcp), and, when pluto runs, its traffic status.
func (g *Guest) View(ctx context.Context, p *Pluto) string {
	script := "echo '# ip -s xfrm state'; ip -s xfrm state\n" +
		"echo '# ip xfrm policy (without the per-socket bypass policies)'; ip xfrm policy | grep -v -e '^src 0.0.0.0/0 dst 0.0.0.0/0 $' -e '^src ::/0 dst ::/0' -e 'socket in' -e 'socket out'\n" +
		"echo '# ip route'; ip route\n" +
		"echo '# /proc/net/xfrm_stat (non-zero)'; grep -v '[[:space:]]0$' /proc/net/xfrm_stat\n" +
		"echo '# ss -tanie'; ss -tanie\n"
	if p != nil {
		script += "echo '# ipsec whack --trafficstatus'; " + p.whackCmd("--trafficstatus") + "\n"
	}
	out, err := g.Run(ctx, script)
	if err != nil {
		return fmt.Sprintf("(guest view failed: %v)\n%s", err, out)
	}
	return out
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
