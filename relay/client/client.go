// Package client is the client role of iketcp: beside the IKE daemon that
// initiates, it takes the daemon's datagrams, groups them in flows (one
// per daemon and peer), and carries each flow to the peer over the
// transport its fallback machine picks: a link to the iketcp server
// (relay.Dialer: an RFC 9329 stream or fake-TCP), kept up with reconnects
// and backoff so that the daemon's SAs survive a lost connection, and
// watched by an in-band liveness check toward iketcp servers (liveness.go)
// so that a dead one is found in seconds, or a plain UDP socket to the
// peer's NAT-T port.
//
// The client meets the daemon in one of two ways (a daemonSide): explicit
// mode (Serve) listens on a UDP socket the daemon is configured to talk
// to; transparent mode (ServeTUN) reads the daemon's own traffic to its
// peers from a TUN device that intercepts it. Everything past that is
// shared.
//
// The data path, top to bottom: readDaemon (ingress.go) reads a batch
// from the daemon side and hands each datagram to take (take.go), which
// finds its flow and route; a link's datagrams wait in the flow's queue
// for writeLink (linkpath.go), UDP's leave at the end of the batch
// (udppath.go). The way back, the link or the UDP path hands bursts to the
// flow, which delivers them through the daemon side.
//
// With Config.Members, each IKE SA's path is an aggregate (members.go):
// several member links, each dialled its own way, that join the server's
// session with the path's ticket, probe it, and carry the daemon's
// datagrams as the aggregate's algorithm spreads them (package
// relay/aggregate); what they bring back passes the path's reorder buffer
// (package relay/reorder) on its way to the daemon.
package client

