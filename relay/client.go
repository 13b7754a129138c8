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

// ClientConfig configures a Client. Only Peer is required; zero values
// mean the defaults above.
type ClientConfig struct {
	// Peer is the iketcp server, host:port. It is resolved at each dial.
	Peer   string
	Logger *slog.Logger
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

func (c *ClientConfig) dial(ctx context.Context) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.dialTimeout())
	defer cancel()
	if c.Dial != nil {
		return c.Dial(ctx, "tcp", c.Peer)
	}
	d := net.Dialer{KeepAliveConfig: tcpKeepAlive}
	return d.DialContext(ctx, "tcp", c.Peer)
}

// tcpKeepAlive keeps NAT mappings fresh and finds dead peers on idle
// connections (RFC 9329 6.7: these only refresh middleboxes; IKE's own
// liveness checks stay authoritative).
var tcpKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 4}

// Client relays an IKE daemon's datagrams from a local UDP socket to an
// iketcp server over RFC 9329 TCP, one connection per local flow.
type Client struct {
	cfg      ClientConfig
	log      *slog.Logger
	started  time.Time
	counters Counters
	pool     sync.Pool // of *packet
	udp      *udpbatch.Conn

	nextID atomic.Uint64

	mu     sync.Mutex // guards the following
	listen string
	flows  map[netip.AddrPort]*flow

	wg sync.WaitGroup // every goroutine the client starts

	logDial, logDrop, logOversize sometimes
}

// packet is a pooled datagram buffer: the datagram sits at
// buf[framing.Headroom:][:n], leaving room to write the frame header in
// place.
type packet struct {
	buf []byte
	n   int
}

// frame returns the packet as an RFC 9329 frame, writing its Length.
func (p *packet) frame() []byte {
	framing.PutLength(p.buf[framing.Headroom-framing.LengthSize:], p.n)
	return p.buf[framing.Headroom-framing.LengthSize : framing.Headroom+p.n]
}

// NewClient returns a client for cfg.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Peer == "" {
		return nil, errors.New("relay: client needs a peer (the iketcp server, host:port)")
	}
	if _, _, err := net.SplitHostPort(cfg.Peer); err != nil {
		return nil, fmt.Errorf("relay: peer %q: %w (want host:port, e.g. 203.0.113.2:4500 or [2001:db8::1]:4500)", cfg.Peer, err)
	}
	cl := &Client{cfg: cfg, log: cfg.logger(), started: time.Now(), flows: make(map[netip.AddrPort]*flow)}
	size := framing.Headroom + cfg.maxDatagram()
	cl.pool.New = func() any { return &packet{buf: make([]byte, size)} }
	return cl, nil
}

// Counters returns the client's live counters.
func (cl *Client) Counters() *Counters { return &cl.counters }

func (cl *Client) getPacket() *packet { return cl.pool.Get().(*packet) }

func (cl *Client) putPacket(p *packet) {
	p.n = 0
	cl.pool.Put(p)
}

// Serve reads the daemon's datagrams from pc until ctx is done or pc
// fails, then closes pc and every flow, waits for its goroutines and
// returns. It returns nil when ctx ended it.
func (cl *Client) Serve(ctx context.Context, pc *net.UDPConn) error {
	cl.mu.Lock()
	cl.listen = pc.LocalAddr().String()
	cl.udp = udpbatch.New(pc, udpbatch.Options{BatchSize: clientBatch, Logger: cl.log})
	cl.mu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	cl.wg.Add(2)
	go func() {
		defer cl.wg.Done()
		<-ctx.Done()
		pc.Close()
	}()
	go cl.expireFlows(ctx)
	cl.log.Info("client listening", "listen", pc.LocalAddr().String(), "peer", cl.cfg.Peer)

	err := cl.readLocal(ctx)
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

// readLocal reads batches of datagrams from the daemon and queues each on
// its flow.
func (cl *Client) readLocal(ctx context.Context) error {
	pkts := make([]*packet, clientBatch)
	msgs := make([]udpbatch.Message, clientBatch)
	for i := range pkts {
		pkts[i] = cl.getPacket()
		msgs[i].Buf = pkts[i].buf[framing.Headroom:]
	}
	defer func() {
		for _, p := range pkts {
			cl.putPacket(p)
		}
	}()
	for {
		n, err := cl.udp.ReadBatch(msgs)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			cl.log.Warn("receive from the IKE daemon failed", "err", err)
			time.Sleep(10 * time.Millisecond) // do not spin on a persistent error
			continue
		}
		now := time.Now().UnixNano()
		cl.mu.Lock()
		for i := range msgs[:n] {
			m := &msgs[i]
			if m.Truncated {
				cl.counters.OversizedDgrams.Add(1)
				cl.logOversize.log(cl.log, slog.LevelWarn, "datagram from the daemon dropped: larger than --max-datagram",
					"from", m.Addr.String(), "max", cl.cfg.maxDatagram())
				continue
			}
			keepalive := framing.Classify(m.Buf[:m.N]) == framing.KindKeepalive
			f := cl.flows[m.Addr]
			if keepalive {
				// RFC 9329 6.6: NAT keepalives are not sent over TCP; the
				// connection's own keepalives refresh the path.
				cl.counters.KeepalivesDropped.Add(1)
				if f != nil {
					f.lastLocal.Store(now)
				}
				continue
			}
			if f == nil {
				if f = cl.newFlowLocked(ctx, m.Addr); f == nil {
					continue
				}
			}
			f.lastLocal.Store(now)
			p := pkts[i]
			p.n = m.N
			select {
			case f.queue <- p:
				pkts[i] = cl.getPacket()
				m.Buf = pkts[i].buf[framing.Headroom:]
			default:
				cl.counters.QueueFull.Add(1)
				cl.logDrop.log(cl.log, slog.LevelWarn, "datagram dropped: flow queue full (connection down or too slow)",
					"flow", f.id, "queue", cap(f.queue))
			}
		}
		cl.mu.Unlock()
	}
}

