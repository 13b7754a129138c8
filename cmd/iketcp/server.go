package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/nat/realaddr"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/control"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

func serverCommand() *cli.Command {
	return &cli.Command{
		Name:  "server",
		Usage: "accept RFC 9329 TCP and relay it to the gateway's IKE daemon over UDP",
		UsageText: "iketcp server [--listen [rfc9329://|fake-tcp://]HOST:PORT ...] [--backend HOST:PORT] [options]\n\n" +
			"Examples:\n\n" +
			"   # beside a gateway whose IKE daemon has UDP 4500: clients on TCP 4500\n" +
			"   iketcp server --listen :4500 --backend 127.0.0.1:4500\n\n" +
			"   # FortiOS's ike-tcp-port 443 with TLS 1.3, the HTTPS site sharing the port\n" +
			"   iketcp server --ike-tcp-port 443 --tls-cert hub.pem --tls-key hub.key --share-backend 127.0.0.1:8443\n\n" +
			"   # RFC 9329 and fake-TCP at once\n" +
			"   iketcp server --listen :4500 --listen fake-tcp://:4501",
		Description: "The server takes each client's TCP connection, finds the IKE SA of every frame, and hands the\n" +
			"datagrams to the gateway's IKE daemon from a UDP socket of the session's own, whose port never\n" +
			"changes across reconnects. It treats every connection as a stranger's until the daemon vouches\n" +
			"for it. SIGHUP reloads --tls-cert and --tls-key. Every flag is also an IKETCP_* variable.",
		Flags: append([]cli.Flag{
			&cli.StringSliceFlag{Name: "listen", Usage: "address to accept clients on, [rfc9329://|fake-tcp://]host:port, the scheme defaulting to --encap (repeat for several; default :4500)", EnvVars: envVar("listen")},
			&cli.UintFlag{Name: "ike-tcp-port", Usage: "FortiOS's ike-tcp-port: 4500 listens on TCP 4500; any other port P listens on 4500 and 11443 and redirects P to 11443 (see --redirect)", EnvVars: envVar("ike-tcp-port")},
			&cli.StringFlag{Name: "tls-cert", Usage: "the server's TLS certificate (PEM, with its chain): TLS 1.3 clients are served on every rfc9329 port, beside clients in clear; reloaded on SIGHUP", EnvVars: envVar("tls-cert")},
			&cli.StringFlag{Name: "tls-key", Usage: "the key of --tls-cert", EnvVars: envVar("tls-key")},
			&cli.StringFlag{Name: "tls-client-ca", Usage: "a PEM file of the CAs whose client certificates are accepted: TLS clients must prove one, clients in clear are refused, and a session belongs to the identity that opened it", EnvVars: envVar("tls-client-ca")},
			&cli.BoolFlag{Name: "tls-required", Usage: "refuse RFC 9329 clients in clear", EnvVars: envVar("tls-required")},
			&cli.StringSliceFlag{Name: "tls-server-name", Usage: "TLS server names (SNI) that are iketcp's when a port is shared with --share-backend (*.example.com matches one label); iketcp clients also say so with ALPN", EnvVars: envVar("tls-server-name")},
			&cli.StringFlag{Name: "share-backend", Usage: "host:port of the HTTPS or HTTP site that shares the port: TLS for other names, and HTTP, go there untouched", EnvVars: envVar("share-backend")},
			&cli.StringSliceFlag{Name: "proxy-protocol-from", Usage: "CIDRs of load balancers whose connections begin with a PROXY protocol header (v1 or v2): required from them, refused from anyone else; the client's real address is what limits, logs and status see", EnvVars: envVar("proxy-protocol-from")},
			&cli.BoolFlag{Name: "real-address", Usage: "each session's socket toward the backend carries the client's own address (and a port of its own), so the IKE daemon sees and limits its real peers; needs CAP_NET_ADMIN, and --backend on one of this host's own, non-loopback addresses", EnvVars: envVar("real-address")},
			&cli.StringFlag{Name: "redirect", Value: "nftables", Usage: "how --ike-tcp-port reaches 11443: nftables (a table iketcp owns; needs CAP_NET_ADMIN) or none (a container's or load balancer's port mapping does it)", EnvVars: envVar("redirect")},
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
			reorderFlag(),
			&cli.StringFlag{Name: "state", Usage: "file that keeps the session table (it holds secrets: mode 0600), so that a restarted server takes its clients back on the same IKE SAs; unusable files are reported and ignored", EnvVars: envVar("state")},
			&cli.DurationFlag{Name: "upgrade-tls-keep", Value: time.Hour, Usage: "after an upgrade, the old process keeps each TLS client's connection (whose TLS state cannot move to the new one) and relays it to the new server, until the client or the new server closes it, or for at most this long; then those left close and their clients reconnect (0: at once)", EnvVars: envVar("upgrade-tls-keep")},
			&cli.StringFlag{Name: "upgrade-binary", Usage: "the binary an upgrade (SIGUSR2, iketcp upgrade) starts; default: this one's path as it was at start, so a new binary installed there is the one started", EnvVars: envVar("upgrade-binary")},
			&cli.DurationFlag{Name: "half-open-timeout", Value: server.DefaultHalfOpenTimeout, Usage: "drop a session whose IKE_SA_INIT the backend has not answered in this long", EnvVars: envVar("half-open-timeout")},
		}, commonFlags("server")...),
		Action: runServer,
	}
}

