// Package streamlink is the RFC 9329 link: a TCP connection (or anything
// that behaves like one, such as TLS) carrying length-framed datagrams
// behind the IKETCP prefix, for both roles. A Dialer opens links for a
// client, writing the prefix; a Listener accepts them for a server, whose
// links check the prefix before the first frame.
//
// Sending writes each datagram's Length in place in the room in front of
// it and sends a batch of frames in one writev. Receiving reads in large
// chunks and deframes in place: a burst of frames costs one read and no
// copies, and goes to the relay.Receiver in one call.
package streamlink

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/sendq"
)

// DefaultPrefixTimeout bounds a server's wait for the IKETCP prefix.
const DefaultPrefixTimeout = 5 * time.Second

// burstSize is the most frames handed to the receiver at once.
const burstSize = 64

// A link's socket holds about AutoNotSentTime of unsent data at the
// connection's delivery rate (TCP_NOTSENT_LOWAT, adjusted as the rate
// changes), within [MinNotSentLowat, MaxNotSentLowat]: a few kilobytes at
// tens of megabits, so that IKE and small packets do not wait behind
// milliseconds of ESP in the kernel, and enough at gigabits that the
// writer is not woken for every segment. It starts at MinNotSentLowat.
const (
	AutoNotSentTime = 2 * time.Millisecond
	MinNotSentLowat = 4 << 10
	MaxNotSentLowat = 1 << 20
)

// DefaultCongestion is the links' TCP congestion control: BBR keeps the
// bottleneck's queue short, where a loss-based one fills it. If the
// kernel lacks it, the link says so once and keeps the system's.
const DefaultCongestion = "bbr"

// Config configures the links of a Dialer or a Listener. Zero values mean
// the defaults.
type Config struct {
	// MaxDatagram is the largest datagram relayed either way; larger
	// frames are counted and skipped.
	MaxDatagram int
	// BufferSize is each link's read buffer: its memory footprint.
	BufferSize int
	// WriteTimeout bounds a write; a link that takes no data for that
	// long fails.
	WriteTimeout time.Duration
	// PrefixTimeout bounds a server link's wait for the IKETCP prefix.
	PrefixTimeout time.Duration
	// QueueBytes bounds the ESP waiting for a link that cannot send it
	// yet, and QueueDelay is how long ESP may wait before it is dropped
	// (package relay/sendq). IKE waits apart and goes first.
	QueueBytes int
	QueueDelay time.Duration
	// QueueInterval is how long a link's queue must stand before its late
	// ESP is dropped (sendq.DefaultInterval).
	QueueInterval time.Duration
	// NotSentLowat is the socket's TCP_NOTSENT_LOWAT: about the most it
	// holds unsent. Zero adjusts it to the connection's delivery rate
	// (AutoNotSentTime); negative leaves the system's (unlimited).
	NotSentLowat int
	// Congestion is the links' TCP congestion control; "" means
	// DefaultCongestion, "-" the system's.
	Congestion string
	// DeadAfter, on a client's links, bounds in TCP how long a connection
	// whose server went silent lives: TCP_USER_TIMEOUT and keepalives
	// (relay.SetDeadAfter). Zero leaves the kernel's defaults, which take
	// minutes.
	DeadAfter time.Duration
	// Counters counts what the links drop and why (nil: not counted).
	Counters *relay.Counters
	Logger   *slog.Logger
}

func (c *Config) maxDatagram() int {
	return relay.OrDefault(c.MaxDatagram, relay.DefaultMaxDatagram)
}
func (c *Config) bufferSize() int {
	return max(relay.OrDefault(c.BufferSize, relay.DefaultConnBuffer), c.maxDatagram()+relay.Headroom+framing.LengthSize)
}
func (c *Config) writeTimeout() time.Duration {
	return relay.OrDefault(c.WriteTimeout, relay.DefaultWriteTimeout)
}

