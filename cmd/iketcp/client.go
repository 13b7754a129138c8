package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/nat/fakenet"
	"github.com/iketcp/iketcp/nat/intercept"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/dial"
	"github.com/iketcp/iketcp/relay/fakelink"
	"github.com/iketcp/iketcp/relay/streamlink"
)

func clientCommand() *cli.Command {
	return &cli.Command{
		Name:  "client",
		Usage: "relay a local IKE daemon's UDP to an iketcp server over RFC 9329 TCP",
		UsageText: "iketcp client --peer HOST:PORT [--listen HOST:PORT] [--transport tcp|udp|auto] [options]\n" +
			"   iketcp client --tun --peer HUB [--peer HUB2 ...] [--tcp-port PORT] [options]\n\n" +
			"Examples:\n\n" +
			"   # explicit mode: strongSwan sends to 127.0.0.1:14500 from its port 4500\n" +
			"   iketcp client --listen 127.0.0.1:14500 --peer hub.example.net:4500\n\n" +
			"   # UDP first, TCP when UDP is blocked, racing the two after the first retransmission\n" +
			"   iketcp client --peer hub.example.net:4500 --transport auto --race\n\n" +
			"   # transparent mode: the daemon unchanged (needs CAP_NET_ADMIN)\n" +
			"   iketcp client --tun --peer 203.0.113.2\n\n" +
			"   # TLS 1.3 to a server with a self-signed certificate\n" +
			"   iketcp client --peer hub.example.net:443 --tls --tls-pin sha256:9f86d0...",
		Description: "The client gives each IKE SA of the local daemon a TCP connection of its own to the server and\n" +
			"reconnects with backoff when it breaks; the IKE SA survives. `iketcp probe HUB` says beforehand\n" +
			"which transport a site needs. Every flag is also an IKETCP_* variable.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:14500", Usage: "explicit mode: UDP address the IKE daemon sends to (its remote address and port)", EnvVars: envVar("listen")},
			&cli.StringSliceFlag{Name: "peer", Usage: "explicit mode: the iketcp server, host:port; --tun: an IKE peer's address, where an iketcp server listens on --tcp-port (repeat for several)", EnvVars: envVar("peer")},
			&cli.StringFlag{Name: "transport", Value: "tcp", Usage: "tcp (RFC 9329 to the iketcp server), udp (straight to the peer's NAT-T port: a plain NAT-T relay), udp-fallback-tcp or its alias auto (UDP first, TCP when UDP gets no answer)", EnvVars: envVar("transport")},
			&cli.DurationFlag{Name: "fallback-threshold", Value: fallback.DefaultThreshold, Usage: "auto: how long UDP may go unanswered before the daemon's next retransmission goes over TCP (1s to 300s)", EnvVars: envVar("fallback-threshold")},
			&cli.BoolFlag{Name: "race", Usage: "auto: open TCP alongside UDP after the daemon's first unanswered retransmission and keep whichever answers first", EnvVars: envVar("race")},
			&cli.UintFlag{Name: "udp-port", Value: 4500, Usage: "udp, auto: the peer's UDP NAT-T port (its IKE daemon's own)", EnvVars: envVar("udp-port")},
			&cli.BoolFlag{Name: "plain-rfc9329", Usage: "the server is a third-party RFC 9329 responder (a FortiGate, libreswan with espintcp): send only RFC 9329 frames, none of iketcp's own (sessions then come back after a reconnect only through IKE)", EnvVars: envVar("plain-rfc9329")},
			&cli.BoolFlag{Name: "tls", Usage: "wrap each connection in TLS 1.3 (the IKETCP prefix goes inside), checking the server's certificate against the system's roots, --tls-ca or --tls-pin", EnvVars: envVar("tls")},
			&cli.StringFlag{Name: "tls-server-name", Usage: "--tls: the name the server's certificate must carry (default: the host of --peer)", EnvVars: envVar("tls-server-name")},
			&cli.StringFlag{Name: "tls-ca", Usage: "--tls: a PEM file of the CAs that may sign the server's certificate (default: the system's roots)", EnvVars: envVar("tls-ca")},
			&cli.StringFlag{Name: "tls-pin", Usage: "--tls: the SHA-256 of the server's public key (SubjectPublicKeyInfo), hex, as sha256:<hex>; alone it is the whole check", EnvVars: envVar("tls-pin")},
			&cli.BoolFlag{Name: "tls-insecure", Usage: "--tls: check nothing of the server's certificate (labs only: anyone on the path can pose as the server)", EnvVars: envVar("tls-insecure")},
			&cli.StringFlag{Name: "tls-client-cert", Usage: "--tls: a PEM certificate to prove this client's identity to a server that asks (with --tls-client-key)", EnvVars: envVar("tls-client-cert")},
			&cli.StringFlag{Name: "tls-client-key", Usage: "--tls: the key of --tls-client-cert", EnvVars: envVar("tls-client-key")},
			&cli.StringFlag{Name: "http-proxy", Usage: "reach the server through this HTTP proxy with CONNECT, http://[user:password@]host:port (for networks whose only way out is a proxy)", EnvVars: envVar("http-proxy")},
			&cli.BoolFlag{Name: "tun", Usage: "transparent mode: intercept the unchanged daemon's UDP 500/4500 and ESP to the peers through a TUN device (needs CAP_NET_ADMIN)", EnvVars: envVar("tun")},
			&cli.UintFlag{Name: "tcp-port", Value: 4500, Usage: "--tun: the iketcp server's TCP port on each peer", EnvVars: envVar("tcp-port")},
			&cli.StringFlag{Name: "tun-name", Value: "iketcp0", Usage: "--tun: the TUN device's name", EnvVars: envVar("tun-name")},
			&cli.IntFlag{Name: "tun-table", Value: 4500, Usage: "--tun: routing table for intercepted traffic (iketcp owns it: stale routes there are removed)", EnvVars: envVar("tun-table")},
			&cli.UintFlag{Name: "tun-mark", Value: 0x4500, Usage: "--tun: fwmark on iketcp's own sockets, which bypass interception", EnvVars: envVar("tun-mark")},
			&cli.IntFlag{Name: "tun-priority", Value: 100, Usage: "--tun: priority of iketcp's policy rules (bypass rule; interception rules at +1); must come before other rules that route the peers", EnvVars: envVar("tun-priority")},
			&cli.IntFlag{Name: "max-flows", Value: client.DefaultMaxFlows, Usage: "most local daemon addresses served at once", EnvVars: envVar("max-flows")},
			&cli.DurationFlag{Name: "flow-idle", Value: client.DefaultFlowIdle, Usage: "close a flow whose daemon has sent nothing for this long", EnvVars: envVar("flow-idle")},
			&cli.DurationFlag{Name: "dial-timeout", Value: client.DefaultDialTimeout, Usage: "give up a connection attempt after this long", EnvVars: envVar("dial-timeout")},
			&cli.StringSliceFlag{Name: "member", Usage: "an aggregate member, NAME=LOCAL_ADDR->HUB:PORT: a link that leaves by LOCAL_ADDR (its uplink) to the iketcp server at HUB:PORT; repeat for each (instead of --peer); members may share an uplink; with --encap fake-tcp a member leaves with LOCAL_ADDR as its source but by the route to HUB (0.0.0.0: the masquerade's address)", EnvVars: envVar("member")},
			&cli.StringFlag{Name: "location-id", Usage: "--member: this site's location ID, a dotted quad (FortiOS's location-id)", EnvVars: envVar("location-id")},
			&cli.StringFlag{Name: "aggregate", Value: "round-robin", Usage: "--member: how datagrams are spread over the live members: round-robin, weighted, redundant, l3, l4 (per SA) or least-latency", EnvVars: envVar("aggregate")},
			reorderFlag(),
			&cli.StringSliceFlag{Name: "weight", Usage: "--aggregate weighted: a member's weight, NAME=N (default 1)", EnvVars: envVar("weight")},
			&cli.DurationFlag{Name: "reconnect-max", Value: client.DefaultReconnectMax, Usage: "longest wait between reconnection attempts", EnvVars: envVar("reconnect-max")},
			&cli.DurationFlag{Name: "liveness-timeout", Value: client.DefaultLivenessTimeout, Usage: "take a connection for dead, and reconnect, once it has heard nothing for this long: an iketcp server is pinged when the connection is quiet; toward any server, TCP_USER_TIMEOUT and keepalives hold the same bound (0: leave it to TCP, which takes minutes)", EnvVars: envVar("liveness-timeout")},
		}, commonFlags("client")...),
		Action: runClient,
	}
}

