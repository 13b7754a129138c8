package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/control"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show a running iketcp's sessions, like diagnose vpn ike gateway list",
		UsageText: "iketcp status [--control PATH] [--json]\n\n" +
			"Examples:\n\n" +
			"   iketcp status                                   # every instance in " + control.DefaultDir() + "\n" +
			"   iketcp status --control /run/iketcp/server.sock --json | jq '.sessions[].peer'",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "control", Usage: "control socket of the instance (default: every socket in " + control.DefaultDir() + ")", EnvVars: envVar("control")},
			&cli.BoolFlag{Name: "json", Usage: "print the raw JSON"},
			&cli.BoolFlag{Name: "watch", Usage: "redraw the status in place every --interval, until interrupted"},
			&cli.DurationFlag{Name: "interval", Value: time.Second, Usage: "--watch: how often to redraw"},
			&cli.StringFlag{Name: "session", Usage: "show one session (or client flow) in full: its ID (3, session-3, flow-3) or any of its IKE or ESP SPIs in hex"},
		},
		Description: "Examples: iketcp status; iketcp status --watch --interval 2s; iketcp status --session 85875d9b",
		Action:      runStatus,
	}
}

func runStatus(c *cli.Context) error {
	if c.Bool("watch") {
		if c.Bool("json") {
			return &configError{errors.New("--watch redraws text; --json prints once")}
		}
		if c.Duration("interval") < 10*time.Millisecond {
			return &configError{fmt.Errorf("--interval %v: want 10ms or more", c.Duration("interval"))}
		}
		return watchStatus(c)
	}
	return writeStatus(c, c.App.Writer)
}

// watchStatus redraws the status in place until SIGINT or SIGTERM: the
// cursor goes home, each line clears what is left of the previous frame's,
// and what the previous frame had below is erased.
func watchStatus(c *cli.Context) error {
	ctx, stop := stopOnSignal(c)
	defer stop()
	w := c.App.Writer
	io.WriteString(w, "\x1b[?25l\x1b[H\x1b[2J") // hide the cursor, clear once
	defer io.WriteString(w, "\x1b[?25h\n")
	t := time.NewTicker(c.Duration("interval"))
	defer t.Stop()
	for {
		var frame bytes.Buffer
		fmt.Fprintf(&frame, "iketcp status, every %v (Ctrl-C to stop)  %s\n\n", c.Duration("interval"), time.Now().Format(time.TimeOnly))
		if err := writeStatus(c, &frame); err != nil {
			fmt.Fprintf(&frame, "\n%v\n", err)
		}
		text := strings.ReplaceAll(strings.TrimRight(frame.String(), "\n"), "\n", "\x1b[K\r\n")
		if _, err := io.WriteString(w, "\x1b[H"+text+"\x1b[K\x1b[J"); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// writeStatus prints every instance's status, or one session, to w.
func writeStatus(c *cli.Context, w io.Writer) error {
	paths := []string{c.String("control")}
	if paths[0] == "" {
		var err error
		if paths, err = control.Sockets(control.DefaultDir()); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if len(paths) == 0 {
			return fmt.Errorf("no running iketcp found in %s (start one, or pass --control PATH)", control.DefaultDir())
		}
	}
	var failed []string
	found := false
	for i, p := range paths {
		raw, err := control.Fetch(c.Context, p)
		if err != nil {
			failed = append(failed, err.Error())
			continue
		}
		if c.Bool("json") && !c.IsSet("session") {
			w.Write(raw)
			continue
		}
		var st relay.Status
		if err := decodeStatus(raw, &st); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if key := c.String("session"); key != "" {
			s := st.Find(key)
			if s == nil {
				continue
			}
			found = true
			if c.Bool("json") {
				if err := json.NewEncoder(w).Encode(s); err != nil {
					return err
				}
				continue
			}
			fmt.Fprintf(w, "control: %s\n", p)
			if err := st.WriteSession(w, s, time.Now()); err != nil {
				return err
			}
			continue
		}
		if i > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "control: %s\n", p)
		if err := st.WriteText(w, time.Now()); err != nil {
			return err
		}
	}
	if c.IsSet("session") && !found && len(failed) == 0 {
		return fmt.Errorf("no session or flow %q: give its ID or one of its IKE or ESP SPIs, as iketcp status shows them", c.String("session"))
	}
	if len(failed) > 0 {
		return errors.New(strings.Join(failed, "; "))
	}
	return nil
}

func decodeStatus(raw []byte, st *relay.Status) error {
	if err := json.Unmarshal(raw, st); err != nil {
		return fmt.Errorf("unreadable status reply: %w", err)
	}
	return nil
}