// newFlowLocked starts a flow for a new daemon address, or returns nil
// over the flow limit. cl.mu must be held.
func (cl *Client) newFlowLocked(ctx context.Context, src netip.AddrPort) *flow {
	if len(cl.flows) >= cl.cfg.maxFlows() {
		cl.counters.SessionsRejected.Add(1)
		cl.logDrop.log(cl.log, slog.LevelWarn, "datagram dropped: flow limit reached (raise --max-flows)", "from", src.String())
		return nil
	}
	f := &flow{
		cl:      cl,
		id:      cl.nextID.Add(1),
		src:     src,
		created: time.Now(),
		queue:   make(chan *packet, cl.cfg.queueLen()),
	}
	f.ctx, f.cancel = context.WithCancel(ctx)
	cl.flows[src] = f
	cl.counters.SessionsCreated.Add(1)
	cl.log.Info("flow started", "flow", f.id, "daemon", src.String(), "peer", cl.cfg.Peer)
	if src.Port() == 500 {
		cl.log.Warn("the IKE daemon sends from port 500: configure it with local_port = 4500, so that its datagrams "+
			"carry the non-ESP marker this mode relays as they are", "daemon", src.String())
	}
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
			cl.log.Info("flow closed: the daemon sent nothing", "flow", f.id, "daemon", f.src.String(), "idle", idle.String())
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

// flow is one local daemon address and the connection that carries it.
type flow struct {
	cl      *Client
	id      uint64
	src     netip.AddrPort // the daemon's address; replies go there
	created time.Time
	queue   chan *packet
	ctx     context.Context // ends the flow
	cancel  context.CancelFunc

	lastLocal atomic.Int64 // unix ns of the daemon's last datagram
	lastPeer  atomic.Int64 // unix ns of the last frame from the peer
	state     atomic.Int32
	conns     atomic.Uint64
	stats     flowStats
	book      saBook

	mu   sync.Mutex // guards the following
	peer string     // remote address of the current connection
}

func (f *flow) stop() { f.cancel() }

// drain returns queued packets to the pool as runFlow ends.
func (f *flow) drain() {
	for {
		select {
		case p := <-f.queue:
			f.cl.putPacket(p)
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
				"peer", cl.cfg.Peer, "err", err, "retry_in", backoff.Round(time.Millisecond).String())
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
		cl.log.Info("connection lost, reconnecting", "flow", f.id, "peer", cl.cfg.Peer, "reason", reason,
			"retry_in", backoff.Round(time.Millisecond).String())
		if !sleepCtx(f.ctx, backoff) {
			return
		}
	}
}

// connect dials the peer and sends the prefix.
func (cl *Client) connect(f *flow) (net.Conn, error) {
	nc, err := cl.cfg.dial(f.ctx)
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
	cl.log.Log(context.Background(), level, msg, "flow", f.id, "daemon", f.src.String(), "peer", nc.RemoteAddr().String(),
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
	batch := make([]*packet, 0, clientBatch)
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
			if msg.Decode(p.buf[framing.Headroom:framing.Headroom+p.n]) == nil {
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
			cl.putPacket(p)
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
// why it stopped.
func (cl *Client) readPeer(f *flow, nc net.Conn) string {
	d := framing.NewDecoder(nc, cl.cfg.connBuffer(), false)
	d.LimitPayload(cl.cfg.maxDatagram())
	msgs := make([]udpbatch.Message, 0, clientBatch)
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
		msgs = append(msgs, udpbatch.Message{Buf: p, Addr: f.src})
		if d.Buffered() && len(msgs) < cap(msgs) {
			continue
		}
		var bytes uint64
		for i := range msgs {
			bytes += uint64(len(msgs[i].Buf))
		}
		n, err := writeAll(cl.udp, msgs)
		f.stats.countIn(&cl.counters, n, bytes)
		f.lastPeer.Store(time.Now().UnixNano())
		if err != nil {
			cl.counters.WriteErrors.Add(uint64(len(msgs) - n))
			cl.logDrop.log(cl.log, slog.LevelWarn, "send to the IKE daemon failed", "flow", f.id, "daemon", f.src.String(), "err", err)
		}
		clear(msgs)
		msgs = msgs[:0]
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
		Role: "client", Version: cl.cfg.Version, PID: os.Getpid(), Listen: cl.listen,
		Peer: cl.cfg.Peer, Started: cl.started,
	}
	flows := make([]*flow, 0, len(cl.flows))
	for _, f := range cl.flows {
		flows = append(flows, f)
	}
	cl.mu.Unlock()
	sort.Slice(flows, func(i, j int) bool { return flows[i].id < flows[j].id })
	for _, f := range flows {
		ss := SessionStatus{
			ID:          f.id,
			Local:       f.src.String(),
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
		ss.Peer = orDefault(f.peer, cl.cfg.Peer)
		f.mu.Unlock()
		f.book.fill(&ss)
		f.stats.fill(&ss)
		st.Sessions = append(st.Sessions, ss)
	}
	st.Counters = cl.counters.Snapshot()
	return st
}
