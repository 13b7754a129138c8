// Package frontdoor is the server's front door: a net.Listener in front of
// relay/streamlink's Listener that looks at each TCP connection before
// iketcp takes it, and decides who gets it.
//
// For each connection the inner listener accepts, a goroutine of its own
// (never the accept loop) reads at most MaxSniff bytes within
// Config.SniffTimeout, and then:
//
//  1. From a source in Config.ProxyFrom, reads a PROXY protocol header
//     (version 1 or 2), which must come first: a trusted source's
//     connection without one is refused. A header from any other source is
//     refused. After a header, the connection's RemoteAddr is the client
//     the header names (a LOCAL header, a proxy's own health check, keeps
//     the proxy's address). Both refusals count as proxy_refused.
//  2. Looks at the first bytes after it (framing.Sniff):
//     - IKETCP: an RFC 9329 client in clear. Accept returns the connection
//     with what was read replayed, so streamlink reads the prefix itself;
//     with Config.RequireTLS it is refused instead (clear_refused).
//     - A TLS ClientHello for iketcp (see Config.ServerNames): the front
//     door completes the TLS 1.3 handshake itself, within the same
//     deadline, and Accept returns the *tls.Conn, handshake done (so a
//     client certificate's identity is known from the start). A failed
//     handshake counts as tls_failures.
//     - Any other TLS, or an HTTP request line: with Config.ShareBackend,
//     the connection is spliced to it, the bytes read first and then the
//     rest, untouched, both ways, half-closes passed on (shared_conns);
//     without, refused (unrecognized).
//     - Anything else: refused (unrecognized).
//
// A connection that sends nothing recognizable within SniffTimeout is
// closed (prefix_timeouts); one that closes before sending a byte (a port
// scan, a load balancer's TCP health check) is closed without a count.
//
// go-proxyproto is used as a parser only: the front door reads the header's
// bytes itself, under its own deadline and byte budget, and hands them to
// proxyproto.Read. None of the library's Listener or Conn machinery is in
// play, so neither its policy functions (whose default, USE, would take a
// header from anyone and not require one) nor its ReadHeaderTimeout (whose
// expiry counts as "no header") decide anything here.
//
// Bounds: at most MaxPending connections are being looked at (or wait for
// Accept) at once, and at most MaxPendingPerSource from one source (an
// IPv4 address, an IPv6 /64; sources in ProxyFrom are exempt, since every
// client behind a proxy shares its address); at most MaxShared connections
// are spliced at once. Over a bound, the newest connection is refused
// (conns_rejected): a stranger's idle connections cannot keep clients from
// other sources out. Every log line a remote party can trigger is rate-
// limited.
package frontdoor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/iketcp/iketcp/relay"
)

// Defaults of Config's zero fields.
const (
	DefaultSniffTimeout        = 5 * time.Second
	DefaultMaxPending          = 1024
	DefaultMaxPendingPerSource = 32
	DefaultMaxShared           = 1024
)

// MaxSniff is the most the front door reads from a connection before it
// decides: a PROXY header and the first bytes after it, up to a whole
// ClientHello (about 2 KiB with post-quantum key shares; a record is at
// most 16 KiB).
const MaxSniff = 16 << 10

// shareDialTimeout bounds a connection attempt to the share backend.
const shareDialTimeout = 5 * time.Second

