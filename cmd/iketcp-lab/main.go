// Command iketcp-lab runs iketcp's carrier-NAT lab by hand: `demo` builds
// three network namespaces (site, carrier, hub), makes the carrier
// masquerade and drop every UDP packet, brings a real strongSwan tunnel up
// through `iketcp client` and `iketcp server`, shows what happened, and
// tears everything down on exit. `deps` installs what the lab needs.
//
// It is the program behind `make demo` and `make deps`; the integration
// tests drive the same scenario through package integration/lab.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/integration/lab"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	app := &cli.App{
		Name:  "iketcp-lab",
		Usage: "iketcp's carrier-NAT lab: real strongSwan tunnels through a carrier that blocks UDP",
		Commands: []*cli.Command{
			{
				Name:   "deps",
				Usage:  "install the lab's Debian packages if any tool is missing (needs root)",
				Action: runDeps,
			},
			{
				Name:  "demo",
				Usage: "bring a tunnel up over iketcp through a UDP-blocking carrier, show it, tear it down",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "iketcp", Value: defaultBinary(), Usage: "the iketcp binary to run"},
					&cli.BoolFlag{Name: "keep", Usage: "keep the lab up until Ctrl-C, to explore it"},
				},
				Action: runDemo,
			},
		},
		HideHelpCommand: true,
	}
	if err := app.RunContext(ctx, os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "iketcp-lab:", err)
		stop()
		os.Exit(1)
	}
}

// defaultBinary is iketcp beside this program, as `make build` leaves it.
func defaultBinary() string {
	if exe, err := os.Executable(); err == nil {
		return filepath.Join(filepath.Dir(exe), "iketcp")
	}
	return "iketcp"
}

func runDeps(c *cli.Context) error {
	missing := lab.MissingTools()
	if len(missing) == 0 {
		fmt.Println("lab tools present:", "ip nft charon-systemd swanctl tcpdump ss ping")
		return nil
	}
	fmt.Printf("installing the lab's packages (missing: %s)\n", strings.Join(missing, ", "))
	if err := lab.InstallPackages(c.Context, os.Stdout); err != nil {
		return err
	}
	if still := lab.MissingTools(); len(still) > 0 {
		return fmt.Errorf("still missing after install: %s", strings.Join(still, ", "))
	}
	return nil
}

// say prints a step of the demo.
func say(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}

func runDemo(c *cli.Context) error {
	if why := lab.MissingRequirements(); why != "" {
		return fmt.Errorf("%s (run: make deps)", why)
	}
	bin, err := exec.LookPath(c.String("iketcp"))
	if err != nil {
		return fmt.Errorf("iketcp binary %q: %w (run make build)", c.String("iketcp"), err)
	}
	ctx := c.Context
	dir, err := os.MkdirTemp("", "iketcp-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	say("Building the lab: three network namespaces")
	fmt.Println(indent(`site  (strongSwan, iketcp client)   lo 198.51.100.1   s0 100.64.0.2/24
carrier (NAT, drops all UDP)        c-site 100.64.0.1 | c-hub 203.0.113.1
hub   (strongSwan, iketcp server)   lo 192.0.2.1      h0 203.0.113.2/24`))
	setup, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	l, err := lab.New(setup, lab.Options{Dir: dir, Logf: func(string, ...any) {}})
	if err != nil {
		return err
	}
	defer func() {
		say("Tearing down: stopping daemons by PID, deleting the namespaces")
		if err := l.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "teardown:", err)
		}
	}()
	err = demo(setup, l, bin)
	if err == nil && c.Bool("keep") {
		keep(ctx, l, bin)
	}
	if err != nil {
		l.DumpLogs(func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }, 30)
	}
	return err
}