// checkClient checks a client's flags without starting anything.
func checkClient(c *cli.Context) error {
	if err := checkCommon(c, "max-flows", "flow-idle", "dial-timeout", "reconnect-max"); err != nil {
		return err
	}
	liveness := c.Duration("liveness-timeout")
	if liveness != 0 && (liveness < time.Second || liveness > 10*time.Minute) {
		return fmt.Errorf("--liveness-timeout %v: want 0 (off) or 1s to 10m", liveness)
	}
	if liveness == 0 {
		liveness = -1 // client.Config: off
	}
	mode, err := fallback.ParseMode(c.String("transport"))
	if err != nil {
		return fmt.Errorf("--transport: %w", err)
	}
	if err := fallback.CheckThreshold(c.Duration("fallback-threshold")); err != nil {
		return fmt.Errorf("--fallback-threshold: %w", err)
	}
	if c.Bool("race") && mode != fallback.ModeFallback {
		return fmt.Errorf("--race races TCP against UDP: it needs --transport auto (or udp-fallback-tcp), not %s", mode)
	}
	if l := c.Duration("liveness-timeout"); l != 0 && (l < time.Second || l > 10*time.Minute) {
		return fmt.Errorf("--liveness-timeout %v: want 0 (off) or 1s to 10m", l)
	}
	if p := c.Uint("udp-port"); p == 0 || p > 65535 {
		return fmt.Errorf("--udp-port %d: want 1 to 65535", p)
	}
	if c.String("encap") == encapFakeTCP {
		if c.Bool("tls") || c.IsSet("http-proxy") {
			return errors.New("--tls and --http-proxy go with --encap rfc9329: fake-TCP's segments carry no stream")
		}
		if mode == fallback.ModeUDP {
			return errors.New("--encap fake-tcp carries the TCP transport; --transport udp never uses it")
		}
	}
	if !c.Bool("tls") {
		for _, f := range []string{"tls-server-name", "tls-ca", "tls-pin", "tls-insecure", "tls-client-cert", "tls-client-key"} {
			if c.IsSet(f) {
				return fmt.Errorf("--%s goes with --tls", f)
			}
		}
	}
	if v := c.String("http-proxy"); v != "" {
		if _, err := dial.ParseProxyURL(v); err != nil {
			return fmt.Errorf("--http-proxy: %w", err)
		}
	}
	peers := c.StringSlice("peer")
	if c.IsSet("member") {
		// The members as aggregateConfig takes them, without dialers.
		return aggregateConfig(c, new(client.Config), func(netip.Addr) (relay.Dialer, error) { return nil, nil })
	}
	if len(peers) == 0 {
		return errors.New("--peer is required: the iketcp server, host:port (or, with --tun, the IKE peer's address), or give --member")
	}
	if c.Bool("tun") {
		if c.IsSet("listen") {
			return errors.New("--listen is for explicit mode; with --tun the daemon keeps its own ports")
		}
		if port := c.Uint("tcp-port"); port == 0 || port > 65535 {
			return fmt.Errorf("--tcp-port %d: want 1 to 65535", port)
		}
		if c.Uint("tun-mark") == 0 || c.Uint("tun-mark") > 0xffffffff {
			return fmt.Errorf("--tun-mark %#x: want a non-zero 32-bit mark", c.Uint("tun-mark"))
		}
		for _, a := range peers {
			if _, _, err := net.SplitHostPort(a); err == nil {
				return fmt.Errorf("--peer %q: with --tun, --peer is the IKE peer's address; its iketcp server's port is --tcp-port", a)
			}
		}
		return nil
	}
	if len(peers) != 1 {
		return fmt.Errorf("--peer: explicit mode takes one iketcp server (host:port), got %d", len(peers))
	}
	if _, _, err := net.SplitHostPort(peers[0]); err != nil {
		return fmt.Errorf("--peer %q: %w (want the iketcp server's host:port, e.g. 203.0.113.2:4500; or use --tun)", peers[0], err)
	}
	return nil
}

