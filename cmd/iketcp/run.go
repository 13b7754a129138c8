package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/nat/fakenet"
	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/nat/intercept"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/control"
	"github.com/iketcp/iketcp/relay/fakelink"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// Flags shared by server and client.
func commonFlags(role string) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "encap", Value: "rfc9329", Usage: "rfc9329 (standard TCP encapsulation) or fake-tcp (each datagram in a TCP-shaped segment that no kernel TCP stream owns; both ends must be iketcp; needs CAP_NET_ADMIN)", EnvVars: envVar("encap")},
		&cli.StringFlag{Name: "fake-tcp-seq", Value: "live", Usage: "fake-tcp: live (sequence numbers advance, acks track the peer) or frozen (FortiOS's constant sequence number: strict anti-replay middleboxes drop it; for interoperability tests and demonstrations only)", EnvVars: envVar("fake-tcp-seq")},
		&cli.StringFlag{Name: "fake-tcp-net", Usage: "fake-tcp: the /30 of the TUN device that connects the userspace TCP endpoint to the network, unused by anything else on the host (default 100.127.255.252/30)", EnvVars: envVar("fake-tcp-net")},
		&cli.StringFlag{Name: "fake-tcp-name", Value: fakenet.DefaultName, Usage: "fake-tcp: the TUN device's name", EnvVars: envVar("fake-tcp-name")},
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: envVar("log-level")},
		&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json", EnvVars: envVar("log-format")},
		&cli.StringFlag{Name: "control", Value: control.DefaultPath(role), Usage: "unix socket that `iketcp status` reads", EnvVars: envVar("control")},
		&cli.IntFlag{Name: "max-datagram", Value: relay.DefaultMaxDatagram, Usage: "largest datagram relayed either way, bytes (up to 65533)", EnvVars: envVar("max-datagram")},
		&cli.IntFlag{Name: "conn-buffer", Value: relay.DefaultConnBuffer, Usage: "read buffer of each TCP connection, bytes, taken from a pool while data is in flight", EnvVars: envVar("conn-buffer")},
		&cli.DurationFlag{Name: "write-timeout", Value: relay.DefaultWriteTimeout, Usage: "close a TCP connection that takes no data for this long", EnvVars: envVar("write-timeout")},
	}
}