import (
	"context"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/nat/packet"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// clientBatch is how many datagrams the client reads or writes at once.
const clientBatch = 64

// Modes, as Status reports them.
const (
	modeExplicit    = "explicit"
	modeTransparent = "transparent"
)

// Client relays an IKE daemon's datagrams to an iketcp server, one flow
// per daemon and peer.
type Client struct {
	cfg      Config
	log      *slog.Logger
	started  time.Time
	counters *relay.Counters
	dialer   relay.Dialer
	pool     sync.Pool // of *datagram

	nextID atomic.Uint64

	// Set once by Serve or ServeTUN before any flow starts.
	mode string
	side daemonSide

	mu        sync.Mutex // guards the following
	listen    string
	flows     map[flowKey]*flow
	msg       framing.Message // takeLocked's scratch
	udpSends  []*flow         // flows with datagrams waiting in udpOut for flushUDPLocked
	linkSends []*linkPath     // paths with datagrams waiting in out for flushLinksLocked
	draining  bool            // Drain has begun: no new flow

	wg sync.WaitGroup // every goroutine the client starts

	logDial, logDrop, logOversize relay.Sometimes
}

// flowKey identifies a flow. In explicit mode it is the daemon's UDP
// address. In transparent mode it is the daemon's and its peer's IP
// addresses, without ports, so that a daemon that floats from port 500 to
// 4500 stays on the same link.
type flowKey struct {
	daemon netip.AddrPort
	peer   netip.Addr
}

// datagram is a pooled buffer holding one datagram in port-4500 form at
// buf[off:off+n], with at least relay.Headroom bytes in front of it for a
// link's headers, written in place.
type datagram struct {
	buf    []byte
	off, n int
}

// bytes returns the datagram.
func (d *datagram) bytes() []byte { return d.buf[d.off : d.off+d.n] }

// withHeadroom returns the datagram with relay.Headroom bytes in front:
// what a link sends.
func (d *datagram) withHeadroom() []byte { return d.buf[d.off-relay.Headroom : d.off+d.n] }

// New returns a client for cfg.
func New(cfg Config) (*Client, error) {
	if err := cfg.checkAggregate(); err != nil {
		return nil, err
	}
	cl := &Client{cfg: cfg, log: cfg.logger(), started: time.Now(), flows: make(map[flowKey]*flow)}
	cl.counters = cfg.Counters
	if cl.counters == nil {
		cl.counters = new(relay.Counters)
	}
	cl.dialer = cfg.Dialer
	if cl.dialer == nil {
		cl.dialer = streamlink.NewDialer(streamlink.Config{MaxDatagram: cfg.MaxDatagram, Counters: cl.counters, Logger: cl.log})
	}
	// Room for a link's headers, then the largest datagram, behind a TUN
	// packet's IP and UDP headers in transparent mode.
	size := relay.Headroom + packet.MaxHeader + cfg.maxDatagram()
	cl.pool.New = func() any { return &datagram{buf: make([]byte, size)} }
	return cl, nil
}

// Counters returns the client's live counters.
func (cl *Client) Counters() *relay.Counters { return cl.counters }

func (cl *Client) getDatagram() *datagram { return cl.pool.Get().(*datagram) }

func (cl *Client) putDatagram(d *datagram) {
	d.off, d.n = 0, 0
	cl.pool.Put(d)
}

// run drives the client: readDaemon reads the daemon's packets until ctx
// ends or the daemon side fails; closing the side unblocks it at the end.
// Then every flow stops and run waits for the client's goroutines.
func (cl *Client) run(ctx context.Context, side io.Closer) error {
	ctx, cancel := context.WithCancel(ctx)
	relay.CloseWhenDone(ctx, &cl.wg, side)
	cl.wg.Add(1)
	go cl.expireFlows(ctx)

	err := cl.readDaemon(ctx)
	if ctx.Err() != nil {
		err = nil
	}
	cancel()
	cl.mu.Lock()
	flows := slices.Collect(maps.Values(cl.flows))
	cl.mu.Unlock()
	for _, f := range flows {
		f.stop()
	}
	cl.wg.Wait()
	return err
}

// expireFlows closes flows whose daemon has gone quiet.
func (cl *Client) expireFlows(ctx context.Context) {
	defer cl.wg.Done()
	idle := cl.cfg.flowIdle()
	relay.SweepEvery(ctx, idle, 10*time.Second, func(now time.Time) {
		var expired []*flow
		cl.mu.Lock()
		for key, f := range cl.flows {
			if now.Sub(time.Unix(0, f.lastLocal.Load())) > idle {
				cl.counters.FlowsExpired.Add(1) // before it leaves Status
				delete(cl.flows, key)
				expired = append(expired, f)
			}
		}
		cl.mu.Unlock()
		for _, f := range expired {
			cl.log.Info("flow closed: the daemon sent nothing", "flow", f.id, "daemon", f.key.daemon.String(), "idle", idle.String())
			f.stop()
		}
		cl.mu.Lock()
		for _, f := range cl.flows {
			f.links.prune(now, idle)
		}
		cl.mu.Unlock()
	})
}

// Status describes the client and its flows, oldest first.
func (cl *Client) Status() *relay.Status {
	cl.mu.Lock()
	st := &relay.Status{
		Role: relay.RoleClient, Mode: cl.mode, Version: cl.cfg.Version, PID: os.Getpid(), Listen: cl.listen,
		Peer: cl.cfg.Peer, Started: cl.started,
	}
	flows := slices.Collect(maps.Values(cl.flows))
	cl.mu.Unlock()
	sort.Slice(flows, func(i, j int) bool { return flows[i].id < flows[j].id })
	now := time.Now()
	for _, f := range flows {
		st.Sessions = append(st.Sessions, f.status(cl.mode))
		st.Aggregates = append(st.Aggregates, f.links.aggregateStatus(now)...)
	}
	st.Counters = cl.counters.Snapshot(relay.RoleClient)
	return st
}

// describeRoute is how Status names a route: "TCP", "UDP", "UDP+TCP".
func describeRoute(r fallback.Transport) string { return strings.ToUpper(r.String()) }

// Drain begins a graceful stop: no new flow is taken (the daemon's
// datagrams from a new address are dropped, flows_rejected), and the
// links let out what they have queued; Drain returns once they have, or
// ctx ends. Running flows go on until Serve's context ends.
func (cl *Client) Drain(ctx context.Context) {
	var paths []*linkPath
	cl.mu.Lock()
	cl.draining = true
	for _, f := range cl.flows {
		f.links.mu.Lock()
		paths = append(paths, f.links.paths...)
		f.links.mu.Unlock()
	}
	cl.mu.Unlock()
	var links []relay.Link
	for _, p := range paths {
		p.mu.Lock()
		if p.link != nil {
			links = append(links, p.link)
		}
		p.mu.Unlock()
	}
	relay.DrainLinks(ctx, links)
}
