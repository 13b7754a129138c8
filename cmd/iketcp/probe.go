package main

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/relay/dial"
	"github.com/iketcp/iketcp/relay/probe"
)

// exitUnreachable is probe's exit code when no way reached the hub.
const exitUnreachable = 3

func probeCommand() *cli.Command {
	return &cli.Command{
		Name:      "probe",
		Usage:     "test from a site which ways reach a hub (UDP 500/4500, TCP, TLS), and what NAT is in between",
		ArgsUsage: "HOST",
		UsageText: "iketcp probe [--tcp-port PORT ...] [--tls] [--json] HOST\n\n" +
			"Example, from a site whose carrier drops UDP:\n\n" +
			"   $ iketcp probe hub.example.net\n" +
			"   probing hub.example.net (203.0.113.2)\n" +
			"     udp 500   IKE_SA_INIT  no answer to 3\n" +
			"     udp 4500  IKE_SA_INIT  no answer to 3\n" +
			"     tcp 4500  connected in 412µs; iketcp server answered in 230µs, saw 203.0.113.1:40002 (from 100.64.0.2:40002) ...\n" +
			"   verdict:\n" +
			"     UDP 4500 is blocked here (no answer to 3 IKE_SA_INIT probes); use --transport tcp (iketcp client --peer hub.example.net:4500).\n" +
			"     Behind NAT: the hub saw 203.0.113.1; the NAT kept the source ports (port-preserving).",
		Description: "probe sends an IKE_SA_INIT request to UDP 500 and 4500, up to --tries times each, and counts the\n" +
			"answers, so it tells blocked from lossy or rate-limited UDP. Its only proposal is of private-use\n" +
			"transforms, which a responder must refuse (NO_PROPOSAL_CHOSEN): it answers, and keeps nothing. It\n" +
			"connects to each --tcp-port twice; an iketcp server answers each connection with the address and\n" +
			"port it saw (and nothing else), which tells whether there is NAT on the way and whether it keeps\n" +
			"ports. Where no iketcp server answers, it tries a framed IKE_SA_INIT (an RFC 9329 responder). With\n" +
			"--tls it does the same inside TLS 1.3 and shows the certificate, its pin, and whether the check\n" +
			"`iketcp client --tls` would make passes. It ends with a verdict in plain language.\n\n" +
			"Exit status: 0 when some way reached the hub, 2 when none did, 1 on an error.",
		Flags: []cli.Flag{
			&cli.UintSliceFlag{Name: "udp-port", Value: cli.NewUintSlice(500, 4500), Usage: "UDP ports to send IKE_SA_INIT to (4500 and others with the non-ESP marker)"},
			&cli.UintSliceFlag{Name: "tcp-port", Value: cli.NewUintSlice(4500), Usage: "TCP ports of the hub's iketcp server or RFC 9329 responder (repeat: --tcp-port 4500 --tcp-port 443)"},
			&cli.BoolFlag{Name: "tls", Usage: "also try TLS 1.3 on each TCP port"},
			&cli.StringFlag{Name: "tls-server-name", Usage: "--tls: the name sent and checked (default: HOST)"},
			&cli.StringFlag{Name: "tls-ca", Usage: "--tls: check the certificate against these CAs, as iketcp client --tls-ca would"},
			&cli.StringFlag{Name: "tls-pin", Usage: "--tls: check the certificate's key against this pin, as iketcp client --tls-pin would"},
			&cli.IntFlag{Name: "tries", Value: 3, Usage: "IKE_SA_INIT requests per UDP port (1 to 10)"},
			&cli.DurationFlag{Name: "wait", Value: time.Second, Usage: "how long to wait for each answer (100ms to 10s; a TCP connection gets three times as long)"},
			&cli.BoolFlag{Name: "json", Usage: "print the report as JSON"},
		},
		Action: runProbe,
	}
}

func runProbe(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("probe takes one HOST (the hub's name or address), got %d arguments", c.NArg())
	}
	if t := c.Int("tries"); t < 1 || t > 10 {
		return fmt.Errorf("--tries %d: want 1 to 10", t)
	}
	if w := c.Duration("wait"); w < 100*time.Millisecond || w > 10*time.Second {
		return fmt.Errorf("--wait %v: want 100ms to 10s", w)
	}
	ports := func(name string) ([]uint16, error) {
		var out []uint16
		for _, p := range c.UintSlice(name) {
			if p == 0 || p > 65535 {
				return nil, fmt.Errorf("--%s %d: want 1 to 65535", name, p)
			}
			out = append(out, uint16(p))
		}
		return out, nil
	}
	udp, err := ports("udp-port")
	if err != nil {
		return err
	}
	tcp, err := ports("tcp-port")
	if err != nil {
		return err
	}
	r, err := probe.Run(c.Context, probe.Options{
		Host:     c.Args().First(),
		UDPPorts: udp,
		TCPPorts: tcp,
		TLS:      c.Bool("tls"),
		TLSOptions: dial.TLSOptions{
			ServerName: c.String("tls-server-name"),
			CAFile:     c.String("tls-ca"),
			Pin:        c.String("tls-pin"),
		},
		Tries: c.Int("tries"),
		Wait:  c.Duration("wait"),
	})
	if err != nil {
		return err
	}
	if c.Bool("json") {
		enc := json.NewEncoder(c.App.Writer)
		enc.SetIndent("", "  ")
		if err := enc.Encode(r); err != nil {
			return err
		}
	} else {
		fmt.Fprint(c.App.Writer, r.Format())
	}
	if !r.Reachable {
		return cli.Exit("", exitUnreachable)
	}
	return nil
}
