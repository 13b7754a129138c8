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
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:14500", Usage: "explicit mode: UDP address the IKE daemon sends to (its remote address and port)", EnvVars: envVar("listen")},
			&cli.StringSliceFlag{Name: "peer", Required: true, Usage: "explicit mode: the iketcp server, host:port; --tun: an IKE peer's address, where an iketcp server listens on --tcp-port (repeat for several)", EnvVars: envVar("peer")},
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
			&cli.DurationFlag{Name: "reconnect-max", Value: client.DefaultReconnectMax, Usage: "longest wait between reconnection attempts", EnvVars: envVar("reconnect-max")},
			&cli.DurationFlag{Name: "liveness-timeout", Value: client.DefaultLivenessTimeout, Usage: "take a connection for dead, and reconnect, once it has heard nothing for this long: an iketcp server is pinged when the connection is quiet; toward any server, TCP_USER_TIMEOUT and keepalives hold the same bound (0: leave it to TCP, which takes minutes)", EnvVars: envVar("liveness-timeout")},
		}, commonFlags("client")...),
		Action: runClient,
	}
}

func runClient(c *cli.Context) error {
	log, err := prepare(c, "max-flows", "flow-idle", "dial-timeout", "reconnect-max")
	if err != nil {
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
	if p := c.Uint("udp-port"); p == 0 || p > 65535 {
		return fmt.Errorf("--udp-port %d: want 1 to 65535", p)
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
	}
	switch c.String("encap") {
	case "rfc9329":
		d, err := streamDialer(c, log, counters)
		if err != nil {
			return err
		}
		cfg.Dialer = d
	case "fake-tcp":
		if c.Bool("tls") || c.IsSet("http-proxy") {
			return errors.New("--tls and --http-proxy go with --encap rfc9329: fake-TCP's segments carry no stream")
		}
		if mode == fallback.ModeUDP {
			return errors.New("--encap fake-tcp carries the TCP transport; --transport udp never uses it")
		}
		stack, stop, err := startFakeTCP(c, log, fakenet.Client, 0)
		if err != nil {
			return err
		}
		defer stop()
		cfg.Dialer = &fakelink.Dialer{Stack: stack}
	default:
		return fmt.Errorf("--encap %q: want rfc9329 or fake-tcp", c.String("encap"))
	}
	peers := c.StringSlice("peer")
	if c.Bool("tun") {
		return runTransparentClient(c, log, cfg, peers)
	}
	if len(peers) != 1 {
		return fmt.Errorf("--peer: explicit mode takes one iketcp server (host:port), got %d", len(peers))
	}
	cfg.Peer = peers[0]
	if _, _, err := net.SplitHostPort(cfg.Peer); err != nil {
		return fmt.Errorf("--peer %q: %w (want the iketcp server's host:port, e.g. 203.0.113.2:4500; or use --tun)", cfg.Peer, err)
	}
	cl, err := client.New(cfg)
	if err != nil {
		return err
	}
	pc, err := client.ListenUDP(c.String("listen"))
	if err != nil {
		return err
	}
	var needs []capNeed
	if c.String("encap") == encapFakeTCP {
		needs = append(needs, needNetAdmin("fake-TCP's device, nftables table and forwarding are removed at exit"))
	}
	return serve(c.Context, log, c.String("control"), needs, func() any { return cl.Status() },
		func(ctx context.Context) error { return cl.Serve(ctx, pc) })
}

// runTransparentClient intercepts the daemon's traffic to peers through a
// TUN device and relays it; the device, rules and routes are removed on
// the way out, whatever ends the run.
func runTransparentClient(c *cli.Context, log *slog.Logger, cfg client.Config, peerArgs []string) error {
	if c.IsSet("listen") {
		return errors.New("--listen is for explicit mode; with --tun the daemon keeps its own ports")
	}
	port := c.Uint("tcp-port")
	if port == 0 || port > 65535 {
		return fmt.Errorf("--tcp-port %d: want 1 to 65535", port)
	}
	if c.Uint("tun-mark") == 0 || c.Uint("tun-mark") > 0xffffffff {
		return fmt.Errorf("--tun-mark %#x: want a non-zero 32-bit mark", c.Uint("tun-mark"))
	}
	peers, err := resolvePeers(peerArgs)
	if err != nil {
		return err
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
		return err
	}
	defer func() {
		if err := tun.Close(); err != nil {
			log.Error("removing the TUN device, rules and routes", "err", err)
		} else {
			log.Info("interception removed", "device", tun.Name())
		}
	}()
	log.Info("intercepting", "device", tun.Name(), "peers", fmt.Sprint(peers), "table", icfg.Table, "mark", fmt.Sprintf("%#x", tun.Mark()))
	cfg.Peers = peers
	cfg.TCPPort = uint16(port)
	cfg.Control = intercept.SetMark(tun.Mark()) // iketcp's own sockets bypass the TUN
	if d, ok := cfg.Dialer.(*streamlink.Dialer); ok {
		d.Control = cfg.Control
		if d.Dial != nil { // through the proxy: its connection bypasses the TUN too
			u, _ := dial.ParseProxyURL(c.String("http-proxy"))
			d.Dial = dial.ViaHTTPProxy(u, dial.Direct(cfg.Control))
		}
	}
	cl, err := client.New(cfg)
	if err != nil {
		return err
	}
	needs := []capNeed{needNetAdmin("--tun marks each new connection's socket to bypass the interception, and removes the device, rules and routes at exit")}
	return serve(c.Context, log, c.String("control"), needs, func() any { return cl.Status() },
		func(ctx context.Context) error { return cl.ServeTUN(ctx, tun, tun.Name()) })
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
	if !c.Bool("tls") {
		for _, f := range []string{"tls-server-name", "tls-ca", "tls-pin", "tls-insecure", "tls-client-cert", "tls-client-key"} {
			if c.IsSet(f) {
				return nil, fmt.Errorf("--%s goes with --tls", f)
			}
		}
	} else {
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