func serverCommand() *cli.Command {
	return &cli.Command{
		Name:  "server",
		Usage: "accept RFC 9329 TCP and relay it to the gateway's IKE daemon over UDP",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Value: ":4500", Usage: "TCP address to accept clients on", EnvVars: envVar("listen")},
			&cli.StringFlag{Name: "backend", Value: "127.0.0.1:4500", Usage: "the IKE daemon's UDP NAT-T address", EnvVars: envVar("backend")},
			&cli.DurationFlag{Name: "prefix-timeout", Value: streamlink.DefaultPrefixTimeout, Usage: "close connections that do not send IKETCP within this time", EnvVars: envVar("prefix-timeout")},
			&cli.DurationFlag{Name: "session-idle", Value: server.DefaultSessionIdle, Usage: "how long a session waits for its client to reconnect", EnvVars: envVar("session-idle")},
			&cli.IntFlag{Name: "max-conns", Value: server.DefaultMaxConns, Usage: "most connections at once; when full, the oldest connection without a confirmed session makes room", EnvVars: envVar("max-conns")},
			&cli.IntFlag{Name: "max-unconfirmed-per-source", Value: server.DefaultMaxUnconfirmedPerSource, Usage: "most connections without a confirmed session from one source (IPv4 address, IPv6 /64)", EnvVars: envVar("max-unconfirmed-per-source")},
			&cli.DurationFlag{Name: "confirm-timeout", Value: server.DefaultConfirmTimeout, Usage: "close a connection that has carried no confirmed session for this long", EnvVars: envVar("confirm-timeout")},
			&cli.IntFlag{Name: "max-sessions", Value: server.DefaultMaxSessions, Usage: "most sessions (IKE SAs) at once", EnvVars: envVar("max-sessions")},
			&cli.IntFlag{Name: "max-sessions-per-source", Value: server.DefaultMaxSessionsPerSource, Usage: "most sessions from one source (carrier-grade NAT puts many clients behind one)", EnvVars: envVar("max-sessions-per-source")},
			&cli.IntFlag{Name: "max-half-open", Value: server.DefaultMaxHalfOpen, Usage: "most sessions whose IKE_SA_INIT the backend has not answered yet", EnvVars: envVar("max-half-open")},
			&cli.IntFlag{Name: "max-half-open-per-source", Value: server.DefaultMaxHalfOpenPerSource, Usage: "most half-open sessions from one source", EnvVars: envVar("max-half-open-per-source")},
			&cli.DurationFlag{Name: "half-open-timeout", Value: server.DefaultHalfOpenTimeout, Usage: "drop a session whose IKE_SA_INIT the backend has not answered in this long", EnvVars: envVar("half-open-timeout")},
		}, commonFlags("server")...),
		Action: runServer,
	}
}

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
			&cli.BoolFlag{Name: "tun", Usage: "transparent mode: intercept the unchanged daemon's UDP 500/4500 and ESP to the peers through a TUN device (needs CAP_NET_ADMIN)", EnvVars: envVar("tun")},
			&cli.UintFlag{Name: "tcp-port", Value: 4500, Usage: "--tun: the iketcp server's TCP port on each peer", EnvVars: envVar("tcp-port")},
			&cli.StringFlag{Name: "tun-name", Value: "iketcp0", Usage: "--tun: the TUN device's name", EnvVars: envVar("tun-name")},
			&cli.IntFlag{Name: "tun-table", Value: 4500, Usage: "--tun: routing table for intercepted traffic (iketcp owns it: stale routes there are removed)", EnvVars: envVar("tun-table")},
			&cli.UintFlag{Name: "tun-mark", Value: 0x4500, Usage: "--tun: fwmark on iketcp's own sockets, which bypass interception", EnvVars: envVar("tun-mark")},
			&cli.IntFlag{Name: "tun-priority", Value: 100, Usage: "--tun: priority of iketcp's policy rules (bypass rule; interception rules at +1); must come before other rules that route the peers", EnvVars: envVar("tun-priority")},
			&cli.IntFlag{Name: "max-flows", Value: client.DefaultMaxFlows, Usage: "most local daemon addresses served at once", EnvVars: envVar("max-flows")},
			&cli.DurationFlag{Name: "flow-idle", Value: client.DefaultFlowIdle, Usage: "close a flow whose daemon has sent nothing for this long", EnvVars: envVar("flow-idle")},
			&cli.IntFlag{Name: "queue-len", Value: client.DefaultQueueLen, Usage: "datagrams held per flow while its connection is down or busy", EnvVars: envVar("queue-len")},
			&cli.DurationFlag{Name: "dial-timeout", Value: client.DefaultDialTimeout, Usage: "give up a connection attempt after this long", EnvVars: envVar("dial-timeout")},
			&cli.DurationFlag{Name: "reconnect-max", Value: client.DefaultReconnectMax, Usage: "longest wait between reconnection attempts", EnvVars: envVar("reconnect-max")},
		}, commonFlags("client")...),
		Action: runClient,
	}
}

func newLogger(c *cli.Context, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.String("log-level"))
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", c.String("log-format"))
}

// checkSizes validates the size flags both roles share.
func checkSizes(c *cli.Context) error {
	if v := c.Int("max-datagram"); v < 576 || v > 65533 {
		return fmt.Errorf("--max-datagram %d: want 576 to 65533 bytes", v)
	}
	if v := c.Int("conn-buffer"); v < 2048 || v > 16<<20 {
		return fmt.Errorf("--conn-buffer %d: want 2048 bytes to 16 MiB", v)
	}
	return nil
}

