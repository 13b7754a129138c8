package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/iketcp/iketcp/relay"
)

// iketcpReadyTimeout bounds the wait for an iketcp instance's control
// socket to answer.
const iketcpReadyTimeout = 10 * time.Second

// Iketcp is an iketcp instance (client or server) started with
// [Lab.StartIketcp], beside the tunnel's own: a second client with other
// flags, say. The lab stops it on Close.
type Iketcp struct {
	*Process
	// Namespace is where it runs.
	Namespace *Namespace
	// Control is its control socket.
	Control string
	// As is who it runs as; nil: as the test, root.
	As *Privileges

	binary string
}

// StartIketcp runs the iketcp binary with args (the role first: "client"
// or "server") in ns, with a control socket and a log file of its own in
// the lab directory named after name, at debug level, and returns once it
// answers on its control socket.
func (l *Lab) StartIketcp(ctx context.Context, ns *Namespace, binary, name string, args ...string) (*Iketcp, error) {
	if binary == "" {
		return nil, fmt.Errorf("StartIketcp: no iketcp binary given")
	}
	if ns == nil || ns.lab != l {
		return nil, fmt.Errorf("StartIketcp: namespace does not belong to this lab")
	}
	control := l.filePath(ns.Role+"-"+name, ".sock")
	if len(control) > 100 {
		return nil, fmt.Errorf("control socket path %s is too long for a unix socket", control)
	}
	return l.startIketcp(ctx, ns, binary, control, strings.TrimSuffix(control, ".sock")+".log", args)
}

// startIketcp runs iketcp with args in ns, logging at debug level to
// logPath, and waits until it answers on control.
func (l *Lab) startIketcp(ctx context.Context, ns *Namespace, binary, control, logPath string, args []string) (*Iketcp, error) {
	return l.startIketcpAs(ctx, ns, binary, control, logPath, args, nil)
}

// startIketcpAs is startIketcp under setpriv with as, unless it is nil.
func (l *Lab) startIketcpAs(ctx context.Context, ns *Namespace, binary, control, logPath string, args []string, as *Privileges) (*Iketcp, error) {
	args = append(append([]string(nil), args...), "--control", control, "--log-level", "debug")
	name := binary
	if as != nil {
		setpriv, err := setprivPath()
		if err != nil {
			return nil, err
		}
		name, args = setpriv, append(append(as.setprivArgs(), binary), args...)
	}
	p, err := ns.Start(ctx, logPath, name, args...)
	if err != nil {
		return nil, err
	}
	inst := &Iketcp{Process: p, Namespace: ns, Control: control, As: as, binary: binary}
	return inst, inst.waitReady(ctx)
}

// waitReady waits until the instance answers on its control socket.
func (i *Iketcp) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, iketcpReadyTimeout)
	defer cancel()
	const poll = 50 * time.Millisecond
	for range int(iketcpReadyTimeout / poll) {
		if _, err := i.Status(ctx); err == nil {
			return nil
		}
		if i.Exited() {
			return fmt.Errorf("iketcp exited at start: %v\n%s", i.ExitErr(), i.Log())
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("iketcp (pid %d) did not answer on %s: %w\n%s", i.PID(), i.Control, ctx.Err(), i.Log())
		case <-time.After(poll):
		}
	}
	return fmt.Errorf("iketcp (pid %d) did not answer on %s", i.PID(), i.Control)
}

// Status runs `iketcp status --json` against the instance.
func (i *Iketcp) Status(ctx context.Context) (*relay.Status, error) {
	return iketcpStatusAs(ctx, i.Namespace, i.binary, i.Control, i.As)
}

// iketcpStatusAs runs `iketcp status --json` in ns against control, as
// the user of as (iketcp status trusts only its own user's sockets).
func iketcpStatusAs(ctx context.Context, ns *Namespace, binary, control string, as *Privileges) (*relay.Status, error) {
	name, args := binary, []string{"status", "--json", "--control", control}
	if as != nil {
		setpriv, err := setprivPath()
		if err != nil {
			return nil, err
		}
		name, args = setpriv, append(append(as.user(), binary), args...)
	}
	out, err := ns.Run(ctx, name, args...)
	if err != nil {
		return nil, err
	}
	var st relay.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("iketcp status --json: %w: %s", err, out)
	}
	return &st, nil
}