// notSentLowat returns the lowat to set at first (0: none) and whether
// the link adjusts it to its delivery rate.
func (c *Config) notSentLowat() (lowat int, auto bool) {
	switch {
	case c.NotSentLowat == 0:
		return MinNotSentLowat, true
	case c.NotSentLowat < 0:
		return 0, false
	}
	return c.NotSentLowat, false
}
func (c *Config) congestion() string {
	switch c.Congestion {
	case "":
		return DefaultCongestion
	case "-":
		return ""
	}
	return c.Congestion
}
func (c *Config) prefixTimeout() time.Duration {
	return relay.OrDefault(c.PrefixTimeout, DefaultPrefixTimeout)
}

// shared is what all links of one Dialer or Listener share: their config,
// with the counters and logger filled in, and the rate limits of the log
// lines a far end can trigger.
type shared struct {
	cfg          Config
	log          *slog.Logger
	logOversize  relay.Sometimes
	logTune      relay.Sometimes
	prefixExpect bool      // links expect the prefix: the server's side
	buffers      sync.Pool // of *[]byte, the links' read buffers
}

func newShared(cfg Config, server bool) *shared {
	if cfg.Counters == nil {
		cfg.Counters = new(relay.Counters)
	}
	sh := &shared{cfg: cfg, log: relay.OrDefault(cfg.Logger, slog.Default()), prefixExpect: server}
	size := cfg.bufferSize()
	sh.buffers.New = func() any {
		b := make([]byte, size)
		return &b
	}
	return sh
}

// Dialer opens RFC 9329 links to a server, for a client.
type Dialer struct {
	// Dial opens the TCP connection; nil means a net.Dialer with
	// relay.TCPKeepAlive and Control. Tests inject their own; an HTTP
	// proxy's tunnel is one.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// TLS, if set, wraps every connection in TLS with this configuration
	// (RFC 9329 appendix: the prefix goes inside TLS). Without a
	// ServerName, the host of the address dialled is the name checked.
	TLS *tls.Config
	// Control, if set, is applied to every socket the default dialer
	// opens (transparent mode marks them to bypass its interception).
	Control func(network, address string, c syscall.RawConn) error

	once sync.Once
	cfg  Config
	sh   *shared
}

// NewDialer returns a dialer whose links use cfg.
func NewDialer(cfg Config) *Dialer { return &Dialer{cfg: cfg} }

// DialLink connects to addr and sends the IKETCP prefix.
func (d *Dialer) DialLink(ctx context.Context, addr string) (relay.Link, error) {
	d.once.Do(func() { d.sh = newShared(d.cfg, false) })
	var nc net.Conn
	var err error
	if d.Dial != nil {
		nc, err = d.Dial(ctx, "tcp", addr)
	} else {
		nd := net.Dialer{KeepAliveConfig: relay.TCPKeepAlive, Control: d.Control}
		nc, err = nd.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return nil, err
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		if err := relay.SetDeadAfter(tc, d.sh.cfg.DeadAfter); err != nil {
			nc.Close()
			return nil, fmt.Errorf("TCP_USER_TIMEOUT and keepalives: %w", err)
		}
	}
	if d.TLS != nil {
		if nc, err = clientTLS(ctx, nc, d.TLS, addr); err != nil {
			return nil, err
		}
	}
	nc.SetWriteDeadline(time.Now().Add(d.sh.cfg.writeTimeout()))
	if _, err := io.WriteString(nc, framing.Prefix); err != nil {
		nc.Close()
		return nil, fmt.Errorf("sending the IKETCP prefix: %w", err)
	}
	// No deadline stays behind: the link's non-blocking writes would fail
	// on it once it passed. Its writer sets one for each wait.
	nc.SetWriteDeadline(time.Time{})
	return newLink(nc, d.sh), nil
}