// runClient runs one client, or one per tunnel of the --config file, in
// this process.
func runClient(c *cli.Context) error {
	ins, err := instances(c)
	if err != nil {
		return err
	}
	for _, in := range ins {
		if err := checkClient(in.ctx); err != nil {
			return &configError{in.located(err)}
		}
	}
	p, err := newProc(c, ins)
	if err != nil {
		return err
	}
	defer p.close()
	var cleanups []func()
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}()
	var relays []func(context.Context) error
	for _, in := range ins {
		log := p.log
		if len(ins) > 1 {
			log = log.With("tunnel", in.name)
		}
		relay, cleanup, err := setupClient(p, in, log)
		if cleanup != nil {
			cleanups = append(cleanups, cleanup)
		}
		if err != nil {
			return in.located(err)
		}
		relays = append(relays, relay)
	}
	return p.run(c, relays)
}

// setupClient makes one client instance ready to run. cleanup, when not
// nil, removes what it installed.
func setupClient(p *proc, in *instance, log *slog.Logger) (relayFn func(context.Context) error, cleanup func(), err error) {
	var run func(context.Context) error
	c := in.ctx
	var cleanups []func()
	cleanup = func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}
	mode, _ := fallback.ParseMode(c.String("transport")) // checked
	liveness := c.Duration("liveness-timeout")
	if liveness == 0 {
		liveness = -1 // client.Config: off
	}
	counters := new(relay.Counters)
	cfg := client.Config{
		Counters:          counters,
		PlainRFC9329:      c.Bool("plain-rfc9329"),
		Transport:         mode,
		FallbackThreshold: c.Duration("fallback-threshold"),
		Race:              c.Bool("race"),
		UDPPort:           uint16(c.Uint("udp-port")),
		Logger:            log,
		MaxFlows:          c.Int("max-flows"),
		FlowIdle:          c.Duration("flow-idle"),
		QueueBytes:        c.Int("queue-bytes"),
		QueueDelay:        c.Duration("queue-delay"),
		MaxDatagram:       c.Int("max-datagram"),
		DialTimeout:       c.Duration("dial-timeout"),
		ReconnectMax:      c.Duration("reconnect-max"),
		LivenessTimeout:   liveness,
		Version:           versionString(),
		ReorderMax:        reorderMax(c),
	}
	switch c.String("encap") {
	case encapRFC9329:
		d, err := streamDialer(c, log, counters)
		if err != nil {
			return nil, cleanup, err
		}
		cfg.Dialer = d
		if c.IsSet("member") && c.IsSet("http-proxy") {
			return nil, cleanup, errors.New("--member and --http-proxy exclude each other: each member leaves by its own address")
		}
		err = aggregateConfig(c, &cfg, func(local netip.Addr) (relay.Dialer, error) {
			md, err := streamDialer(c, log, counters)
			if err != nil {
				return nil, err
			}
			md.Dial = localDial(local)
			return md, nil
		})
		if err != nil {
			return nil, cleanup, err
		}
		logAggregate(log, &cfg)
	case encapFakeTCP:
		members, sources, err := fakeTCPMembers(c, &cfg)
		if err != nil {
			return nil, cleanup, err
		}
		ft, err := startFakeTCP(c, log, fakenet.Client, 0, sources)
		if err != nil {
			return nil, cleanup, err
		}
		cleanups = append(cleanups, ft.stop)
		stack := ft.stack
		cfg.Dialer = &fakelink.Dialer{Stack: stack}
		for i, d := range members {
			d.Stack = stack
			log.Info("fake-TCP member", "member", cfg.Members[i].Name, "source", orMasquerade(d.Source), "ports", d.Ports.String())
		}
		logAggregate(log, &cfg)
	}
	peers := c.StringSlice("peer")
	var cl *client.Client
	if len(cfg.Members) > 0 || !c.Bool("tun") {
		if len(cfg.Members) == 0 {
			cfg.Peer = peers[0]
		}
		if cl, err = client.New(cfg); err != nil {
			return nil, cleanup, err
		}
		pc, err := client.ListenUDP(c.String("listen"))
		if err != nil {
			return nil, cleanup, err
		}
		run = func(ctx context.Context) error { return cl.Serve(ctx, pc) }
	} else {
		var tun *intercept.Interceptor
		if tun, err = openTransparent(c, log, &cfg, peers); err != nil {
			return nil, cleanup, err
		}
		cleanups = append(cleanups, func() {
			if err := tun.Close(); err != nil {
				log.Error("removing the TUN device, rules and routes", "err", err)
			} else {
				log.Info("interception removed", "device", tun.Name())
			}
		})
		if cl, err = client.New(cfg); err != nil {
			return nil, cleanup, err
		}
		run = func(ctx context.Context) error { return cl.ServeTUN(ctx, tun, tun.Name()) }
	}
	p.onDrain(cl.Drain)
	if p.metrics != nil {
		p.metrics.add(relay.RoleClient, in.name, counters, func() *relay.Status { return cl.Status() })
	}
	switch {
	case c.Bool("tun"):
		p.need(needNetAdmin("--tun marks each new connection's socket to bypass the interception, and removes the device, rules and routes at exit"))
	case c.String("encap") == encapFakeTCP:
		p.need(needNetAdmin("fake-TCP's device, nftables table and forwarding are removed at exit"))
	}
	ctl := c.String("control")
	return func(ctx context.Context) error {
		return serve(ctx, log, ctl, func() any { return cl.Status() }, run)
	}, cleanup, nil
}

