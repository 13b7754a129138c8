// Command iketcp carries IKEv2 and ESP over TCP (RFC 9329) for IKE daemons
// that only speak UDP. Run `iketcp server` beside the gateway and `iketcp
// client` beside the daemon that initiates; `iketcp status` shows either.
//
// This package only parses flags, sets up logging and signals, and wires
// the relay packages together.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newApp().RunContext(ctx, os.Args); err != nil {
		code := 1
		var exit cli.ExitCoder
		if errors.As(err, &exit) {
			code = exit.ExitCode()
		}
		if msg := err.Error(); msg != "" {
			fmt.Fprintln(os.Stderr, "iketcp:", msg)
		}
		stop()
		os.Exit(code)
	}
}

func newApp() *cli.App {
	return &cli.App{
		Name:    "iketcp",
		Usage:   "carry IKEv2 and ESP over TCP (RFC 9329) for IKE daemons that speak only UDP",
		Version: versionString(),
		Description: "iketcp sits beside an unchanged IKE daemon. The client takes the daemon's UDP 4500 traffic\n" +
			"and carries it over TCP to the server, which hands it to the gateway's daemon over UDP.\n" +
			"Every flag can also be set with an IKETCP_* environment variable (--max-conns: IKETCP_MAX_CONNS).",
		Commands: []*cli.Command{
			serverCommand(),
			clientCommand(),
			statusCommand(),
			probeCommand(),
			{
				Name:      "version",
				Usage:     "print the version",
				UsageText: "iketcp version\n\nExample:\n\n   $ iketcp version\n   iketcp v0.4.0",
				Action: func(c *cli.Context) error {
					fmt.Fprintf(c.App.Writer, "iketcp %s\n", versionString())
					return nil
				},
			},
		},
		HideHelpCommand: true,
	}
}

// envVar names the environment variable of a flag: --max-conns is
// IKETCP_MAX_CONNS.
func envVar(flag string) []string {
	return []string{"IKETCP_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))}
}