// clientTLS runs a TLS handshake over nc as a client.
//
// Without a ServerName the host dialled is the name checked. crypto/tls
// sends no SNI for an IP address and so leaves ConnectionState.ServerName
// empty; a VerifyConnection hook is told the name all the same.
func clientTLS(ctx context.Context, nc net.Conn, cfg *tls.Config, addr string) (net.Conn, error) {
	if cfg.ServerName == "" {
		if host, _, err := net.SplitHostPort(addr); err == nil {
			cfg = cfg.Clone()
			cfg.ServerName = host
			if verify := cfg.VerifyConnection; verify != nil {
				cfg.VerifyConnection = func(cs tls.ConnectionState) error {
					if cs.ServerName == "" {
						cs.ServerName = host
					}
					return verify(cs)
				}
			}
		}
	}
	tc := tls.Client(nc, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		nc.Close()
		return nil, fmt.Errorf("TLS with %s: %w", addr, err)
	}
	return tc, nil
}

// Listener accepts RFC 9329 links, for a server.
type Listener struct {
	ln net.Listener
	sh *shared
}

// Listen listens on the TCP address addr, with keepalives on accepted
// connections. Its errors say what to do.
func Listen(ctx context.Context, addr string, cfg Config) (*Listener, error) {
	lc := net.ListenConfig{KeepAliveConfig: relay.TCPKeepAlive}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, relay.ListenHint(err, "another TCP service (an IKE daemon with TCP support, a web server?) holds the port: stop it or choose another --listen")
	}
	return NewListener(ln, cfg), nil
}

// NewListener accepts links from ln.
func NewListener(ln net.Listener, cfg Config) *Listener {
	return &Listener{ln: ln, sh: newShared(cfg, true)}
}

// Accept waits for the next connection. Its link checks the prefix when
// served.
func (l *Listener) Accept(context.Context) (relay.Link, error) {
	nc, err := l.ln.Accept()
	if err != nil {
		return nil, err
	}
	return newLink(nc, l.sh), nil
}

func (l *Listener) Close() error  { return l.ln.Close() }
func (l *Listener) Addr() string  { return l.ln.Addr().String() }
func (l *Listener) Encap() string { return "rfc9329" }

// Link is one RFC 9329 connection.
type Link struct {
	nc      net.Conn
	sh      *shared
	direct  directWriter // nil: frames go through nc.Write (TLS)
	closed  atomic.Bool
	writers sync.WaitGroup
	lowat   *autoLowat     // nil: TCP_NOTSENT_LOWAT stays as set
	kernel  *kernelBacklog // nil where the socket's backlog cannot be read
	handed  atomic.Uint64  // bytes handed to Send, for kernel

	// Handing over (handover.go).
	served      chan struct{} // closed when Serve returns
	detaching   atomic.Bool
	detached    *Detached // set by Serve before it returns for Detach
	adopted     bool      // the stream was another process's: Serve reads carry first
	carry       []byte
	carryPrefix bool
	remote      string      // the client's address, if not the socket's peer
	local       string      // the client's connection's local address, if not the socket's
	tls         bool        // the client's connection is TLS, relayed to this socket by a predecessor
	identity    string      // the TLS client's identity, as the predecessor knew it
	kept        atomic.Bool // Detach gave the connection (TLS) to its caller: Close leaves it open

	wmu      sync.Mutex // guards the write side (send.go): the following
	q        sendq.Queue
	writing  bool     // the writer goroutine owns the socket's write side
	pend     [][]byte // Send's scratch, in pendBack
	pendBack [][]byte
	rest     []byte // the unsent tail of a frame a direct write sent in part, in restBuf; nil if none
	restBuf  []byte
	werr     error // the write error that ended the link
}

func newLink(nc net.Conn, sh *shared) *Link {
	l := &Link{nc: nc, sh: sh, direct: directFor(nc), served: make(chan struct{})}
	l.q.Budget, l.q.Target, l.q.Interval = sh.cfg.QueueBytes, sh.cfg.QueueDelay, sh.cfg.QueueInterval
	if sh.cfg.Counters != nil {
		l.q.Delays = &sh.cfg.Counters.QueueDelay
	}
	if _, ok := nc.(*net.UnixConn); ok {
		// A socketpair's end, relayed from a TLS connection a predecessor
		// kept: no TCP to tune or read the backlog of.
		return l
	}
	lowat, err := tuneSocket(nc, &sh.cfg)
	if err != nil {
		sh.logTune.Log(sh.log, slog.LevelWarn, "link socket option not set", "err", err)
	}
	l.lowat = lowat
	l.kernel = newKernelBacklog(rawConn(underlying(nc)))
	return l
}

