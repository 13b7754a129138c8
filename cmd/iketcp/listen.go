package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/nat/fakenet"
	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/nat/redirect"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/fakelink"
	"github.com/iketcp/iketcp/relay/frontdoor"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// FortiOS's ports: with ike-tcp-port 4500 the daemon takes TCP 4500; with
// any other port it takes 4500 and 11443, and the chosen port is
// redirected to 11443.
const (
	natTPort      = 4500
	redirectPort  = 11443
	encapRFC9329  = "rfc9329"
	encapFakeTCP  = "fake-tcp"
	schemeDivider = "://"
)

// listenSpec is one address the server listens on, and the links it
// carries there.
type listenSpec struct {
	encap string // encapRFC9329 or encapFakeTCP
	addr  string // host:port
}

func (l listenSpec) String() string { return l.encap + schemeDivider + l.addr }

// hasFakeTCP reports whether one of specs is a fake-TCP port.
func hasFakeTCP(specs []listenSpec) bool {
	for _, s := range specs {
		if s.encap == encapFakeTCP {
			return true
		}
	}
	return false
}

// parseListen reads one --listen value: [rfc9329://|fake-tcp://]host:port,
// the scheme defaulting to encap.
func parseListen(v, encap string) (listenSpec, error) {
	if i := strings.Index(v, schemeDivider); i >= 0 {
		encap, v = v[:i], v[i+len(schemeDivider):]
	}
	if encap != encapRFC9329 && encap != encapFakeTCP {
		return listenSpec{}, fmt.Errorf("--listen %q: the encapsulation is rfc9329:// or fake-tcp://, not %s://", v, encap)
	}
	_, port, err := net.SplitHostPort(v)
	if p, perr := strconv.ParseUint(port, 10, 16); err != nil || perr != nil || p == 0 {
		return listenSpec{}, fmt.Errorf("--listen %q: want [rfc9329://|fake-tcp://]host:port, e.g. :4500 or fake-tcp://:4501", v)
	}
	return listenSpec{encap: encap, addr: v}, nil
}

// listenSpecs returns what the server's flags ask it to listen on, and
// the port to redirect to 11443, or 0 (planListen).
func listenSpecs(c *cli.Context) ([]listenSpec, uint16, error) {
	return planListen(c.StringSlice("listen"), c.String("encap"), c.Uint("ike-tcp-port"), c.IsSet("ike-tcp-port"))
}

// planListen returns what the server listens on: every --listen, and for
// --ike-tcp-port P (when ikeSet) the ports FortiOS's daemon takes: 4500,
// and 11443 when P is not 4500. With neither, :4500 in encap. It also
// returns the port to redirect to 11443, or 0.
func planListen(listen []string, encap string, ikePort uint, ikeSet bool) (specs []listenSpec, redirectFrom uint16, err error) {
	for _, v := range listen {
		s, err := parseListen(v, encap)
		if err != nil {
			return nil, 0, err
		}
		specs = append(specs, s)
	}
	add := func(s listenSpec) {
		if !slices.Contains(specs, s) {
			specs = append(specs, s)
		}
	}
	if ikeSet {
		if ikePort == 0 || ikePort > 65535 {
			return nil, 0, fmt.Errorf("--ike-tcp-port %d: want 1 to 65535", ikePort)
		}
		add(listenSpec{encap: encapRFC9329, addr: ":" + strconv.Itoa(natTPort)})
		if ikePort != natTPort {
			add(listenSpec{encap: encapRFC9329, addr: ":" + strconv.Itoa(redirectPort)})
			if ikePort != redirectPort {
				redirectFrom = uint16(ikePort)
			}
		}
	}
	if len(specs) == 0 {
		specs = []listenSpec{{encap: encap, addr: ":" + strconv.Itoa(natTPort)}}
	}
	var fakePort string
	for _, s := range specs {
		if s.encap != encapFakeTCP {
			continue
		}
		_, port, _ := net.SplitHostPort(s.addr)
		if fakePort != "" && port != fakePort {
			return nil, 0, errors.New("--listen: one fake-tcp:// port per server (its TCP stack serves one port; several addresses may share it)")
		}
		fakePort = port
	}
	return specs, redirectFrom, nil
}

