// Command iketcp-lab runs iketcp's carrier-NAT lab by hand: `demo` builds
// three network namespaces (site, carrier, hub), makes the carrier
// masquerade and drop every UDP packet, brings a real strongSwan tunnel up
// through `iketcp client` and `iketcp server`, shows what happened, and
// tears everything down on exit. `up`, `test` and `down` keep a lab up
// between commands, with the carrier profile a user picks (open,
// block-udp, cgnat, strict-tcp, slow), to rehearse traversal before going
// to the field. `deps` installs what the lab needs; `interop-deps` builds the
// User-Mode Linux kernel and unpacks libreswan for the interoperability
// tests (package integration/uml).
// `bench` measures iketcp as whole processes against the best baselines
// the machine offers (package integration/perf).
//
// It is the program behind `make demo`, `make deps` and `make bench`; the integration
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
		Commands: append([]*cli.Command{
			{
				Name:      "deps",
				Usage:     "install the lab's Debian packages if any tool is missing (needs root)",
				UsageText: "iketcp-lab deps\n\nExample:\n\n   sudo iketcp-lab deps   # what make deps runs",
				Action:    runDeps,
			},
			vulncheckCommand(),
			{
				Name:  "demo",
				Usage: "bring a tunnel up over iketcp through a UDP-blocking carrier, show it, tear it down",
				UsageText: "iketcp-lab demo [--transparent | --fake-tcp] [--keep] [--iketcp PATH]\n\n" +
					"Examples:\n\n" +
					"   iketcp-lab demo                 # what make demo runs\n" +
					"   iketcp-lab demo --fake-tcp --keep",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "iketcp", Value: defaultBinary(), Usage: "the iketcp binary to run"},
					&cli.BoolFlag{Name: "keep", Usage: "keep the lab up until Ctrl-C, to explore it"},
					&cli.BoolFlag{Name: "transparent", Usage: "transparent mode: the site's strongSwan keeps its normal configuration and iketcp client --tun intercepts its traffic"},
					&cli.BoolFlag{Name: "fake-tcp", Usage: "fake-TCP mode, through a carrier that also checks TCP sequence numbers as an anti-replay NAT box does"},
				},
				Action: runDemo,
			},
			benchCommand(),
			interopDepsCommand(),
		},
			userLabCommands()...),
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
	missing := append(append(append(lab.MissingTools(), lab.MissingBenchTools()...), lab.MissingPackagingTools()...), lab.MissingFaultTools()...)
	if len(missing) == 0 {
		fmt.Println("lab tools present")
		return nil
	}
	fmt.Printf("installing the lab's packages (missing: %s)\n", strings.Join(missing, ", "))
	if err := lab.InstallPackages(c.Context, os.Stdout); err != nil {
		return err
	}
	if still := append(append(append(lab.MissingTools(), lab.MissingBenchTools()...), lab.MissingPackagingTools()...), lab.MissingFaultTools()...); len(still) > 0 {
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
	err = demo(setup, l, bin, scenario{transparent: c.Bool("transparent"), fakeTCP: c.Bool("fake-tcp")})
	if err == nil && c.Bool("keep") {
		keep(ctx, l, bin)
	}
	if err != nil {
		l.DumpLogs(func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }, 30)
	}
	return err
}

// scenario is what a demo shows beyond the default (explicit mode, RFC
// 9329 through a carrier that drops UDP).
type scenario struct {
	transparent bool // the site's daemon unchanged, iketcp client --tun
	fakeTCP     bool // fake-TCP, through a strict anti-replay middlebox
}