// serverLimits are the server's flags that SIGHUP applies to a running
// server: they bound what is admitted next, and never close what runs.
var serverLimits = []string{"max-conns", "max-unconfirmed-per-source", "max-sessions", "max-sessions-per-source",
	"max-half-open", "max-half-open-per-source"}

func limitsOf(c *cli.Context) server.Limits {
	return server.Limits{
		MaxConns:                c.Int("max-conns"),
		MaxUnconfirmedPerSource: c.Int("max-unconfirmed-per-source"),
		MaxSessions:             c.Int("max-sessions"),
		MaxSessionsPerSource:    c.Int("max-sessions-per-source"),
		MaxHalfOpen:             c.Int("max-half-open"),
		MaxHalfOpenPerSource:    c.Int("max-half-open-per-source"),
	}
}

// checkServer checks the server's flags without starting anything.
func checkServer(c *cli.Context) error {
	if err := checkCommon(c, "prefix-timeout", "session-idle", "max-conns", "max-unconfirmed-per-source", "confirm-timeout",
		"max-sessions", "max-sessions-per-source", "max-half-open", "max-half-open-per-source", "half-open-timeout"); err != nil {
		return err
	}
	if _, err := resolveUDP(c.String("backend")); err != nil {
		return fmt.Errorf("--backend: %w", err)
	}
	if _, _, err := listenSpecs(c); err != nil {
		return err
	}
	if c.Duration("upgrade-tls-keep") < 0 {
		return errors.New("--upgrade-tls-keep must not be negative")
	}
	if r := c.String("redirect"); r != "nftables" && r != "none" {
		return fmt.Errorf("--redirect %q: want nftables or none", r)
	}
	if (c.String("tls-cert") != "") != (c.String("tls-key") != "") {
		return errors.New("--tls-cert and --tls-key go together: give both")
	}
	_, err := proxyFrom(c)
	return err
}

func runServer(c *cli.Context) error {
	ins, err := instances(c)
	if err != nil {
		return err
	}
	in := ins[0]
	if err := checkServer(in.ctx); err != nil {
		return &configError{in.located(err)}
	}
	p, err := newProc(c, ins)
	if err != nil {
		return err
	}
	defer p.close()
	return runServerInstance(p, in.ctx)
}

