package relay

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/nat/packet"
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
	// Transport is how flows reach the peer: ModeTCP (the default, RFC
	// 9329 to the iketcp server), ModeUDP (datagrams to the peer's UDPPort:
	// a plain NAT-T relay), or ModeFallback (UDP first, TCP when UDP stays
	// unanswered for FallbackThreshold; with Race, TCP alongside UDP after
	// the first unanswered retransmission).
	Transport         fallback.Mode
	FallbackThreshold time.Duration
	Race              bool
	// UDPPort is the peer's UDP NAT-T port for the UDP transport (default
	// 4500): the IKE daemon's own, not iketcp's.
	UDPPort uint16
	// Control, if set, is applied to every socket the client opens toward
	// a peer (transparent mode marks them to bypass its interception).
	Control func(network, address string, c syscall.RawConn) error
	// FakeTCP, if set, carries the TCP transport in fake-TCP segments
	// through this stack instead of an RFC 9329 stream; the peer must be
	// an iketcp server in fake-TCP mode.
	FakeTCP *faketcp.Stack
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
func (c *ClientConfig) udpPort() uint16 { return orDefault(c.UDPPort, 4500) }

func (c *ClientConfig) dial(ctx context.Context, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.dialTimeout())
	defer cancel()
	if c.Dial != nil {
		return c.Dial(ctx, "tcp", addr)
	}
	d := net.Dialer{KeepAliveConfig: TCPKeepAlive, Control: c.Control}
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
	mode    string                                                         // modeExplicit or modeTransparent
	deliver func(f *flow, ps []payload, scratch *[]udpbatch.Message) error // the return path to the daemon
	udp     *udpbatch.Conn                                                 // explicit mode's socket
	dev     PacketDevice                                                   // transparent mode's device

	mu       sync.Mutex // guards the following
	listen   string
	flows    map[flowKey]*flow
	msg      framing.Message // takeLocked's scratch
	udpSends []*flow         // flows with datagrams waiting in udpOut for flushUDPLocked

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
// buf[off:off+n], with at least linkHeadroom bytes in front of it for the
// link's headers, written in place.
type datagram struct {
	buf    []byte
	off, n int
}

// frame returns the datagram as an RFC 9329 frame, writing its Length.
func (p *datagram) frame() []byte {
	framing.PutLength(p.buf[p.off-framing.LengthSize:], p.n)
	return p.buf[p.off-framing.LengthSize : p.off+p.n]
}

// payload is a datagram for the daemon at buf[off:off+n], in port-4500
// form, with buf[:off] free for the headers a return path writes in place.
type payload struct {
	buf    []byte
	off, n int
}

// NewClient returns a client for cfg.
func NewClient(cfg ClientConfig) (*Client, error) {
	cl := &Client{cfg: cfg, log: cfg.logger(), started: time.Now(), flows: make(map[flowKey]*flow)}
	// Room for a link's headers, then the largest datagram, behind a TUN
	// packet's IP and UDP headers in transparent mode.
	size := linkHeadroom + packet.MaxHeader + cfg.maxDatagram()
	cl.pool.New = func() any { return &datagram{buf: make([]byte, size)} }
	return cl, nil
}

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
	closeWhenDone(ctx, &cl.wg, closer)
	cl.wg.Add(1)
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

// takeLocked routes a datagram of the daemon's, in port-4500 form in d,
// for the flow of key, starting the flow if needed. The flow's transport
// machine says where it goes. UDP sends wait in the flow's udpOut until
// flushUDPLocked, at the end of the caller's batch, so d stays the
// caller's until then. TCP takes d. It reports the flow, the datagram's
// kind and whether d was taken.
//
// A datagram that is not a well-formed IKE message, ESP packet or
// keepalive is counted and dropped here, so it never starts a flow or a
// connection. NAT keepalives go out on UDP, whose path they keep open, and
// never on TCP (RFC 9329 6.6: the connection's own keepalives refresh
// that path). cl.mu must be held.
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
		if f != nil {
			f.lastLocal.Store(now)
			if route, _ := f.current(); route&fallback.UDP != 0 {
				cl.queueUDPLocked(f, d)
				return f, kind, false
			}
		}
		cl.counters.KeepalivesDropped.Add(1)
		return f, kind, false
	}
	if f == nil {
		if f = cl.newFlowLocked(ctx, key); f == nil {
			return nil, kind, false
		}
	}
	f.lastLocal.Store(now)
	route := f.outbound(time.Unix(0, now), &cl.msg)
	if route&fallback.UDP != 0 {
		if route&fallback.TCP != 0 {
			// Racing: this datagram also goes to TCP, which takes the
			// buffer, so it leaves on UDP now rather than at the flush.
			cl.sendUDPNow(f, d)
		} else {
			cl.queueUDPLocked(f, d)
		}
	}
	if route&fallback.TCP == 0 {
		return f, kind, false
	}
	if !f.tcpStarted {
		f.tcpStarted = true
		cl.wg.Add(1)
		go cl.runFlow(f)
	}
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
		cl:        cl,
		id:        cl.nextID.Add(1),
		key:       key,
		dial:      dial,
		udpTarget: cl.udpTarget(key),
		created:   time.Now(),
		queue:     make(chan *datagram, cl.cfg.queueLen()),
		transport: fallback.New(fallback.Config{Mode: cl.cfg.Transport, Threshold: cl.cfg.FallbackThreshold, Race: cl.cfg.Race}),
	}
	switch cl.cfg.Transport {
	case fallback.ModeTCP:
		f.fixed = fallback.TCP
	case fallback.ModeUDP:
		f.fixed = fallback.UDP
	}
	f.ctx, f.cancel = context.WithCancel(ctx)
	cl.flows[key] = f
	cl.counters.SessionsCreated.Add(1)
	cl.log.Info("flow started", "flow", f.id, "mode", cl.mode, "transport", cl.cfg.Transport.String(),
		"daemon", key.daemon.String(), "peer", dial)
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

