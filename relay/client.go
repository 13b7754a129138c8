package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// Client defaults.
const (
	DefaultMaxFlows     = 64
	DefaultFlowIdle     = 2 * time.Minute
	DefaultQueueLen     = 256
	DefaultDialTimeout  = 5 * time.Second
	DefaultReconnectMin = 100 * time.Millisecond
	DefaultReconnectMax = 5 * time.Second
)

// clientBatch is how many datagrams the client reads or writes at once.
const clientBatch = 64

// stableAfter is how long a connection must last for the next reconnect to
// start again from the shortest backoff.
const stableAfter = 5 * time.Second

// ClientConfig configures a Client. Zero values mean the defaults above.
type ClientConfig struct {
	// Peer is the iketcp server in explicit mode (Serve), host:port. It is
	// resolved at each dial.
	Peer string
	// Peers are the IKE peers whose traffic transparent mode (ServeTUN)
	// carries; each is dialled at TCPPort. Packets to other addresses are
	// dropped and counted.
	Peers []netip.Addr
	// TCPPort is the iketcp server's port on each of Peers (default 4500).
	TCPPort uint16
	Logger  *slog.Logger
	// MaxFlows bounds local flows (daemon addresses) served at once.
	MaxFlows int
	// FlowIdle closes a flow, and its connection, when the daemon has sent
	// nothing (not even a keepalive) for that long.
	FlowIdle time.Duration
	// QueueLen bounds the datagrams waiting for a flow's connection.
	QueueLen int
	// MaxDatagram, ConnBuffer and WriteTimeout are as in ServerConfig.
	MaxDatagram  int
	ConnBuffer   int
	WriteTimeout time.Duration
	// DialTimeout bounds one connection attempt.
	DialTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the backoff between attempts.
	ReconnectMin, ReconnectMax time.Duration
	// Dial opens connections to Peer; nil means a TCP dialer with
	// keepalives. Tests inject their own.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Version is reported in Status.
	Version string
}

func (c *ClientConfig) logger() *slog.Logger    { return orDefault(c.Logger, slog.Default()) }
func (c *ClientConfig) maxFlows() int           { return orDefault(c.MaxFlows, DefaultMaxFlows) }
func (c *ClientConfig) flowIdle() time.Duration { return orDefault(c.FlowIdle, DefaultFlowIdle) }
func (c *ClientConfig) queueLen() int           { return orDefault(c.QueueLen, DefaultQueueLen) }
func (c *ClientConfig) maxDatagram() int        { return orDefault(c.MaxDatagram, DefaultMaxDatagram) }
func (c *ClientConfig) writeTimeout() time.Duration {
	return orDefault(c.WriteTimeout, DefaultWriteTimeout)
}
func (c *ClientConfig) dialTimeout() time.Duration {
	return orDefault(c.DialTimeout, DefaultDialTimeout)
}
func (c *ClientConfig) reconnectMin() time.Duration {
	return orDefault(c.ReconnectMin, DefaultReconnectMin)
}
func (c *ClientConfig) reconnectMax() time.Duration {
	return orDefault(c.ReconnectMax, DefaultReconnectMax)
}
func (c *ClientConfig) connBuffer() int {
	return max(orDefault(c.ConnBuffer, DefaultConnBuffer), c.maxDatagram()+framing.LengthSize)
}

func (c *ClientConfig) tcpPort() uint16 { return orDefault(c.TCPPort, 4500) }

func (c *ClientConfig) dial(ctx context.Context, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.dialTimeout())
	defer cancel()
	if c.Dial != nil {
		return c.Dial(ctx, "tcp", addr)
	}
	d := net.Dialer{KeepAliveConfig: TCPKeepAlive}
	return d.DialContext(ctx, "tcp", addr)
}

// TCPKeepAlive is the keepalive iketcp's TCP connections use: it keeps NAT
// mappings fresh and finds dead peers on idle connections (RFC 9329 6.7:
// these only refresh middleboxes; IKE's own liveness checks stay
// authoritative).
var TCPKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 4}