// openTransparent opens the TUN device, rules and routes that intercept
// the daemon's traffic to peers, and fits cfg to them. The caller closes
// the interceptor, whatever ends the run.
func openTransparent(c *cli.Context, log *slog.Logger, cfg *client.Config, peerArgs []string) (*intercept.Interceptor, error) {
	peers, err := resolvePeers(peerArgs)
	if err != nil {
		return nil, err
	}
	icfg := intercept.Config{
		Peers:    peers,
		Name:     c.String("tun-name"),
		Table:    c.Int("tun-table"),
		Mark:     uint32(c.Uint("tun-mark")),
		Priority: c.Int("tun-priority"),
		Logger:   log,
	}
	tun, err := intercept.Open(icfg)
	if err != nil {
		return nil, err
	}
	log.Info("intercepting", "device", tun.Name(), "peers", fmt.Sprint(peers), "table", icfg.Table, "mark", fmt.Sprintf("%#x", tun.Mark()))
	cfg.Peers = peers
	cfg.TCPPort = uint16(c.Uint("tcp-port"))
	cfg.Control = intercept.SetMark(tun.Mark()) // iketcp's own sockets bypass the TUN
	if d, ok := cfg.Dialer.(*streamlink.Dialer); ok {
		d.Control = cfg.Control
		if d.Dial != nil { // through the proxy: its connection bypasses the TUN too
			u, _ := dial.ParseProxyURL(c.String("http-proxy"))
			d.Dial = dial.ViaHTTPProxy(u, dial.Direct(cfg.Control))
		}
	}
	return tun, nil
}