// Serve reads the stream until it ends: on a server's link the prefix
// first, within its deadline, then frames, a burst at a time to rx.
//
// An idle link holds no read buffer: when its decoder has handed out
// everything it read and the stream has nothing more, the buffer goes
// back to the Dialer's or Listener's pool, and the link waits for the
// stream to become readable without one (on connections that can wait
// so: TCP; TLS keeps its buffer).
func (l *Link) Serve(rx relay.Receiver) error {
	defer close(l.served)
	cfg := &l.sh.cfg
	var w *waiter
	if raw := rawConn(l.nc); raw != nil {
		w = newWaiter(raw)
	}
	if l.sh.prefixExpect && (!l.adopted || l.carryPrefix) {
		l.nc.SetReadDeadline(time.Now().Add(cfg.prefixTimeout()))
	}
	var d *framing.Decoder
	var held *[]byte // the decoder's buffer, from the pool
	defer func() {
		if held != nil {
			l.sh.buffers.Put(held)
		}
	}()
	burst := make([]relay.Datagram, 0, burstSize)
	if l.adopted {
		held = l.sh.buffers.Get().(*[]byte)
		d = framing.NewDecoderOn(l.nc, *held, l.sh.prefixExpect && l.carryPrefix)
		d.SetHeadroom(relay.Headroom)
		d.LimitPayload(cfg.maxDatagram())
		if !d.Preload(l.carry) {
			return &relay.ProtocolError{Reason: "the stream handed over holds more than a link's buffer"}
		}
		l.carry = nil
		if err := l.readPrefix(d); err != nil {
			return err
		}
	}
	for {
		if d == nil || w != nil && d.Empty() {
			if held != nil {
				d.Release()
				l.sh.buffers.Put(held)
				held = nil
			}
			if w != nil {
				if err := w.wait(); err != nil {
					if l.detaching.Load() {
						return l.detachedAt(d)
					}
					if d == nil && l.sh.prefixExpect {
						return l.prefixFailed(err)
					}
					return l.ended(err)
				}
			}
			held = l.sh.buffers.Get().(*[]byte)
			if d == nil {
				d = framing.NewDecoderOn(l.nc, *held, l.sh.prefixExpect)
				d.SetHeadroom(relay.Headroom)
				d.LimitPayload(cfg.maxDatagram())
				if err := l.readPrefix(d); err != nil {
					return err
				}
				continue
			}
			d.Reuse(*held)
		}
		p, err := d.Next()
		if err != nil {
			if errors.Is(err, framing.ErrTooLarge) {
				cfg.Counters.OversizedFrames.Add(1)
				l.sh.logOversize.Log(l.sh.log, slog.LevelWarn, "frame skipped: larger than --max-datagram",
					"remote", l.RemoteAddr(), "err", err)
				continue
			}
			if l.detaching.Load() {
				return l.detachedAt(d)
			}
			return l.ended(err)
		}
		buf, off := d.Offset(p)
		burst = append(burst, relay.Datagram{Buf: buf, Off: off, N: len(p)})
		if d.Buffered() && len(burst) < cap(burst) {
			continue
		}
		err = rx.Receive(burst)
		clear(burst)
		burst = burst[:0]
		if err != nil {
			return err
		}
	}
}

// rawConn returns nc's raw connection, if nc is a socket whose
// readability can be waited for without reading.
func rawConn(nc net.Conn) syscall.RawConn {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}