// Config configures a front door. Its zero value takes RFC 9329 clients in
// clear and refuses everything else.
type Config struct {
	// ProxyFrom are the sources (load balancers, reverse proxies) whose
	// connections begin with a PROXY protocol header, version 1 or 2. A
	// connection from one of them must begin with one and is refused
	// without; a header from any other source is refused. Empty: no
	// source may send one.
	ProxyFrom []netip.Prefix

	// Certificate is the server's TLS certificate, asked for at each
	// handshake (a *CertFile reloads it at run time). Nil: the front door
	// terminates no TLS.
	Certificate CertSource
	// ServerNames are the TLS server names (SNI) that are iketcp's, matched
	// without regard to case; "*.example.com" matches one label in place
	// of the star. A ClientHello is iketcp's when it names one of them,
	// when it offers one of Protocols, or, without a ShareBackend, when it
	// names none or ServerNames is empty. With a ShareBackend, a ClientHello
	// without a server name goes to the backend (a browser that came by
	// address).
	ServerNames []string
	// Protocols are ALPN protocol names that mark a client as iketcp's,
	// whatever name it asks for; the server offers them in the handshake.
	Protocols []string
	// ClientCAs, if set, makes TLS clients prove a certificate signed by
	// one of them (tls.RequireAndVerifyClientCert); its subject is the
	// link's relay.IdentityOf.
	ClientCAs *x509.CertPool
	// RequireTLS refuses RFC 9329 clients in clear.
	RequireTLS bool

	// ShareBackend (host:port) takes the connections that are not
	// iketcp's: TLS for other names, and HTTP (a web site, the gateway's
	// admin page). Empty: they are refused.
	ShareBackend string
	// DialShare opens connections to ShareBackend; nil means a net.Dialer
	// with relay.TCPKeepAlive. Tests inject their own.
	DialShare func(ctx context.Context, network, addr string) (net.Conn, error)
	// MaxShared bounds the connections spliced to ShareBackend at once.
	MaxShared int

	// MaxPending bounds the connections being looked at, or waiting for
	// Accept, at once; MaxPendingPerSource, those of one source.
	MaxPending          int
	MaxPendingPerSource int
	// SniffTimeout bounds the time from accepting a connection to knowing
	// what it is: the PROXY header, the first bytes, and for iketcp's TLS
	// the whole handshake.
	SniffTimeout time.Duration

	// Counters counts what the front door refuses, shares and fails (nil:
	// a private set). The command passes the server's.
	Counters *relay.Counters
	Logger   *slog.Logger
}

func (c *Config) sniffTimeout() time.Duration {
	return relay.OrDefault(c.SniffTimeout, DefaultSniffTimeout)
}
func (c *Config) maxPending() int { return relay.OrDefault(c.MaxPending, DefaultMaxPending) }
func (c *Config) maxPendingPerSource() int {
	return relay.OrDefault(c.MaxPendingPerSource, DefaultMaxPendingPerSource)
}
func (c *Config) maxShared() int { return relay.OrDefault(c.MaxShared, DefaultMaxShared) }

// source is what the per-source bound counts a client as: its IPv4
// address, or the /64 of its IPv6 address, as relay/server counts them.
type source netip.Prefix

// logs are the front door's rate-limited log lines, one per kind of event.
type logs struct {
	accepted, refused, proxy, clear, tls, timeout, unrecognized, shared, share, acceptFailed relay.Sometimes
}

// Listener is the front door: a net.Listener whose Accept returns the
// connections that are iketcp's (see the package doc).
//
// Accept's connections are the caller's to close. The others the front
// door owns: Close ends them, and every goroutine the listener started.
type Listener struct {
	inner    net.Listener
	cfg      Config
	rules    rules
	tls      *tls.Config   // nil: no TLS is terminated here
	linger   time.Duration // shareLinger, when the listener started
	counters *relay.Counters
	log      *slog.Logger
	logs     logs
	ready    chan net.Conn      // connections for Accept
	done     chan struct{}      // closed by Close
	stopped  chan struct{}      // closed when the accept loop ends
	ctx      context.Context    // ends with Close: share backend dials
	cancel   context.CancelFunc // ends ctx
	once     sync.Once
	wg       sync.WaitGroup

	mu        sync.Mutex // guards the following
	closed    bool
	acceptErr error                 // why the accept loop ended
	owned     map[net.Conn]struct{} // being looked at, or spliced (both legs): Close closes them
	pending   int                   // connections being looked at or waiting for Accept
	perSource map[source]int        // of pending, per source outside ProxyFrom
	sharing   int                   // connections spliced to ShareBackend
}