// Client relays an IKE daemon's datagrams to an iketcp server over
// RFC 9329 TCP, one connection per flow. It meets the daemon in one of
// two ways: explicit mode (Serve) listens on a UDP socket the daemon is
// configured to talk to; transparent mode (ServeTUN) reads the daemon's
// own traffic to its peers from a TUN device that intercepts it.
type Client struct {
	cfg      ClientConfig
	log      *slog.Logger
	started  time.Time
	counters Counters
	pool     sync.Pool // of *datagram

	nextID atomic.Uint64

	// Set once by Serve or ServeTUN before any flow starts.
	mode    string                                                 // modeExplicit or modeTransparent
	deliver func(f *flow, buf []byte, payloads []payloadRef) error // the return path to the daemon
	udp     *udpbatch.Conn                                         // explicit mode's socket
	dev     PacketDevice                                           // transparent mode's device

	mu     sync.Mutex // guards the following
	listen string
	flows  map[flowKey]*flow
	msg    framing.Message // takeLocked's scratch

	wg sync.WaitGroup // every goroutine the client starts

	logDial, logDrop, logOversize sometimes
}

// flowKey identifies a flow. In explicit mode it is the daemon's UDP
// address. In transparent mode it is the daemon's and its peer's IP
// addresses, without ports, so that a daemon that floats from port 500 to
// 4500 stays on the same connection.
type flowKey struct {
	daemon netip.AddrPort
	peer   netip.Addr
}

// datagram is a pooled buffer holding one datagram in port-4500 form at
// buf[off:off+n], with at least framing.LengthSize bytes in front of it to
// write the frame header in place.
type datagram struct {
	buf    []byte
	off, n int
}

// frame returns the datagram as an RFC 9329 frame, writing its Length.
func (p *datagram) frame() []byte {
	framing.PutLength(p.buf[p.off-framing.LengthSize:], p.n)
	return p.buf[p.off-framing.LengthSize : p.off+p.n]
}

// payloadRef locates a payload in a decoder's buffer.
type payloadRef struct{ off, n int }

// NewClient returns a client for cfg.
func NewClient(cfg ClientConfig) (*Client, error) {
	cl := &Client{cfg: cfg, log: cfg.logger(), started: time.Now(), flows: make(map[flowKey]*flow)}
	// Room for the largest datagram behind the largest header in front of
	// it: a TUN packet's IP and UDP headers.
	size := packetHeadroom + cfg.maxDatagram()
	cl.pool.New = func() any { return &datagram{buf: make([]byte, size)} }
	return cl, nil
}

// packetHeadroom is the room kept in front of payloads: enough for an
// IPv6 and a UDP header, which also covers the frame Length and non-ESP
// marker.
const packetHeadroom = 48

// Counters returns the client's live counters.
func (cl *Client) Counters() *Counters { return &cl.counters }

func (cl *Client) getDatagram() *datagram { return cl.pool.Get().(*datagram) }

func (cl *Client) putDatagram(p *datagram) {
	p.off, p.n = 0, 0
	cl.pool.Put(p)
}

// run drives the client: ingress reads the daemon's packets until ctx
// ends or it fails; closer unblocks it at the end. Then every flow stops
// and run waits for the client's goroutines.
func (cl *Client) run(ctx context.Context, closer io.Closer, ingress func(context.Context) error) error {
	ctx, cancel := context.WithCancel(ctx)
	cl.wg.Add(2)
	go func() {
		defer cl.wg.Done()
		<-ctx.Done()
		closer.Close()
	}()
	go cl.expireFlows(ctx)

	err := ingress(ctx)
	if ctx.Err() != nil {
		err = nil
	}
	cancel()
	cl.mu.Lock()
	flows := make([]*flow, 0, len(cl.flows))
	for _, f := range cl.flows {
		flows = append(flows, f)
	}
	cl.mu.Unlock()
	for _, f := range flows {
		f.stop()
	}
	cl.wg.Wait()
	return err
}

// takeLocked hands a datagram of the daemon's, in port-4500 form in d, to
// the flow for key, starting the flow if needed. It reports the flow, the
// datagram's kind and whether the flow took d; if not, d stays the
// caller's. A datagram that is not a well-formed IKE message, ESP packet
// or keepalive is counted and dropped here, so it never starts a flow or
// a connection. Keepalives only show the flow is alive (RFC 9329 6.6: NAT
// keepalives are not sent over TCP; the connection's own keepalives
// refresh the path). cl.mu must be held.
func (cl *Client) takeLocked(ctx context.Context, key flowKey, d *datagram, now int64) (*flow, framing.Kind, bool) {
	if err := cl.msg.Decode(d.buf[d.off : d.off+d.n]); err != nil {
		cl.counters.Malformed.Add(1)
		cl.logDrop.log(cl.log, slog.LevelWarn, "datagram from the daemon dropped: not IKE, ESP or a keepalive",
			"from", key.daemon.String(), "len", d.n, "err", err)
		return nil, framing.KindInvalid, false
	}
	kind := cl.msg.Kind
	f := cl.flows[key]
	if kind == framing.KindKeepalive {
		cl.counters.KeepalivesDropped.Add(1)
		if f != nil {
			f.lastLocal.Store(now)
		}
		return f, kind, false
	}
	if f == nil {
		if f = cl.newFlowLocked(ctx, key); f == nil {
			return nil, kind, false
		}
	}
	f.lastLocal.Store(now)
	select {
	case f.queue <- d:
		return f, kind, true
	default:
		cl.counters.QueueFull.Add(1)
		cl.logDrop.log(cl.log, slog.LevelWarn, "datagram dropped: flow queue full (connection down or too slow)",
			"flow", f.id, "queue", cap(f.queue))
		return f, kind, false
	}
}