// listeners opens what specs ask for, taking the TCP listening sockets a
// predecessor handed over (inherited, by spec) instead of opening them.
// raw are the TCP listening sockets, by spec, for a successor. close
// releases everything they hold (fake-TCP's device and rules included)
// once the server is done.
func listeners(c *cli.Context, log *slog.Logger, counters *relay.Counters, specs []listenSpec, door *frontdoor.Config,
	in *inherited) (lns []relay.Listener, raw map[string]net.Listener, fake *fakeTCP, close func(), err error) {
	raw = make(map[string]net.Listener)
	var stops []func()
	close = func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}
	defer func() {
		if err != nil {
			for _, ln := range lns {
				ln.Close()
			}
			close()
		}
	}()
	fakeOpen := false
	for _, s := range specs {
		switch s.encap {
		case encapFakeTCP:
			// One stack and listener for every fake-tcp:// address (all
			// of one port, planListen): the kernel hands it the port's
			// connections to any of the host's addresses.
			if fakeOpen {
				continue
			}
			fakeOpen = true
			var addrs []string
			for _, f := range specs {
				if f.encap == encapFakeTCP {
					addrs = append(addrs, f.addr)
				}
			}
			_, port, _ := net.SplitHostPort(s.addr)
			p, _ := strconv.ParseUint(port, 10, 16)
			var ln *faketcp.Listener
			if fake, ln, err = fakeListener(c, log, uint16(p), in); err != nil {
				return lns, raw, fake, close, err
			}
			stops = append(stops, fake.stop)
			lns = append(lns, fakelink.NewListener(ln, strings.Join(addrs, ",")))
		default:
			var inner net.Listener
			ok := false
			if in != nil {
				inner, ok = in.lns[s.String()]
			}
			if ok {
				inner = keepAliveListener{inner}
			} else {
				lc := net.ListenConfig{KeepAliveConfig: relay.TCPKeepAlive}
				if inner, err = lc.Listen(c.Context, "tcp", s.addr); err != nil {
					return lns, raw, fake, close, fmt.Errorf("--listen %s: %w", s, relay.ListenHint(err,
						"another TCP service (an IKE daemon with TCP support, a web server?) holds the port: stop it, choose another port, or share it with --share-backend"))
				}
			}
			raw[s.String()] = inner
			if door != nil {
				inner = frontdoor.Listen(inner, *door)
			}
			lns = append(lns, streamlink.NewListener(inner, linkConfig(c, counters, log)))
		}
	}
	return lns, raw, fake, close, nil
}

// fakeListener starts fake-TCP mode for a server on port, or, when in
// has a predecessor's, takes it over (resumeFakeTCP), the conns it
// resumed noted in in for adopt; it returns the port's listener.
func fakeListener(c *cli.Context, log *slog.Logger, port uint16, in *inherited) (*fakeTCP, *faketcp.Listener, error) {
	if in == nil || in.fake == nil {
		ft, err := startFakeTCP(c, log, fakenet.Server, port, nil)
		if err != nil {
			return nil, nil, err
		}
		ln, err := ft.stack.Listen(port)
		if err != nil {
			ft.stop()
			return nil, nil, err
		}
		return ft, ln, nil
	}
	dev := in.host[hostFakeTCPDevice]
	if dev == nil {
		return nil, nil, errors.New("the hand-over has fake-TCP's state and not its device")
	}
	st, index, err := in.fakeState()
	if err != nil {
		return nil, nil, err
	}
	ft, lns, conns, err := resumeFakeTCP(c, log, port, dev, st)
	if err != nil {
		return nil, nil, err
	}
	var ln *faketcp.Listener
	for i, l := range lns {
		if st.Listeners[i] == port {
			ln = l
		} else {
			l.Close()
		}
	}
	if ln == nil {
		if ln, err = ft.stack.Listen(port); err != nil {
			ft.stop()
			return nil, nil, err
		}
	}
	in.fakeConns = make(map[int]*faketcp.Conn, len(conns))
	for i, conn := range conns {
		in.fakeConns[index[i]] = conn
	}
	return ft, ln, nil
}

// keepAliveListener gives the connections of a listening socket handed
// over by a predecessor the keepalive that listeners iketcp opens give
// them (net.ListenConfig's cannot be set on a socket from a file).
type keepAliveListener struct{ net.Listener }

func (l keepAliveListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetKeepAliveConfig(relay.TCPKeepAlive)
	}
	return c, err
}

// File is the listening socket's, for a successor.
func (l keepAliveListener) File() (*os.File, error) {
	fl, ok := l.Listener.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, errors.New("not a socket")
	}
	return fl.File()
}