// flow is one daemon (toward one peer, in transparent mode) and the paths
// that carry it: an RFC 9329 connection, a UDP socket, or both, as its
// transport machine decides.
type flow struct {
	cl        *Client
	id        uint64
	key       flowKey
	dial      string // the iketcp server, host:port
	udpTarget string // the peer's UDP NAT-T address, host:port
	created   time.Time
	queue     chan *datagram
	ctx       context.Context // ends the flow
	cancel    context.CancelFunc

	lastLocal atomic.Int64 // unix ns of the daemon's last datagram
	lastPeer  atomic.Int64 // unix ns of the last frame from the peer
	state     atomic.Int32
	conns     atomic.Uint64
	stats     flowStats
	book      saBook
	ports     daemonPorts // transparent mode: where replies go

	// fixed is the route of a fixed transport (tcp, udp); zero when the
	// machine decides (auto).
	fixed fallback.Route
	// tmu guards transport, which the ingress and both paths' readers use.
	tmu       sync.Mutex
	transport *fallback.Machine

	// Guarded by cl.mu.
	tcpStarted bool               // runFlow is running
	udpOut     []udpbatch.Message // UDP sends waiting for flushUDPLocked

	udp atomic.Pointer[udpPath] // opened on the first UDP send

	mu   sync.Mutex // guards the following
	peer string     // remote address of the current connection
}

// stop ends the flow: its TCP path, and its UDP path, whose socket it
// closes.
func (f *flow) stop() {
	f.cancel()
	if u := f.udp.Load(); u != nil {
		u.bc.Close()
	}
}

// outbound asks the transport machine where a datagram of the daemon's
// goes, and logs any change of transport. A fixed transport (tcp, udp)
// never changes: it is answered without the lock.
func (f *flow) outbound(now time.Time, msg *framing.Message) fallback.Route {
	if f.fixed != 0 {
		return f.fixed
	}
	f.tmu.Lock()
	route, ch := f.transport.Outbound(now, msg)
	f.tmu.Unlock()
	f.logChange(ch)
	return route
}

// inbound tells the transport machine what the peer sent over via.
func (f *flow) inbound(now time.Time, via fallback.Transport, msg *framing.Message) {
	if msg.Kind != framing.KindIKE {
		return // only IKE answers a probe; spare the lock
	}
	f.tmu.Lock()
	ch := f.transport.Inbound(now, via, msg)
	f.tmu.Unlock()
	f.logChange(ch)
}

// current returns where the flow's datagrams go now and why.
func (f *flow) current() (fallback.Route, string) {
	f.tmu.Lock()
	defer f.tmu.Unlock()
	return f.transport.Current()
}

// logChange logs a change of transport: one line a user can read, such as
// "transport udp->tcp for 203.0.113.2: no answer to IKE_SA_INIT in 15s".
func (f *flow) logChange(ch *fallback.Change) {
	if ch == nil {
		return
	}
	peer := f.key.peer.String()
	if !f.key.peer.IsValid() {
		peer, _, _ = net.SplitHostPort(f.udpTarget)
	}
	f.cl.log.Info(fmt.Sprintf("transport %v->%v for %s: %s", ch.From, ch.To, peer, ch.Reason), "flow", f.id)
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
		route, why := f.current()
		ss := SessionStatus{
			ID:              f.id,
			Local:           local,
			Intercepted:     f.ports.describe(),
			Transport:       strings.ToUpper(route.String()),
			TransportReason: why,
			Created:         f.created,
			LastActive:      time.Unix(0, max(f.lastLocal.Load(), f.lastPeer.Load())),
			Connections:     f.conns.Load(),
		}
		switch {
		case route&fallback.TCP == 0:
			ss.State, ss.Peer = "up", f.udpTarget // UDP has no connection to lose
		case f.state.Load() == stateUp:
			ss.State = "up"
		case f.state.Load() == stateConnecting:
			ss.State = "connecting"
		default:
			ss.State = "waiting"
		}
		if ss.Peer == "" {
			f.mu.Lock()
			ss.Peer = orDefault(f.peer, f.dial)
			f.mu.Unlock()
		}
		f.book.fill(&ss)
		f.stats.fill(&ss)
		st.Sessions = append(st.Sessions, ss)
	}
	st.Counters = cl.counters.Snapshot()
	return st
}
