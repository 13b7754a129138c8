// Command iketcp carries IKEv2 and ESP over TCP (RFC 9329) for IKE daemons
// that only speak UDP. Run `iketcp server` beside the gateway and `iketcp
// client` beside the daemon that initiates; `iketcp status` shows either.
//
// This package only parses flags, sets up logging and signals, and wires
// the relay packages together.
package main

import (
	"context"
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

// main runs the command line and exits with the code the README's
// Signals and exit codes section documents. server and client handle
// SIGTERM, SIGINT and SIGHUP themselves (draining, reloading); the other
// commands stop on SIGTERM and SIGINT.
func main() {
	err := newApp().RunContext(context.Background(), os.Args)
	if err != nil && err.Error() != "" {
		fmt.Fprintln(os.Stderr, "iketcp:", err)
	}
	os.Exit(exitCode(err))
}

// stopOnSignal returns c's context, ended by SIGTERM or SIGINT.
func stopOnSignal(c *cli.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
}

func newApp() *cli.App {
	app := &cli.App{
		Name:    "iketcp",
		Usage:   "carry IKEv2 and ESP over TCP (RFC 9329) for IKE daemons that speak only UDP",
		Version: versionString(),
		Description: "iketcp sits beside an unchanged IKE daemon. The client takes the daemon's UDP 4500 traffic\n" +
			"and carries it over TCP to the server, which hands it to the gateway's daemon over UDP.\n" +
			"Every flag can also be set with an IKETCP_* environment variable (--max-conns: IKETCP_MAX_CONNS),\n" +
			"or in a YAML file given with --config (max-conns: 4096); flags win over the environment, which wins over the file.",
		Commands: []*cli.Command{
			serverCommand(),
			clientCommand(),
			statusCommand(),
			upgradeCommand(),
			checkConfigCommand(),
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
		Before: func(c *cli.Context) error {
			// The arguments as given: the configuration file's layering
			// needs to know which flags the command line set.
			c.App.Metadata["args"] = c.Args().Slice()
			return nil
		},
		OnUsageError: usageError,
	}
	for _, cmd := range app.Commands {
		cmd.OnUsageError = usageError
	}
	return app
}

// usageError marks an error in the command line as a configuration error.
func usageError(_ *cli.Context, err error, _ bool) error { return &configError{err} }

// envVar names the environment variable of a flag: --max-conns is
// IKETCP_MAX_CONNS.
func envVar(flag string) []string {
	return []string{"IKETCP_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))}
}