// newFlowLocked starts a flow for a new key, or returns nil over the flow
// limit. cl.mu must be held.
func (cl *Client) newFlowLocked(ctx context.Context, key flowKey) *flow {
	dial := cl.cfg.Peer
	if cl.mode == modeTransparent {
		dial = net.JoinHostPort(key.peer.String(), strconv.Itoa(int(cl.cfg.tcpPort())))
	}
	if len(cl.flows) >= cl.cfg.maxFlows() {
		cl.counters.SessionsRejected.Add(1)
		cl.logDrop.log(cl.log, slog.LevelWarn, "datagram dropped: flow limit reached (raise --max-flows)", "from", key.daemon.String())
		return nil
	}
	f := &flow{
		cl:      cl,
		id:      cl.nextID.Add(1),
		key:     key,
		dial:    dial,
		created: time.Now(),
		queue:   make(chan *datagram, cl.cfg.queueLen()),
		out:     make([]udpbatch.Message, 0, clientBatch),
	}
	f.ctx, f.cancel = context.WithCancel(ctx)
	cl.flows[key] = f
	cl.counters.SessionsCreated.Add(1)
	cl.log.Info("flow started", "flow", f.id, "mode", cl.mode, "daemon", key.daemon.String(), "peer", dial)
	cl.wg.Add(1)
	go cl.runFlow(f)
	return f
}

// expireFlows closes flows whose daemon has gone quiet.
func (cl *Client) expireFlows(ctx context.Context) {
	defer cl.wg.Done()
	idle := cl.cfg.flowIdle()
	sweepEvery(ctx, idle, 10*time.Second, func(now time.Time) {
		var expired []*flow
		cl.mu.Lock()
		for src, f := range cl.flows {
			if now.Sub(time.Unix(0, f.lastLocal.Load())) > idle {
				cl.counters.SessionsExpired.Add(1) // before it leaves Status
				delete(cl.flows, src)
				expired = append(expired, f)
			}
		}
		cl.mu.Unlock()
		for _, f := range expired {
			cl.log.Info("flow closed: the daemon sent nothing", "flow", f.id, "daemon", f.key.daemon.String(), "idle", idle.String())
			f.stop()
		}
	})
}

// Flow states, for Status.
const (
	stateConnecting int32 = iota
	stateUp
	stateWaiting
)

// flow is one daemon (toward one peer, in transparent mode) and the
// connection that carries it.
type flow struct {
	cl      *Client
	id      uint64
	key     flowKey
	dial    string // the iketcp server, host:port
	created time.Time
	queue   chan *datagram
	ctx     context.Context // ends the flow
	cancel  context.CancelFunc

	lastLocal atomic.Int64 // unix ns of the daemon's last datagram
	lastPeer  atomic.Int64 // unix ns of the last frame from the peer
	state     atomic.Int32
	conns     atomic.Uint64
	stats     flowStats
	book      saBook
	ports     daemonPorts // transparent mode: where replies go

	out []udpbatch.Message // explicit mode's scratch for the return path, used by readPeer only

	mu   sync.Mutex // guards the following
	peer string     // remote address of the current connection
}

func (f *flow) stop() { f.cancel() }

// drain returns queued packets to the pool as runFlow ends.
func (f *flow) drain() {
	for {
		select {
		case p := <-f.queue:
			f.cl.putDatagram(p)
		default:
			return
		}
	}
}

