package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Namespace is one of the lab's network namespaces.
type Namespace struct {
	// Name is the namespace's name as `ip netns list` shows it, e.g.
	// "iktc-3f2a-site".
	Name string
	// Role is "site", "carrier" or "hub".
	Role string

	lab *Lab
}

// Command returns an exec.Cmd that runs the program inside the namespace
// (`ip netns exec NAME name args...`). The caller owns the command: the lab
// does not track or stop it, except that Close kills whatever is still
// running inside the namespace. Prefer Run and Start.
func (ns *Namespace) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, ns.lab.ipPath, append([]string{"netns", "exec", ns.Name, name}, args...)...)
	cmd.WaitDelay = waitDelay
	return cmd
}

// Run runs a program inside the namespace and returns its combined output.
// The error includes the output.
func (ns *Namespace) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	out, err := ns.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return out, commandError(ns.Name, append([]string{name}, args...), out, withContextErr(ctx, err))
	}
	return out, nil
}

// Start runs a long-lived program inside the namespace with its standard
// output and error appended to logPath (a fresh file in the lab directory
// if empty). ctx only bounds the start: the program runs until Stop, Kill
// or Lab.Close. The PID of the returned Process is the program's own.
func (ns *Namespace) Start(ctx context.Context, logPath string, name string, args ...string) (*Process, error) {
	return ns.start(ctx, logPath, nil, name, args...)
}

func (ns *Namespace) start(ctx context.Context, logPath string, env []string, name string, args ...string) (*Process, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", name, ns.Name, err)
	}
	if logPath == "" {
		logPath = ns.lab.filePath(ns.Role+"-"+filepath.Base(name), ".log")
	}
	// Not CommandContext: the program outlives ctx. `ip netns exec` execs
	// the program without forking, so the PID is the program's.
	cmd := exec.Command(ns.lab.ipPath, append([]string{"netns", "exec", ns.Name, name}, args...)...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	p, err := startProcess(name, cmd, logPath)
	if err != nil {
		return nil, fmt.Errorf("in %s: %w", ns.Name, err)
	}
	if err := ns.lab.track(p); err != nil {
		return nil, err
	}
	p.waitExec(ns.lab.ipPath)
	ns.lab.logf("lab %s: started %s in %s (pid %d, log %s)", ns.lab.Name, name, ns.Role, p.PID(), logPath)
	return p, nil
}

// PIDs lists the processes currently inside the namespace.
func (ns *Namespace) PIDs(ctx context.Context) ([]int, error) {
	return namespacePIDs(ctx, ns.lab.ipPath, ns.Name)
}

func (ns *Namespace) String() string { return ns.Name }

// run runs a program on the host (not in a namespace).
func (l *Lab) run(ctx context.Context, name string, args ...string) ([]byte, error) {
	return runHost(ctx, name, args...)
}

func runHost(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = waitDelay
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, commandError("", append([]string{filepath.Base(name)}, args...), out, withContextErr(ctx, err))
	}
	return out, nil
}

// withContextErr names the context's error when a command failed because
// ctx ended (the command itself only reports "signal: killed").
func withContextErr(ctx context.Context, err error) error {
	if ctxErr := ctx.Err(); ctxErr != nil && !errors.Is(err, ctxErr) {
		return fmt.Errorf("%w (%v)", ctxErr, err)
	}
	return err
}

func commandError(ns string, argv []string, out []byte, err error) error {
	where := ""
	if ns != "" {
		where = " (in " + ns + ")"
	}
	msg := strings.TrimSpace(string(bytes.ToValidUTF8(out, []byte("?"))))
	if len(msg) > 2000 {
		msg = msg[:2000] + "..."
	}
	if msg == "" {
		return fmt.Errorf("%s%s: %w", strings.Join(argv, " "), where, err)
	}
	return fmt.Errorf("%s%s: %w: %s", strings.Join(argv, " "), where, err, msg)
}