// startRedirect installs the ike-tcp-port redirect, as --redirect says,
// or adopts the running one whose owner socket a predecessor handed over
// (owner, if not nil). It returns nil when there is no redirect to own.
func startRedirect(c *cli.Context, log *slog.Logger, from uint16, owner *os.File) (*redirect.Redirect, error) {
	switch mode := c.String("redirect"); {
	case from == 0:
		return nil, nil
	case mode == "none":
		log.Info("port redirect left to the platform (--redirect none): map the ike-tcp-port to iketcp's",
			"ike_tcp_port", from, "to", redirectPort)
		return nil, nil
	case mode != "nftables":
		return nil, fmt.Errorf("--redirect %q: want nftables or none", mode)
	}
	cfg := redirect.Config{From: from, To: redirectPort, Logger: log}
	var r *redirect.Redirect
	var err error
	if owner != nil {
		r, err = redirect.Adopt(cfg, owner)
	} else {
		r, err = redirect.Setup(cfg)
	}
	if err != nil {
		return nil, err
	}
	log.Info("ike-tcp-port redirected", "from", from, "to", redirectPort, "table", r.Table())
	return r, nil
}

// frontDoor is the front door the flags ask for in front of the rfc9329
// ports, or nil when they ask for none (then the ports take RFC 9329 in
// clear only). On SIGHUP it reloads --tls-cert and --tls-key, until the
// command's context ends; live connections keep their certificate.
func frontDoor(c *cli.Context, log *slog.Logger, counters *relay.Counters) (*frontdoor.Config, error) {
	cfg := &frontdoor.Config{
		ServerNames:  c.StringSlice("tls-server-name"),
		ShareBackend: c.String("share-backend"),
		RequireTLS:   c.Bool("tls-required"),
		Protocols:    []string{iketcpALPN},
		Counters:     counters,
		Logger:       log,
	}
	var err error
	if cfg.ProxyFrom, err = proxyFrom(c); err != nil {
		return nil, err
	}
	certSet, keySet := c.String("tls-cert") != "", c.String("tls-key") != ""
	switch {
	case certSet != keySet:
		return nil, errors.New("--tls-cert and --tls-key go together: give both")
	case certSet:
		cf := &frontdoor.CertFile{CertPath: c.String("tls-cert"), KeyPath: c.String("tls-key")}
		if err := cf.Load(); err != nil {
			return nil, fmt.Errorf("--tls-cert, --tls-key: %w", err)
		}
		cfg.Certificate = cf
		reloadOnHUP(c.Context, log, cf)
	case c.IsSet("tls-client-ca") || c.Bool("tls-required") || c.IsSet("tls-server-name"):
		return nil, errors.New("--tls-client-ca, --tls-required and --tls-server-name need the server's certificate: --tls-cert and --tls-key")
	}
	if v := c.String("tls-client-ca"); v != "" {
		pem, err := os.ReadFile(v)
		if err != nil {
			return nil, fmt.Errorf("--tls-client-ca: %w", err)
		}
		cfg.ClientCAs = x509.NewCertPool()
		if !cfg.ClientCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-client-ca %s holds no PEM certificate", v)
		}
		cfg.RequireTLS = true // a client in clear would have no identity
	}
	if cfg.Certificate == nil && len(cfg.ProxyFrom) == 0 && cfg.ShareBackend == "" {
		return nil, nil
	}
	return cfg, nil
}

// proxyFrom parses --proxy-protocol-from.
func proxyFrom(c *cli.Context) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, v := range c.StringSlice("proxy-protocol-from") {
		for _, f := range strings.Split(v, ",") {
			p, err := netip.ParsePrefix(strings.TrimSpace(f))
			if err != nil {
				a, aerr := netip.ParseAddr(strings.TrimSpace(f))
				if aerr != nil {
					return nil, fmt.Errorf("--proxy-protocol-from %q: want CIDRs such as 192.0.2.10/32 or 2001:db8::/64", f)
				}
				p = netip.PrefixFrom(a, a.BitLen())
			}
			out = append(out, p.Masked())
		}
	}
	return out, nil
}

// reloadOnHUP reloads cf on every SIGHUP until ctx ends.
func reloadOnHUP(ctx context.Context, log *slog.Logger, cf *frontdoor.CertFile) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				if err := cf.Load(); err != nil {
					log.Error("SIGHUP: the TLS certificate was not reloaded; the old one stays", "cert", cf.CertPath, "err", err)
					continue
				}
				log.Info("SIGHUP: TLS certificate reloaded; new connections get it, live ones keep theirs", "cert", cf.CertPath)
			}
		}
	}()
}

// iketcpALPN is the ALPN protocol iketcp's clients offer and its servers
// take as theirs.
const iketcpALPN = "iketcp"