// resolvePeers turns --peer values into addresses, resolving names once.
func resolvePeers(args []string) ([]netip.Addr, error) {
	var peers []netip.Addr
	for _, a := range args {
		if _, _, err := net.SplitHostPort(a); err == nil {
			return nil, fmt.Errorf("--peer %q: with --tun, --peer is the IKE peer's address; its iketcp server's port is --tcp-port", a)
		}
		if ip, err := netip.ParseAddr(a); err == nil {
			peers = append(peers, ip.Unmap())
			continue
		}
		ips, err := net.DefaultResolver.LookupNetIP(context.Background(), "ip", a)
		if err != nil || len(ips) == 0 {
			return nil, fmt.Errorf("--peer %q: not an address, and it does not resolve: %v", a, err)
		}
		for _, ip := range ips {
			peers = append(peers, ip.Unmap())
		}
	}
	return peers, nil
}

// streamDialer is the RFC 9329 dialer the flags ask for: TLS checked as
// --tls-* say, through --http-proxy.
func streamDialer(c *cli.Context, log *slog.Logger, counters *relay.Counters) (*streamlink.Dialer, error) {
	lc := linkConfig(c, counters, log)
	lc.DeadAfter = c.Duration("liveness-timeout")
	d := streamlink.NewDialer(lc)
	if c.Bool("tls") {
		cfg, err := dial.TLSConfig(dial.TLSOptions{
			ServerName: c.String("tls-server-name"),
			CAFile:     c.String("tls-ca"),
			Pin:        c.String("tls-pin"),
			Insecure:   c.Bool("tls-insecure"),
			ClientCert: c.String("tls-client-cert"),
			ClientKey:  c.String("tls-client-key"),
		})
		if err != nil {
			return nil, err
		}
		if c.Bool("tls-insecure") {
			log.Warn(dial.InsecureWarning)
		}
		if !c.Bool("plain-rfc9329") {
			// Say so to an iketcp server that shares its port with a web
			// site: the ALPN marks iketcp's clients whatever the name.
			cfg.NextProtos = []string{iketcpALPN}
		}
		d.TLS = cfg
	}
	if v := c.String("http-proxy"); v != "" {
		u, err := dial.ParseProxyURL(v)
		if err != nil {
			return nil, fmt.Errorf("--http-proxy: %w", err)
		}
		d.Dial = dial.ViaHTTPProxy(u, dial.Direct(nil))
	}
	return d, nil
}