func positive(c *cli.Context, names ...string) error {
	for _, n := range names {
		switch v := c.Value(n).(type) {
		case int:
			if v <= 0 {
				return fmt.Errorf("--%s %d: must be positive", n, v)
			}
		case time.Duration:
			if v <= 0 {
				return fmt.Errorf("--%s %v: must be positive", n, v)
			}
		}
	}
	return nil
}

// serve runs one relay role with its control socket until ctx ends.
func serve(ctx context.Context, log *slog.Logger, controlPath string, status func() any, run func(context.Context) error) error {
	ctl, err := control.Listen(controlPath, status, log)
	if err != nil {
		return err
	}
	defer ctl.Close()
	log.Info("control socket ready", "path", ctl.Path())
	err = run(ctx)
	log.Info("stopped")
	return err
}

// prepare checks the flags both roles share, and the named ones that must
// be positive, and returns the logger they ask for.
func prepare(c *cli.Context, mustBePositive ...string) (*slog.Logger, error) {
	log, err := newLogger(c, os.Stderr)
	if err != nil {
		return nil, err
	}
	if err := checkSizes(c); err != nil {
		return nil, err
	}
	return log, positive(c, append(mustBePositive, "write-timeout")...)
}

func runServer(c *cli.Context) error {
	log, err := prepare(c, "prefix-timeout", "session-idle", "max-conns", "max-unconfirmed-per-source", "confirm-timeout",
		"max-sessions", "max-sessions-per-source", "max-half-open", "max-half-open-per-source", "half-open-timeout")
	if err != nil {
		return err
	}
	if e := c.String("encap"); e != "rfc9329" && e != "fake-tcp" {
		return fmt.Errorf("--encap %q: want rfc9329 or fake-tcp", e)
	}
	backend, err := resolveUDP(c.String("backend"))
	if err != nil {
		return fmt.Errorf("--backend: %w", err)
	}
	counters := new(relay.Counters)
	srv, err := server.New(server.Config{
		Backend:                 backend,
		Counters:                counters,
		Logger:                  log,
		SessionIdle:             c.Duration("session-idle"),
		MaxConns:                c.Int("max-conns"),
		MaxUnconfirmedPerSource: c.Int("max-unconfirmed-per-source"),
		ConfirmTimeout:          c.Duration("confirm-timeout"),
		MaxSessions:             c.Int("max-sessions"),
		MaxSessionsPerSource:    c.Int("max-sessions-per-source"),
		MaxHalfOpen:             c.Int("max-half-open"),
		MaxHalfOpenPerSource:    c.Int("max-half-open-per-source"),
		HalfOpenTimeout:         c.Duration("half-open-timeout"),
		MaxDatagram:             c.Int("max-datagram"),
		Version:                 versionString(),
	})
	if err != nil {
		return err
	}
	if c.String("encap") == "fake-tcp" {
		_, port, err := net.SplitHostPort(c.String("listen"))
		p, perr := strconv.ParseUint(port, 10, 16)
		if err != nil || perr != nil || p == 0 {
			return fmt.Errorf("--listen %q: fake-tcp needs a port (e.g. :4500)", c.String("listen"))
		}
		stack, stop, err := startFakeTCP(c, log, fakenet.Server, uint16(p))
		if err != nil {
			return err
		}
		defer stop()
		ln, err := stack.Listen(uint16(p))
		if err != nil {
			return err
		}
		links := fakelink.NewListener(ln, c.String("listen"))
		return serve(c.Context, log, c.String("control"), func() any { return srv.Status() },
			func(ctx context.Context) error { return srv.Serve(ctx, links) })
	}
	links, err := streamlink.Listen(c.Context, c.String("listen"), linkConfig(c, counters, log))
	if err != nil {
		return err
	}
	return serve(c.Context, log, c.String("control"), func() any { return srv.Status() },
		func(ctx context.Context) error { return srv.Serve(ctx, links) })
}

