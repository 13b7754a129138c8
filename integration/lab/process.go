package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	// stopGrace is how long Stop waits after SIGTERM before SIGKILL.
	stopGrace = 5 * time.Second
	// killWait is how long Stop and Kill wait for the exit after SIGKILL.
	killWait = 5 * time.Second
	// waitDelay bounds how long a finished or cancelled command may keep
	// its output pipes open.
	waitDelay = 2 * time.Second
	// execWait bounds the wait for `ip netns exec` to exec the program.
	execWait = 2 * time.Second
)

// Process is a long-lived program running in a namespace, started by
// [Namespace.Start]. Its standard output and error go to a log file.
//
// The PID is the program's own: `ip netns exec` replaces itself with the
// program, so signalling the PID reaches the program and not a wrapper.
// The program runs in its own process group, so a Ctrl-C in the terminal
// reaches the owner (which then calls [Lab.Close]) rather than the program.
type Process struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	logFile *os.File

	done    chan struct{}
	waitErr error // set before done is closed

	stopOnce sync.Once
	stopErr  error
}

// startProcess starts cmd with its output appended to logPath and a
// goroutine that reaps it; that goroutine ends when the program exits,
// which Stop, Kill and Lab.Close guarantee.
func startProcess(name string, cmd *exec.Cmd, logPath string) (*Process, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log for %s: %w", name, err)
	}
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{name: name, logPath: logPath, cmd: cmd, logFile: logFile, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	return p, nil
}

// waitExec waits (at most execWait) until the process no longer runs the
// launcher (`ip netns exec`) but the program it execs, so that the PID
// names the program when Start returns.
func (p *Process) waitExec(launcher string) {
	if resolved, err := filepath.EvalSymlinks(launcher); err == nil {
		launcher = resolved
	}
	exe := fmt.Sprintf("/proc/%d/exe", p.PID())
	deadline := time.Now().Add(execWait)
	for time.Now().Before(deadline) && !p.Exited() {
		target, err := os.Readlink(exe)
		if err != nil || target != launcher {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// Name is the program's name as given to Start.
func (p *Process) Name() string { return p.name }

// PID is the program's process ID.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// LogPath is the file that receives the program's output.
func (p *Process) LogPath() string { return p.logPath }

// Log returns the program's output so far.
func (p *Process) Log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	return string(b)
}

// Done is closed once the program has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the program has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// ExitErr returns the program's exit status as reported by exec.Cmd.Wait
// (nil for exit code 0) once it has exited, and nil while it runs.
func (p *Process) ExitErr() error {
	if !p.Exited() {
		return nil
	}
	return p.waitErr
}

// Signal sends sig to the program, by PID (through a pidfd, so never to
// a recycled PID).
func (p *Process) Signal(sig os.Signal) error {
	if err := p.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("signal %s (pid %d): %w", p.name, p.PID(), err)
	}
	return nil
}

// WaitLog polls the program's output, every 50 ms for at most d (and ctx),
// until it contains substr, and returns the first line that does. The
// error says what the log held instead.
func (p *Process) WaitLog(ctx context.Context, substr string, d time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	const poll = 50 * time.Millisecond
	for range int(d/poll) + 1 {
		for _, line := range strings.Split(p.Log(), "\n") {
			if strings.Contains(line, substr) {
				return line, nil
			}
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("%s (pid %d) did not log %q within %s; its log %s:\n%s", filepath.Base(p.Name()), p.PID(), substr, d, p.LogPath(), tail(p.Log(), 3000))
		case <-time.After(poll):
		}
	}
	return "", fmt.Errorf("%s (pid %d) did not log %q within %s", filepath.Base(p.Name()), p.PID(), substr, d)
}

// Stop ends the program: SIGTERM, up to 5 s for it to exit, then SIGKILL.
// It returns nil once the program is gone, whatever its exit status, and an
// error only if it could not be ended. Calling Stop again returns the same
// result.
func (p *Process) Stop() error {
	p.stopOnce.Do(func() { p.stopErr = p.terminate(syscall.SIGTERM, stopGrace) })
	return p.stopErr
}

// Kill ends the program with SIGKILL and waits (bounded) until it is reaped.
func (p *Process) Kill() error {
	return p.terminate(syscall.SIGKILL, killWait)
}

func (p *Process) terminate(sig syscall.Signal, grace time.Duration) error {
	if p.Exited() {
		return nil
	}
	// os.Process.Signal uses a pidfd, so it never reaches a recycled PID.
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s (pid %d): %w", p.name, p.PID(), err)
	}
	if waitClosed(p.done, grace) {
		return nil
	}
	if sig != syscall.SIGKILL {
		if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("kill %s (pid %d): %w", p.name, p.PID(), err)
		}
		if waitClosed(p.done, killWait) {
			return nil
		}
	}
	return fmt.Errorf("%s (pid %d) did not exit within %s of SIGKILL", p.name, p.PID(), killWait)
}

func waitClosed(ch <-chan struct{}, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ch:
		return true
	case <-timer.C:
		return false
	}
}
