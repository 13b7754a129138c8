package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/nat/realaddr"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

func serverCommand() *cli.Command {
	return &cli.Command{
		Name:  "server",
		Usage: "accept RFC 9329 TCP and relay it to the gateway's IKE daemon over UDP",
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
			&cli.DurationFlag{Name: "half-open-timeout", Value: server.DefaultHalfOpenTimeout, Usage: "drop a session whose IKE_SA_INIT the backend has not answered in this long", EnvVars: envVar("half-open-timeout")},
		}, commonFlags("server")...),
		Action: runServer,
	}
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
	var dialBackend func(netip.Addr, netip.AddrPort) (*net.UDPConn, func() error, error)
	if c.Bool("real-address") {
		ra, err := realaddr.Setup(realaddr.Config{Logger: log})
		if err != nil {
			return err
		}
		defer ra.Close()
		dialBackend = ra.Dial
		log.Info("real-address mode: the backend sees each client's own address", "backend", backend.String())
	}
	srv, err := server.New(server.Config{
		DialBackend:             dialBackend,
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
	specs, redirectFrom, err := listenSpecs(c)
	if err != nil {
		return err
	}
	door, err := frontDoor(c, log, counters)
	if err != nil {
		return err
	}
	lns, closeListeners, err := listeners(c, log, counters, specs, door)
	if err != nil {
		return err
	}
	defer closeListeners()
	stopRedirect, err := startRedirect(c, log, redirectFrom)
	if err != nil {
		for _, ln := range lns {
			ln.Close()
		}
		return err
	}
	defer stopRedirect()
	var needs []capNeed
	switch {
	case c.Bool("real-address"):
		needs = append(needs, needNetAdmin("--real-address opens a transparent socket for each new session, and removes its rule, route and table at exit"))
	case redirectFrom != 0 && c.String("redirect") == "nftables":
		needs = append(needs, needNetAdmin("the --ike-tcp-port redirect's nftables table is removed at exit"))
	case hasFakeTCP(specs):
		needs = append(needs, needNetAdmin("fake-TCP's device, nftables table and forwarding are removed at exit"))
	}
	return serve(c.Context, log, c.String("control"), needs, func() any { return srv.Status() },
		func(ctx context.Context) error { return srv.Serve(ctx, lns...) })
}