// linkConfig is the configuration of RFC 9329 links from the flags both
// roles share.
func linkConfig(c *cli.Context, counters *relay.Counters, log *slog.Logger) streamlink.Config {
	return streamlink.Config{
		MaxDatagram:   c.Int("max-datagram"),
		BufferSize:    c.Int("conn-buffer"),
		WriteTimeout:  c.Duration("write-timeout"),
		PrefixTimeout: c.Duration("prefix-timeout"), // the server's; zero on a client
		Counters:      counters,
		Logger:        log,
	}
}

// startFakeTCP sets up fake-TCP mode's device and NAT rules and a TCP
// stack on them. stop closes the stack (its conns send FIN), then the
// device, rules and routes, and waits for the stack's reader.
func startFakeTCP(c *cli.Context, log *slog.Logger, role fakenet.Role, port uint16) (*faketcp.Stack, func(), error) {
	seq, err := parseSeqMode(c.String("fake-tcp-seq"))
	if err != nil {
		return nil, nil, err
	}
	var net4 netip.Prefix // zero: nat's default
	if v := c.String("fake-tcp-net"); v != "" {
		if net4, err = netip.ParsePrefix(v); err != nil {
			return nil, nil, fmt.Errorf("--fake-tcp-net %q: %w (want a /30, e.g. 100.127.255.252/30)", v, err)
		}
	}
	fnet, err := fakenet.Setup(fakenet.Config{Role: role, Name: c.String("fake-tcp-name"), Net4: net4, Port: port, Logger: log})
	if err != nil {
		return nil, nil, err
	}
	stack, err := faketcp.NewStack(fnet, faketcp.Config{Local: fnet.Endpoint4(), Seq: seq, Logger: log})
	if err != nil {
		fnet.Close()
		return nil, nil, err
	}
	log.Info("fake-TCP ready", "device", fnet.Name(), "endpoint", fnet.Endpoint4().String(), "seq", seq.String())
	if seq == faketcp.SeqFrozen {
		log.Warn("fake-TCP sequence numbers are frozen (FortiOS's behaviour): strict anti-replay middleboxes drop such segments; use this for interoperability tests and demonstrations only")
	}
	stop := func() {
		stack.Close()
		if err := fnet.Close(); err != nil {
			log.Error("removing fake-TCP's device and rules", "err", err)
		}
		<-stack.Done()
	}
	return stack, stop, nil
}

func parseSeqMode(s string) (faketcp.SeqMode, error) {
	switch s {
	case "live":
		return faketcp.SeqLive, nil
	case "frozen":
		return faketcp.SeqFrozen, nil
	}
	return 0, fmt.Errorf("--fake-tcp-seq %q: want live or frozen", s)
}

func runClient(c *cli.Context) error {
	log, err := prepare(c, "max-flows", "flow-idle", "queue-len", "dial-timeout", "reconnect-max")
	if err != nil {
		return err
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
		QueueLen:          c.Int("queue-len"),
		MaxDatagram:       c.Int("max-datagram"),
		DialTimeout:       c.Duration("dial-timeout"),
		ReconnectMax:      c.Duration("reconnect-max"),
		Version:           versionString(),
	}
	switch c.String("encap") {
	case "rfc9329":
		cfg.Dialer = streamlink.NewDialer(linkConfig(c, counters, log))
	case "fake-tcp":
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
	return serve(c.Context, log, c.String("control"), func() any { return cl.Status() },
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
	}
	cl, err := client.New(cfg)
	if err != nil {
		return err
	}
	return serve(c.Context, log, c.String("control"), func() any { return cl.Status() },
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

// resolveUDP turns host:port into an address, resolving a host name once.
func resolveUDP(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	ua, err := net.ResolveUDPAddr("udp", s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q: %w (want host:port, e.g. 127.0.0.1:4500 or [::1]:4500)", s, err)
	}
	ap := ua.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show a running iketcp's sessions, like diagnose vpn ike gateway list",
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