// Listen starts a front door on inner; it takes inner over (Close closes
// it).
func Listen(inner net.Listener, cfg Config) *Listener {
	if cfg.Counters == nil {
		cfg.Counters = new(relay.Counters)
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &Listener{
		inner:     inner,
		cfg:       cfg,
		rules:     newRules(&cfg),
		counters:  cfg.Counters,
		linger:    shareLinger,
		log:       relay.OrDefault(cfg.Logger, slog.Default()),
		ready:     make(chan net.Conn),
		done:      make(chan struct{}),
		stopped:   make(chan struct{}),
		ctx:       ctx,
		cancel:    cancel,
		owned:     make(map[net.Conn]struct{}),
		perSource: make(map[source]int),
	}
	if cfg.Certificate != nil {
		l.tls = &tls.Config{
			MinVersion:     tls.VersionTLS13,
			GetCertificate: cfg.Certificate.GetCertificate,
			NextProtos:     cfg.Protocols,
		}
		if cfg.ClientCAs != nil {
			l.tls.ClientCAs = cfg.ClientCAs
			l.tls.ClientAuth = tls.RequireAndVerifyClientCert
		}
	}
	l.warnConfig()
	l.wg.Add(1)
	go l.acceptConns()
	return l
}

// warnConfig says once what a configuration will do that its author may
// not expect.
func (l *Listener) warnConfig() {
	cfg := &l.cfg
	switch {
	case cfg.RequireTLS && cfg.Certificate == nil:
		l.log.Warn("front door: TLS is required but no certificate is configured: no client can connect")
	case cfg.Certificate != nil && cfg.ShareBackend != "" && len(cfg.ServerNames) == 0 && len(cfg.Protocols) == 0:
		l.log.Warn("front door: with a share backend and no server names, every TLS connection goes to the backend: name iketcp's server names")
	case cfg.Certificate == nil && cfg.ClientCAs != nil:
		l.log.Warn("front door: client CAs are configured but no certificate: no TLS is terminated")
	}
}

// Accept waits for the next connection that is iketcp's: RFC 9329 in
// clear, or a *tls.Conn whose handshake is done. After Close it returns
// net.ErrClosed.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case <-l.done:
		return nil, net.ErrClosed
	default:
	}
	select {
	case c := <-l.ready:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	case <-l.stopped:
		l.mu.Lock()
		err := l.acceptErr
		l.mu.Unlock()
		return nil, err
	}
}

// Close stops accepting, closes every connection the front door still
// owns (being looked at, waiting for Accept, or spliced) and waits for its
// goroutines. It is idempotent; it returns the inner listener's Close
// error.
func (l *Listener) Close() error {
	var err error
	l.once.Do(func() {
		l.mu.Lock()
		l.closed = true
		owned := make([]net.Conn, 0, len(l.owned))
		for c := range l.owned {
			owned = append(owned, c)
		}
		l.mu.Unlock()
		close(l.done)
		l.cancel()
		err = l.inner.Close()
		for _, c := range owned {
			c.Close()
		}
		l.wg.Wait()
	})
	return err
}

// Addr is the inner listener's address.
func (l *Listener) Addr() net.Addr { return l.inner.Addr() }

// acceptConns accepts connections from the inner listener until it is
// closed, and starts a goroutine for each that a bound admits.
func (l *Listener) acceptConns() {
	defer l.wg.Done()
	defer close(l.stopped)
	var backoff time.Duration
	for {
		nc, err := l.inner.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				l.mu.Lock()
				l.acceptErr = err
				l.mu.Unlock()
				return
			}
			// Out of file descriptors and the like: wait and retry, as
			// net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.logs.acceptFailed.Log(l.log, slog.LevelWarn, "front door: accept failed, retrying", "listen", l.inner.Addr().String(), "err", err, "in", backoff)
			select {
			case <-time.After(backoff):
			case <-l.done:
			}
			continue
		}
		backoff = 0
		l.admit(nc)
	}
}

// admit starts looking at nc, or refuses it over a bound.
func (l *Listener) admit(nc net.Conn) {
	addr := addrOf(nc.RemoteAddr())
	trusted := l.rules.trusted(addr)
	src := sourceOf(addr)
	l.mu.Lock()
	var refuse string
	switch {
	case l.closed:
		l.mu.Unlock()
		nc.Close()
		return
	case l.pending >= l.cfg.maxPending():
		refuse = "too many connections being looked at (raise the pending limit)"
	case !trusted && l.perSource[src] >= l.cfg.maxPendingPerSource():
		refuse = "too many connections being looked at from one source"
	}
	if refuse != "" {
		l.mu.Unlock()
		l.counters.ConnsRejected.Add(1)
		l.logs.refused.Log(l.log, slog.LevelWarn, "front door: connection refused: "+refuse, "remote", nc.RemoteAddr().String(),
			"source", netip.Prefix(src).String())
		nc.Close()
		return
	}
	l.pending++
	if !trusted {
		l.perSource[src]++
	}
	l.owned[nc] = struct{}{}
	l.wg.Add(1)
	l.mu.Unlock()
	go l.serveConn(nc, src, trusted)
}

// release gives back nc's pending slot.
func (l *Listener) release(src source, trusted bool) {
	l.mu.Lock()
	l.pending--
	if !trusted {
		if l.perSource[src]--; l.perSource[src] == 0 {
			delete(l.perSource, src)
		}
	}
	l.mu.Unlock()
}