// runFlow keeps a connection to the peer for the flow, reconnecting with
// backoff, and writes the flow's queue onto it.
//
// A flow leaves cl.flows (under cl.mu, which readLocal holds while it
// queues) before it is stopped, and readLocal has returned before Serve
// stops the rest, so nothing is queued after runFlow drains the queue.
func (cl *Client) runFlow(f *flow) {
	defer cl.wg.Done()
	defer f.drain()
	backoff := time.Duration(0)
	for f.ctx.Err() == nil {
		f.state.Store(stateConnecting)
		nc, err := cl.connect(f)
		if err != nil {
			if f.ctx.Err() != nil {
				return
			}
			cl.counters.DialFailures.Add(1)
			backoff = nextBackoff(backoff, cl.cfg.reconnectMin(), cl.cfg.reconnectMax())
			cl.logDial.log(cl.log, slog.LevelWarn, "cannot connect to the iketcp server, retrying", "flow", f.id,
				"peer", f.dial, "err", err, "retry_in", backoff.Round(time.Millisecond).String())
			f.state.Store(stateWaiting)
			if !sleepCtx(f.ctx, backoff) {
				return
			}
			continue
		}
		connected := time.Now()
		reason := cl.carry(f, nc)
		f.state.Store(stateWaiting)
		if f.ctx.Err() != nil {
			return
		}
		if time.Since(connected) >= stableAfter {
			backoff = 0
		}
		backoff = nextBackoff(backoff, cl.cfg.reconnectMin(), cl.cfg.reconnectMax())
		cl.log.Info("connection lost, reconnecting", "flow", f.id, "peer", f.dial, "reason", reason,
			"retry_in", backoff.Round(time.Millisecond).String())
		if !sleepCtx(f.ctx, backoff) {
			return
		}
	}
}

// connect dials the peer and sends the prefix.
func (cl *Client) connect(f *flow) (net.Conn, error) {
	nc, err := cl.cfg.dial(f.ctx, f.dial)
	if err != nil {
		return nil, err
	}
	nc.SetWriteDeadline(time.Now().Add(cl.cfg.writeTimeout()))
	if _, err := io.WriteString(nc, framing.Prefix); err != nil {
		nc.Close()
		return nil, fmt.Errorf("sending the IKETCP prefix: %w", err)
	}
	cl.counters.ConnsDialed.Add(1)
	f.mu.Lock()
	f.peer = nc.RemoteAddr().String()
	f.mu.Unlock()
	f.state.Store(stateUp)
	n := f.conns.Add(1)
	level := slog.LevelInfo
	msg := "connected"
	if n > 1 {
		msg = "reconnected"
	}
	cl.log.Log(context.Background(), level, msg, "flow", f.id, "daemon", f.key.daemon.String(), "peer", nc.RemoteAddr().String(),
		"local", nc.LocalAddr().String(), "connections", n)
	return nc, nil
}

// carry moves the flow's traffic over nc both ways until nc fails or the
// flow ends, closes nc, and says why it ended.
func (cl *Client) carry(f *flow, nc net.Conn) string {
	readDone := make(chan string, 1)
	cl.wg.Add(1)
	go func() {
		defer cl.wg.Done()
		readDone <- cl.readPeer(f, nc)
	}()
	reason, readerEnded := cl.writePeer(f, nc, readDone)
	nc.Close()
	if !readerEnded {
		<-readDone
	}
	return reason
}

// writePeer writes batches from the flow's queue to nc until a write
// fails, the reader ends (readerEnded) or the flow ends, and says why.
func (cl *Client) writePeer(f *flow, nc net.Conn, readDone <-chan string) (reason string, readerEnded bool) {
	batch := make([]*datagram, 0, clientBatch)
	vecBack := make([][]byte, 0, clientBatch)
	var vec net.Buffers // reused: WriteTo takes its address
	var msg framing.Message
	var lastOutSPI uint32
	for {
		select {
		case p := <-f.queue:
			batch = append(batch, p)
		case r := <-readDone:
			return r, true
		case <-f.ctx.Done():
			return "flow closed", false
		}
	gather:
		for len(batch) < cap(batch) {
			select {
			case p := <-f.queue:
				batch = append(batch, p)
			default:
				break gather
			}
		}
		vecBack = vecBack[:0]
		var bytes uint64
		for _, p := range batch {
			if msg.Decode(p.buf[p.off:p.off+p.n]) == nil {
				switch {
				case msg.Kind == framing.KindESP && msg.ESP.SPI != lastOutSPI:
					lastOutSPI = msg.ESP.SPI
					f.book.noteESPOut(lastOutSPI)
				case msg.Kind == framing.KindIKE:
					f.book.noteIKE(&msg.IKE)
				}
			}
			vecBack = append(vecBack, p.frame())
			bytes += uint64(p.n)
		}
		vec = vecBack
		nc.SetWriteDeadline(time.Now().Add(cl.cfg.writeTimeout()))
		_, err := vec.WriteTo(nc)
		n := len(batch)
		for i, p := range batch {
			cl.putDatagram(p)
			batch[i] = nil
		}
		batch = batch[:0]
		if err != nil {
			cl.counters.WriteErrors.Add(1)
			return "write: " + err.Error(), false
		}
		f.stats.countOut(&cl.counters, n, bytes)
	}
}