func demo(ctx context.Context, l *lab.Lab, bin string) error {
	if err := l.BlockUDP(ctx); err != nil {
		return err
	}
	before, err := l.UDPDropped(ctx)
	if err != nil {
		return err
	}
	say("The carrier drops UDP: probing the hub's IKE ports 500 and 4500 from the site")
	for _, port := range []string{"500", "4500"} {
		if c, err := l.Site.Dial(ctx, "udp", lab.HubOuter+":"+port); err == nil {
			c.Write(make([]byte, 64))
			c.Close()
		}
	}
	time.Sleep(200 * time.Millisecond)
	after, err := l.UDPDropped(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("    carrier's udp_dropped counter: %d -> %d\n", before, after)

	capture, err := l.Carrier.Capture(ctx, lab.CarrierHubIface, "tcp port 4500", filepath.Join(l.Dir, "carrier.pcap"))
	if err != nil {
		return err
	}
	say("Starting strongSwan on both ends, iketcp server on the hub and iketcp client at the site")
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: bin})
	if err != nil {
		return err
	}
	fmt.Println(indent(fmt.Sprintf(`hub:  iketcp server --listen %s:%d --backend 127.0.0.1:4500
site: iketcp client --listen 127.0.0.1:%d --peer %s:%d
site strongSwan: remote_addrs = 127.0.0.1, remote_port = %d, local_port = 4500 (MOBIKE on)`,
		lab.HubOuter, lab.ServerPort, lab.ClientListenPort, lab.HubOuter, lab.ServerPort, lab.ClientListenPort)))

	say("Initiating the IKE SA from the site (swanctl --initiate)")
	start := time.Now()
	sa, err := tun.Initiate(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("    %s in %v: IKE SA %s/%s, child INSTALLED, UDP-encapsulated ESP\n",
		sa.State, time.Since(start).Round(time.Millisecond), sa.InitiatorSPI, sa.ResponderSPI)

	say("Pinging %s -> %s through the tunnel", lab.SiteInner, lab.HubInner)
	got, err := tun.PingThrough(ctx, 5, 200*time.Millisecond)
	if err != nil {
		return err
	}
	fmt.Printf("    %d of 5 replies\n", got)
	if got == 0 {
		return errors.New("no ping crossed the tunnel")
	}

	say("iketcp status on the hub")
	text, err := tun.StatusText(ctx, l.Hub, tun.ServerControl)
	if err != nil {
		return err
	}
	fmt.Println(indent(text))

	say("Cutting the TCP connection (ss -K at the site), then pinging again")
	l.Site.Run(ctx, "ss", "-K", "dst", lab.HubOuter, "dport", "=", fmt.Sprint(lab.ServerPort))
	cut := time.Now()
	resumed := time.Duration(0)
	for range 20 {
		if n, _ := l.Ping(ctx, l.Site, lab.SiteInner, lab.HubInner, 1, 0); n == 1 {
			resumed = time.Since(cut)
			break
		}
	}
	sas, err := tun.Site.ListSAs(ctx)
	if err != nil || len(sas) != 1 {
		return fmt.Errorf("site SAs after the cut: %v %v", sas, err)
	}
	if resumed == 0 {
		return errors.New("traffic did not resume after the cut")
	}
	fmt.Printf("    traffic resumed after %v; IKE SA still %s/%s (same SA, no new IKE_SA_INIT)\n",
		resumed.Round(time.Millisecond), sas[0].InitiatorSPI, sas[0].ResponderSPI)

	if err := capture.Stop(); err != nil {
		return err
	}
	prefix, _ := lab.FirstTCPPayload(capture.Path, lab.ServerPort, len(framing.Prefix))
	dropped, _ := l.UDPDropped(ctx)
	tcp, _ := l.TCPForwarded(ctx)
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		return err
	}
	backend := "?"
	if len(st.Sessions) > 0 {
		backend = st.Sessions[0].Local
	}

	say("What to notice")
	fmt.Println(indent(fmt.Sprintf(`- Neither strongSwan knows about TCP: both speak UDP 4500 to a local iketcp.
  The carrier dropped every UDP packet (%d) and forwarded %d TCP packets.
- The TCP stream on the carrier begins with %q, RFC 9329's prefix, then
  length-framed IKE and ESP.
- The hub's strongSwan sees its peer at %s: the iketcp server's own socket
  for this session. The port stays the same across reconnects, so MOBIKE
  (on) never sees the peer move, and the SA survived the cut above.
- NAT keepalives stay off the TCP stream (RFC 9329 6.6); TCP keepalives
  refresh the carrier's NAT mapping instead.
- iketcp status prints each session like FortiOS's "diagnose vpn ike
  gateway list"; iketcp status --json gives the same for scripts.
- Run with --keep to explore the lab (capture, logs, namespaces) before
  it is torn down.`, dropped, tcp, prefix, backend)))
	return nil
}

// keep leaves the lab up until Ctrl-C and says how to look around.
func keep(ctx context.Context, l *lab.Lab, bin string) {
	say("The lab stays up until Ctrl-C. Try:")
	fmt.Println(indent(fmt.Sprintf(`ip netns exec %s ping -I %s %s
ip netns exec %s %s status --control %s
ip netns exec %s nft list table inet %s
tcpdump -r %s -A | less      # the carrier's capture
ls %s                        # configs and logs`,
		l.Site.Name, lab.SiteInner, lab.HubInner,
		l.Hub.Name, bin, filepath.Join(l.Dir, "hub-iketcp.sock"),
		l.Carrier.Name, lab.CarrierTable,
		filepath.Join(l.Dir, "carrier.pcap"), l.Dir)))
	<-ctx.Done()
}