// disown stops the front door owning nc (Close no longer closes it), and
// reports whether it still runs.
func (l *Listener) disown(nc net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.owned, nc)
	return !l.closed
}

// serveConn decides what nc is and does it: hands it to Accept, splices it
// to the share backend, or closes it.
func (l *Listener) serveConn(nc net.Conn, src source, trusted bool) {
	defer l.wg.Done()
	nc.SetDeadline(time.Now().Add(l.cfg.sniffTimeout()))
	buf := getBuffer()
	v := l.rules.decide(nc, trusted, *buf)
	remote := nc.RemoteAddr()
	if v.remote != nil {
		remote = v.remote
	}
	switch v.action {
	case actionClear:
		c := newConn(nc, v.remote, v.replay)
		putBuffer(buf)
		l.logs.accepted.Log(l.log, slog.LevelDebug, "front door: RFC 9329 client in clear", "remote", remote.String())
		l.handOff(c, nc)
	case actionTLS:
		c := newConn(nc, v.remote, v.replay)
		putBuffer(buf)
		tc := tls.Server(c, l.tls)
		if err := tc.Handshake(); err != nil {
			nc.Close()
			if l.disown(nc) { // not ended by Close
				l.counters.TLSFailures.Add(1)
				l.logs.tls.Log(l.log, slog.LevelInfo, "front door: TLS handshake failed", "remote", remote.String(),
					"server_name", v.hello.serverName, "err", err)
			}
			break
		}
		st := tc.ConnectionState()
		l.logs.accepted.Log(l.log, slog.LevelDebug, "front door: TLS client", "remote", remote.String(),
			"server_name", st.ServerName, "identity", identity(st))
		l.handOff(tc, nc)
	case actionShare:
		l.release(src, trusted)
		l.share(nc, remote, v, buf)
		return
	default:
		putBuffer(buf)
		nc.Close()
		if l.disown(nc) { // not ended by Close
			l.refuse(nc, remote, v)
		}
	}
	l.release(src, trusted)
}

// handOff gives c, which wraps nc, to Accept, or closes it if the front
// door closes first.
func (l *Listener) handOff(c, nc net.Conn) {
	nc.SetDeadline(time.Time{})
	if !l.disown(nc) {
		nc.Close()
		return
	}
	select {
	case l.ready <- c:
	case <-l.done:
		nc.Close() // not c: a TLS close_notify could wait on the peer
	}
}

// refuse counts and logs why nc was refused.
func (l *Listener) refuse(nc net.Conn, remote net.Addr, v verdict) {
	args := []any{"remote", remote.String(), "reason", v.reason}
	if v.remote != nil {
		args = append(args, "proxy", nc.RemoteAddr().String())
	}
	switch v.refusal {
	case refusalProxy:
		l.counters.ProxyRefused.Add(1)
		l.logs.proxy.Log(l.log, slog.LevelWarn, "front door: PROXY protocol refused", args...)
	case refusalClear:
		l.counters.ClearRefused.Add(1)
		l.logs.clear.Log(l.log, slog.LevelInfo, "front door: RFC 9329 client in clear refused: TLS is required", args...)
	case refusalTimeout:
		l.counters.PrefixTimeouts.Add(1)
		l.logs.timeout.Log(l.log, slog.LevelInfo, "front door: connection closed", append(args, "timeout", l.cfg.sniffTimeout().String())...)
	case refusalUnrecognized:
		l.counters.Unrecognized.Add(1)
		l.logs.unrecognized.Log(l.log, slog.LevelInfo, "front door: connection closed: not iketcp's", args...)
	default:
		l.logs.unrecognized.Log(l.log, slog.LevelDebug, "front door: connection closed", args...)
	}
}

// identity is the subject of a verified client certificate, or "".
func identity(st tls.ConnectionState) string {
	if len(st.VerifiedChains) == 0 {
		return ""
	}
	return st.VerifiedChains[0][0].Subject.String()
}

// addrOf returns a's address and port, or the zero value.
func addrOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	if a == nil {
		return netip.AddrPort{}
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

func sourceOf(ap netip.AddrPort) source {
	a := ap.Addr().Unmap()
	if !a.IsValid() {
		return source{}
	}
	bits := 32
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return source(p)
}

// buffers are the front door's read buffers, MaxSniff bytes each.
var buffers = sync.Pool{New: func() any {
	b := make([]byte, MaxSniff)
	return &b
}}

func getBuffer() *[]byte  { return buffers.Get().(*[]byte) }
func putBuffer(b *[]byte) { buffers.Put(b) }