// readPeer relays frames from nc to the daemon until nc fails, and says
// why it stopped. Each burst of frames goes to the daemon in one call of
// the mode's return path.
func (cl *Client) readPeer(f *flow, nc net.Conn) string {
	d := framing.NewDecoder(nc, cl.cfg.connBuffer(), false)
	d.SetHeadroom(packetHeadroom)
	d.LimitPayload(cl.cfg.maxDatagram())
	refs := make([]payloadRef, 0, clientBatch)
	var buf []byte
	var msg framing.Message
	var lastSPI uint32
	for {
		p, err := d.Next()
		if err != nil {
			switch {
			case errors.Is(err, framing.ErrTooLarge):
				cl.counters.OversizedFrames.Add(1)
				cl.logOversize.log(cl.log, slog.LevelWarn, "frame skipped: larger than --max-datagram", "flow", f.id, "err", err)
				continue
			case errors.Is(err, framing.ErrTruncated):
				cl.counters.TruncatedFrames.Add(1)
			case errors.Is(err, framing.ErrBadLength):
				cl.counters.BadLength.Add(1)
			}
			if err == io.EOF {
				return "server closed the connection"
			}
			return err.Error()
		}
		switch err := msg.Decode(p); {
		case err != nil:
			cl.counters.Malformed.Add(1)
			continue
		case msg.Kind == framing.KindKeepalive:
			cl.counters.KeepalivesDropped.Add(1)
			continue
		case msg.Kind == framing.KindESP && msg.ESP.SPI != lastSPI:
			lastSPI = msg.ESP.SPI
			f.book.noteESPIn(lastSPI)
		case msg.Kind == framing.KindIKE:
			f.book.noteIKE(&msg.IKE)
		}
		var off int
		buf, off = d.Offset(p)
		refs = append(refs, payloadRef{off, len(p)})
		if d.Buffered() && len(refs) < cap(refs) {
			continue
		}
		if err := cl.deliver(f, buf, refs); err != nil {
			cl.logDrop.log(cl.log, slog.LevelWarn, "delivery to the IKE daemon failed", "flow", f.id,
				"daemon", f.key.daemon.String(), "err", err)
		}
		f.lastPeer.Store(time.Now().UnixNano())
		refs = refs[:0]
	}
}

// nextBackoff doubles the previous backoff within [lo, hi], with ±20%
// jitter so that many clients do not reconnect in step.
func nextBackoff(prev, lo, hi time.Duration) time.Duration {
	next := min(max(2*prev, lo), hi)
	jitter := time.Duration(rand.Int64N(int64(next)/5+1)) - next/10
	return next + jitter
}

// sleepCtx waits for d or ctx, and reports whether d passed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Status describes the client and its flows, oldest first.
func (cl *Client) Status() *Status {
	cl.mu.Lock()
	st := &Status{
		Role: "client", Mode: cl.mode, Version: cl.cfg.Version, PID: os.Getpid(), Listen: cl.listen,
		Peer: cl.cfg.Peer, Started: cl.started,
	}
	flows := make([]*flow, 0, len(cl.flows))
	for _, f := range cl.flows {
		flows = append(flows, f)
	}
	cl.mu.Unlock()
	sort.Slice(flows, func(i, j int) bool { return flows[i].id < flows[j].id })
	for _, f := range flows {
		local := f.key.daemon.String()
		if cl.mode == modeTransparent {
			local = f.key.daemon.Addr().String() // its ports are in Intercepted
		}
		ss := SessionStatus{
			ID:          f.id,
			Local:       local,
			Intercepted: f.ports.describe(),
			Transport:   "TCP",
			Created:     f.created,
			LastActive:  time.Unix(0, max(f.lastLocal.Load(), f.lastPeer.Load())),
			Connections: f.conns.Load(),
		}
		switch f.state.Load() {
		case stateUp:
			ss.State = "up"
		case stateConnecting:
			ss.State = "connecting"
		default:
			ss.State = "waiting"
		}
		f.mu.Lock()
		ss.Peer = orDefault(f.peer, f.dial)
		f.mu.Unlock()
		f.book.fill(&ss)
		f.stats.fill(&ss)
		st.Sessions = append(st.Sessions, ss)
	}
	st.Counters = cl.counters.Snapshot()
	return st
}