// readPrefix reads the IKETCP prefix, if the link expects one, within the
// deadline Serve set.
func (l *Link) readPrefix(d *framing.Decoder) error {
	if !l.sh.prefixExpect {
		return nil
	}
	if err := d.ReadPrefix(); err != nil {
		if l.detaching.Load() {
			return l.detachedAt(d)
		}
		return l.prefixFailed(err)
	}
	l.nc.SetReadDeadline(time.Time{})
	if l.detaching.Load() { // Detach's deadline must hold
		l.nc.SetReadDeadline(time.Now())
	}
	return nil
}

// prefixFailed says why a server's link got no prefix, and counts it.
func (l *Link) prefixFailed(err error) error {
	cfg := &l.sh.cfg
	var ne net.Error
	var pe *framing.PrefixError
	if werr := l.writeErr(); werr != nil {
		return werr
	}
	switch {
	case l.closed.Load():
		return relay.ErrClosedHere
	case errors.As(err, &ne) && ne.Timeout():
		cfg.Counters.PrefixTimeouts.Add(1)
		return &relay.ProtocolError{Reason: fmt.Sprintf("no IKETCP prefix within %v", cfg.prefixTimeout())}
	case errors.As(err, &pe):
		cfg.Counters.BadPrefix.Add(1)
		return &relay.ProtocolError{Reason: fmt.Sprintf("stream does not begin with IKETCP (got %q): not an RFC 9329 client", pe.Got)}
	case err == io.EOF || errors.Is(err, framing.ErrTruncated):
		cfg.Counters.BadPrefix.Add(1)
		return &relay.ProtocolError{Reason: "closed before sending the IKETCP prefix"}
	}
	return &relay.ProtocolError{Reason: "read failed before the prefix: " + err.Error()}
}

// ended says why the stream ended, counting what the far end did wrong.
func (l *Link) ended(err error) error {
	cfg := &l.sh.cfg
	switch {
	case err == io.EOF:
		if l.sh.prefixExpect {
			return errors.New("peer closed the connection")
		}
		return errors.New("server closed the connection")
	case errors.Is(err, framing.ErrTruncated):
		cfg.Counters.TruncatedFrames.Add(1)
		return fmt.Errorf("stream ended inside a frame (partial frame discarded): %w", err)
	case errors.Is(err, framing.ErrBadLength):
		cfg.Counters.BadLength.Add(1)
		return &relay.ProtocolError{Reason: "invalid frame: " + err.Error()}
	}
	if werr := l.writeErr(); werr != nil {
		return werr
	}
	if l.closed.Load() || errors.Is(err, net.ErrClosed) {
		return relay.ErrClosedHere
	}
	if !l.sh.prefixExpect && strings.Contains(err.Error(), "tls: certificate required") {
		// TLS 1.3: the client's handshake completed; the server's refusal
		// comes with the first read.
		cfg.Counters.TLSFailures.Add(1)
		return fmt.Errorf("read failed: %w (the server accepts only clients with a certificate: give one with --tls-client-cert and --tls-client-key)", err)
	}
	return fmt.Errorf("read failed: %w", err)
}

// Close closes the connection, and waits for the writer to stop; Serve
// returns.
func (l *Link) Close() error {
	l.closed.Store(true)
	var err error
	if !l.kept.Load() {
		err = l.nc.Close()
	}
	l.writers.Wait()
	return err
}

// Identity is the subject of the certificate a TLS client proved it
// holds, or "".
func (l *Link) Identity() string {
	if l.identity != "" {
		return l.identity
	}
	tc, ok := l.nc.(*tls.Conn)
	if !ok {
		return ""
	}
	st := tc.ConnectionState()
	if !st.HandshakeComplete || len(st.VerifiedChains) == 0 {
		return ""
	}
	return st.VerifiedChains[0][0].Subject.String()
}

func (l *Link) LocalAddr() string {
	if l.local != "" {
		return l.local
	}
	return l.nc.LocalAddr().String()
}
func (l *Link) RemoteAddr() string {
	if l.remote != "" {
		return l.remote
	}
	return l.nc.RemoteAddr().String()
}