func demo(ctx context.Context, l *lab.Lab, bin string, sc scenario) error {
	transparent := sc.transparent
	// The carrier is one of the user lab's profiles (iketcp-lab up):
	// block-udp, or strict-tcp for fake-TCP.
	profile := lab.ProfileBlockUDP
	if sc.fakeTCP {
		profile = lab.ProfileStrictTCP
	}
	if err := l.SetProfile(ctx, profile); err != nil {
		return err
	}
	var opts lab.TunnelOptions
	mb := l.Middlebox()
	if sc.fakeTCP {
		say("The carrier also checks TCP sequence numbers, as an anti-replay NAT box does: repeats are dropped")
		opts.ServerArgs = []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.251.0/30"}
		opts.ClientArgs = []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.250.0/30"}
	}
	capture, err := l.Carrier.Capture(ctx, lab.CarrierHubIface, "tcp port 4500", filepath.Join(l.Dir, "carrier.pcap"))
	if err != nil {
		return err
	}
	say("Starting strongSwan on both ends, iketcp server on the hub and iketcp client at the site")
	var rulesBefore string
	opts.Binary, opts.Transparent = bin, transparent
	opts.BeforeClient = func(ctx context.Context) error {
		out, err := l.Site.Run(ctx, "ip", "rule")
		rulesBefore = string(out)
		return err
	}
	tun, err := l.StartTunnel(ctx, opts)
	if err != nil {
		return err
	}
	if transparent {
		fmt.Println(indent(fmt.Sprintf(`hub:  iketcp server --listen %s:%d --backend 127.0.0.1:4500
site: iketcp client --tun --peer %s
site strongSwan: unchanged: remote_addrs = %s, default ports 500/4500 (MOBIKE on)`,
			lab.HubOuter, lab.ServerPort, lab.HubOuter, lab.HubOuter)))
		say("The policy rules iketcp added at the site (ip rule)")
		out, err := l.Site.Run(ctx, "ip", "rule")
		if err != nil {
			return err
		}
		fmt.Println(indent(string(out)))
	} else {
		encap := ""
		if sc.fakeTCP {
			encap = " --encap fake-tcp"
		}
		fmt.Println(indent(fmt.Sprintf(`hub:  iketcp server%s --listen %s:%d --backend 127.0.0.1:4500
site: iketcp client%s --listen 127.0.0.1:%d --peer %s:%d
site strongSwan: remote_addrs = 127.0.0.1, remote_port = %d, local_port = 4500 (MOBIKE on)`,
			encap, lab.HubOuter, lab.ServerPort, encap, lab.ClientListenPort, lab.HubOuter, lab.ServerPort, lab.ClientListenPort)))
	}

	say("Initiating the IKE SA from the site (swanctl --initiate)")
	start := time.Now()
	sa, err := tun.Initiate(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("    %s in %v: IKE SA %s/%s, site %s -> %s, child INSTALLED, UDP-encapsulated ESP\n",
		sa.State, time.Since(start).Round(time.Millisecond), sa.InitiatorSPI, sa.ResponderSPI, sa.LocalHost, sa.RemoteHost)

	say("Pinging %s -> %s through the tunnel", lab.SiteInner, lab.HubInner)
	got, err := tun.PingThrough(ctx, 5, 200*time.Millisecond)
	if err != nil {
		return err
	}
	fmt.Printf("    %d of 5 replies\n", got)
	if got == 0 {
		return errors.New("no ping crossed the tunnel")
	}
	leaked, err := l.UDPDropped(ctx)
	if err != nil {
		return err
	}

	probePorts := []string{"500", "4500"}
	if transparent {
		// iketcp would intercept a probe to 500 or 4500, as it should.
		probePorts = []string{"5000", "5001"}
		say("The carrier drops UDP: probing the hub's UDP ports 5000 and 5001 from the site " +
			"(iketcp intercepts only 500 and 4500)")
	} else {
		say("The carrier drops UDP: probing the hub's IKE ports 500 and 4500 from the site")
	}
	for _, port := range probePorts {
		if c, err := l.Site.Dial(ctx, "udp", lab.HubOuter+":"+port); err == nil {
			c.Write(make([]byte, 64))
			c.Close()
		}
	}
	time.Sleep(200 * time.Millisecond)
	probed, err := l.UDPDropped(ctx)
	if err != nil {
		return err
	}
	fmt.Printf("    carrier's udp_dropped counter: %d -> %d\n", leaked, probed)

	say("iketcp status on the hub")
	text, err := tun.StatusText(ctx, l.Hub, tun.ServerControl)
	if err != nil {
		return err
	}
	fmt.Println(indent(text))
	say("iketcp status at the site")
	if text, err = tun.StatusText(ctx, l.Site, tun.ClientControl); err != nil {
		return err
	}
	fmt.Println(indent(text))

	if sc.fakeTCP {
		say("A burst of 200 pings through the strict middlebox")
		got, err := tun.PingThrough(ctx, 200, 10*time.Millisecond)
		if err != nil {
			return err
		}
		st := mb.Stats()
		fmt.Printf("    %d of 200 replies; the middlebox accepted %d segments and dropped %d\n", got, st.Accepted, st.Dropped())
	} else {
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
	}

	if err := capture.Stop(); err != nil {
		return err
	}
	prefix, _ := lab.FirstTCPPayload(capture.Path, lab.ServerPort, len(framing.Prefix))
	tcp, _ := l.TCPForwarded(ctx)
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		return err
	}
	backend := "?"
	if len(st.Sessions) > 0 {
		backend = st.Sessions[0].Local
	}

	// charon logs each packet twice; the line with its size is the one.
	from500 := tun.Site.CountInLog("sending packet: from " + lab.SiteOuter + "[500] to " + lab.HubOuter + "[500] (")
	restored := ""
	if transparent {
		say("Stopping iketcp client (SIGTERM): it removes its device, rules and routes")
		if err := tun.StopClient(); err != nil {
			return err
		}
		out, err := l.Site.Run(ctx, "ip", "rule")
		if err != nil {
			return err
		}
		fmt.Println(indent(string(out)))
		restored = "different from"
		if string(out) == rulesBefore {
			restored = "the same as"
		}
	}

	say("What to notice")
	notes := fmt.Sprintf(`- Neither strongSwan knows about TCP. The carrier forwarded %d TCP packets and
  dropped every UDP packet it saw (%d, all of them the probes above).`, tcp, probed)
	if sc.fakeTCP {
		resets, _ := lab.CountTCPFlags(capture.Path, lab.TCPFlagRST)
		st := mb.Stats()
		notes += fmt.Sprintf(`
- Fake-TCP: each IKE and ESP packet travelled in a TCP segment of its own,
  built by iketcp; no kernel TCP stream owns them, so nothing waits behind
  a lost one. The carrier saw %d TCP resets: no kernel answered them.
- Their sequence numbers advance like a healthy connection's, so the strict
  middlebox dropped %d of %d. FortiOS's fortinet-esp repeats one sequence
  number, and such a box drops it (see --fake-tcp-seq frozen in the README).
- The hub's strongSwan sees its peer at %s: the iketcp server's own socket
  for this session, whatever happens to the fake-TCP connection.`, resets, st.Dropped(), st.Accepted+st.Dropped(), backend)
	} else {
		notes += fmt.Sprintf(`
- The TCP stream on the carrier begins with %q, RFC 9329's prefix, then
  length-framed IKE and ESP.
- The hub's strongSwan sees its peer at %s: the iketcp server's own socket
  for this session. The port stays the same across reconnects, so MOBIKE
  (on) never sees the peer move, and the SA survived the cut above.`, prefix, backend)
	}
	notes += `
- NAT keepalives stay off the TCP stream (RFC 9329 6.6); TCP keepalives
  refresh the carrier's NAT mapping instead.
- iketcp status prints each session like FortiOS's "diagnose vpn ike
  gateway list"; iketcp status --json gives the same for scripts.`
	if transparent {
		notes += fmt.Sprintf(`
- Transparent mode: the site's strongSwan kept its normal configuration.
  It sent %d packet(s) from port 500 to %s:500 (IKE_SA_INIT), detected NAT
  and floated to 4500 (its SA shows %s -> %s). All of it went into
  iketcp's TUN device: %d of its UDP packets reached the carrier.
- iketcp's rules pick only UDP 500/4500 and ESP to the peer, at priority
  100/101, before strongSwan's table 220. After iketcp exited, ip rule was
  %s before it started.`, from500, lab.HubOuter, sa.LocalHost, sa.RemoteHost, leaked, restored)
	}
	notes += `
- Run with --keep to explore the lab (capture, logs, namespaces) before
  it is torn down.`
	fmt.Println(indent(notes))
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