func runServerInstance(p *proc, c *cli.Context) error {
	log := p.log
	backend, err := resolveUDP(c.String("backend"))
	if err != nil {
		return fmt.Errorf("--backend: %w", err)
	}
	counters := new(relay.Counters)
	specs, redirectFrom, err := listenSpecs(c)
	if err != nil {
		return err
	}
	door, err := frontDoor(c, log, counters)
	if err != nil {
		return err
	}
	in, err := inherit(log)
	if err != nil {
		return err
	}
	// tookOver: this process runs on its own, its predecessor told, or
	// it had none. Until then, a failure leaves the host state it adopted
	// to the predecessor, which runs again.
	tookOver := in == nil
	failed := func(err error) error {
		if in != nil {
			in.closeHost()
			in.pred.Failed(err)
		}
		return err
	}
	if p.metrics != nil {
		var ln net.Listener
		if in != nil {
			ln = in.lns[metricsSpec]
			delete(in.lns, metricsSpec)
		}
		if err := p.metrics.serveInherited(ln); err != nil {
			return failed(err)
		}
	}
	host := &hostState{}
	var dialBackend func(netip.Addr, netip.AddrPort) (*net.UDPConn, func() error, error)
	var adoptBackend func(*net.UDPConn) (func() error, error)
	if c.Bool("real-address") {
		var ra *realaddr.Net
		if in != nil && in.realAd {
			ra, err = realaddr.Adopt(realaddr.Config{Logger: log})
		} else {
			ra, err = realaddr.Setup(realaddr.Config{Logger: log})
		}
		if err != nil {
			return failed(err)
		}
		defer func() {
			if tookOver {
				ra.Close()
			} else {
				ra.Release()
			}
		}()
		host.realaddr = ra
		dialBackend, adoptBackend = ra.Dial, ra.AdoptSocket
		log.Info("real-address mode: the backend sees each client's own address", "backend", backend.String())
	}
	lim := limitsOf(c)
	srv, err := server.New(server.Config{
		DialBackend:             dialBackend,
		AdoptBackend:            adoptBackend,
		Backend:                 backend,
		Counters:                counters,
		Logger:                  log,
		SessionIdle:             c.Duration("session-idle"),
		MaxConns:                lim.MaxConns,
		MaxUnconfirmedPerSource: lim.MaxUnconfirmedPerSource,
		ConfirmTimeout:          c.Duration("confirm-timeout"),
		MaxSessions:             lim.MaxSessions,
		MaxSessionsPerSource:    lim.MaxSessionsPerSource,
		MaxHalfOpen:             lim.MaxHalfOpen,
		MaxHalfOpenPerSource:    lim.MaxHalfOpenPerSource,
		HalfOpenTimeout:         c.Duration("half-open-timeout"),
		ReorderMax:              reorderMax(c),
		StatePath:               c.String("state"),
		MaxDatagram:             c.Int("max-datagram"),
		Version:                 versionString(),
	})
	if err != nil {
		return failed(err)
	}
	lns, raw, fake, closeListeners, err := listeners(c, log, counters, specs, door, in)
	if err != nil {
		return failed(err)
	}
	defer closeListeners()
	host.fake = fake
	if in != nil {
		if err := adopt(log, srv, lns, in.server, in.files, in.fakeConns, c.Bool("tls-required") || c.IsSet("tls-client-ca")); err != nil {
			for _, ln := range lns {
				ln.Close()
			}
			return failed(err)
		}
	}
	var owner *os.File
	if in != nil {
		owner = in.host[hostRedirectOwner]
	}
	rd, err := startRedirect(c, log, redirectFrom, owner)
	if err != nil {
		for _, ln := range lns {
			ln.Close()
		}
		return failed(err)
	}
	if rd != nil {
		host.redirect = rd
		defer func() {
			if !tookOver {
				rd.Release()
			} else if err := rd.Close(); err != nil {
				log.Error("removing the port redirect", "table", rd.Table(), "err", err)
			}
		}()
	}
	if in != nil {
		in.closeHost() // what was adopted holds its own duplicates
	}
	switch {
	case c.Bool("real-address"):
		p.need(needNetAdmin("--real-address opens a transparent socket for each new session, and removes its rule, route and table at exit"))
	case redirectFrom != 0 && c.String("redirect") == "nftables":
		p.need(needNetAdmin("the --ike-tcp-port redirect's nftables table is removed at exit"))
	case hasFakeTCP(specs):
		p.need(needNetAdmin("fake-TCP's device, nftables table and forwarding are removed at exit"))
	}
	binary := c.String("upgrade-binary")
	if binary == "" {
		if binary, err = os.Executable(); err != nil {
			binary = "/proc/self/exe"
		}
	}
	p.onReload(func(old, nw *instance) {
		if l := limitsOf(nw.ctx); l != limitsOf(old.ctx) {
			srv.SetLimits(l)
			log.Info("SIGHUP: limits changed; they bound what is admitted next, nothing running is closed",
				"max_conns", l.MaxConns, "max_unconfirmed_per_source", l.MaxUnconfirmedPerSource,
				"max_sessions", l.MaxSessions, "max_sessions_per_source", l.MaxSessionsPerSource,
				"max_half_open", l.MaxHalfOpen, "max_half_open_per_source", l.MaxHalfOpenPerSource)
		}
	})
	p.onDrain(srv.Drain)
	if p.metrics != nil {
		p.metrics.add(relay.RoleServer, "", counters, func() *relay.Status { return srv.Status() })
	}
	return p.run(c, []func(context.Context) error{func(parent context.Context) error {
		// parent ends when the server is told to stop; ctx also when an
		// upgrade has handed everything over.
		ctx, cancel := context.WithCancel(parent)
		defer cancel()
		handed := maps.Clone(raw)
		if p.metrics != nil && p.metrics.listener() != nil {
			handed[metricsSpec] = p.metrics.listener() // the new process serves the port from the start
		}
		u := &upgrader{log: log, binary: binary, srv: srv, raw: handed, host: host, refuse: upgradeRefusal(specs),
			stop: cancel, parent: parent, asked: make(chan struct{}, 1)}
		ctl, err := control.Listen(c.String("control"), func() any { return srv.Status() }, log,
			control.Request{Name: "upgrade", Answer: u.request})
		if err != nil {
			return failed(err)
		}
		defer ctl.Close()
		u.ctl = ctl
		log.Info("control socket ready", "path", ctl.Path())
		var wg sync.WaitGroup
		wg.Add(1)
		go u.watch(ctx, &wg)
		defer wg.Wait()
		defer cancel()
		if in != nil {
			if err := in.pred.TakenOver(); err != nil {
				return fmt.Errorf("telling the old server: %w", err)
			}
		}
		tookOver = true
		if fake != nil {
			fake.kept.Store(false) // this process's now: its exit removes it
		}
		err = srv.Serve(ctx, lns...)
		if srv.Relaying() > 0 {
			// The new server serves the metrics port from here on.
			if p.metrics != nil {
				p.metrics.close()
			}
			// After an upgrade, the TLS connections kept here relay to the
			// new server until they end, at most --upgrade-tls-keep, or
			// SIGTERM. A SIGUSR2 meant for the new server does not end
			// them meanwhile.
			cancel()
			wg.Wait()
			signal.Ignore(syscall.SIGUSR2)
			srv.KeptTLS(parent, c.Duration("upgrade-tls-keep"))
		}
		log.Info("stopped")
		return err
	}})
}
