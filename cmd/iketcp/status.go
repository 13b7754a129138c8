package main

import (
	"encoding/json"
	"errors"
	"fmt"
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
		},
		Action: runStatus,
	}
}

func runStatus(c *cli.Context) error {
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
	for i, p := range paths {
		raw, err := control.Fetch(c.Context, p)
		if err != nil {
			failed = append(failed, err.Error())
			continue
		}
		if c.Bool("json") {
			c.App.Writer.Write(raw)
			continue
		}
		var st relay.Status
		if err := decodeStatus(raw, &st); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if i > 0 {
			fmt.Fprintln(c.App.Writer)
		}
		fmt.Fprintf(c.App.Writer, "control: %s\n", p)
		if err := st.WriteText(c.App.Writer, time.Now()); err != nil {
			return err
		}
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
