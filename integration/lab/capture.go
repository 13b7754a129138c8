package lab

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// captureReadyTimeout bounds the wait for tcpdump to start listening.
const captureReadyTimeout = 5 * time.Second

// Capture is a tcpdump writing packets of one interface to a pcap file.
type Capture struct {
	// Path is the pcap file.
	Path string
	proc *Process
}

// Capture starts tcpdump on iface inside the namespace, writing the packets
// that match the BPF filter (all if empty) to path (a fresh .pcap in the
// lab directory if empty), and returns once tcpdump is listening. Packets
// are written as they arrive (-U), so the file is complete after Stop.
func (ns *Namespace) Capture(ctx context.Context, iface, filter, path string) (*Capture, error) {
	l := ns.lab
	if path == "" {
		path = l.filePath(ns.Role+"-"+iface, ".pcap")
	}
	logPath := strings.TrimSuffix(path, filepath.Ext(path)) + ".tcpdump.log"
	// -Z root: otherwise tcpdump drops to its own user and cannot write
	// into directories like t.TempDir() (mode 0700).
	// --immediate-mode: without it packets wait in the kernel ring for up
	// to a second and are lost when tcpdump is stopped.
	args := []string{"-i", iface, "-n", "-U", "--immediate-mode", "-Z", "root", "-w", path}
	if filter != "" {
		args = append(args, filter)
	}
	proc, err := ns.start(ctx, logPath, nil, l.tcpdump, args...)
	if err != nil {
		return nil, err
	}
	c := &Capture{Path: path, proc: proc}
	l.mu.Lock()
	l.captures = append(l.captures, c)
	l.mu.Unlock()
	if err := c.waitListening(ctx); err != nil {
		c.Stop()
		return nil, fmt.Errorf("capture on %s in %s: %w", iface, ns.Role, err)
	}
	return c, nil
}

func (c *Capture) waitListening(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, captureReadyTimeout)
	defer cancel()
	const poll = 20 * time.Millisecond
	for range int(captureReadyTimeout / poll) {
		if strings.Contains(c.proc.Log(), "listening on") {
			return nil
		}
		if c.proc.Exited() {
			return fmt.Errorf("tcpdump exited (%v): %s", c.proc.ExitErr(), strings.TrimSpace(c.proc.Log()))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("tcpdump not listening: %w: %s", ctx.Err(), strings.TrimSpace(c.proc.Log()))
		case <-time.After(poll):
		}
	}
	return fmt.Errorf("tcpdump not listening after %s: %s", captureReadyTimeout, strings.TrimSpace(c.proc.Log()))
}

// Stop ends tcpdump (SIGTERM) once the pcap file has stopped growing for
// captureSettle (at most a second), so that packets just sent are in it.
// Idempotent.
func (c *Capture) Stop() error {
	if !c.proc.Exited() {
		c.waitSettled()
	}
	return c.proc.Stop()
}

// captureSettle is how long the pcap file must keep its size before Stop
// ends tcpdump.
const captureSettle = 100 * time.Millisecond

func (c *Capture) waitSettled() {
	const poll = 20 * time.Millisecond
	var lastSize int64 = -1
	stableSince := time.Now()
	for range int(time.Second / poll) {
		var size int64
		if fi, err := os.Stat(c.Path); err == nil {
			size = fi.Size()
		}
		if size != lastSize {
			lastSize, stableSince = size, time.Now()
		} else if time.Since(stableSince) >= captureSettle {
			return
		}
		time.Sleep(poll)
	}
}

// Process is tcpdump's process.
func (c *Capture) Process() *Process { return c.proc }

// Log returns tcpdump's own output ("listening on ...", packet counts).
func (c *Capture) Log() string { return c.proc.Log() }
