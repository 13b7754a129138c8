package client

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// flow is one daemon (toward one peer, in transparent mode) and the paths
// that carry it: links to the iketcp server, one per IKE SA (linkpath.go),
// a UDP socket to the peer, or both, as its transport machine decides.
type flow struct {
	cl        *Client
	id        uint64
	key       flowKey
	dial      string // the iketcp server, host:port
	udpTarget string // the peer's UDP NAT-T address, host:port
	created   time.Time
	ctx       context.Context // ends the flow
	cancel    context.CancelFunc

	lastLocal atomic.Int64 // unix ns of the daemon's last datagram
	lastPeer  atomic.Int64 // unix ns of the last datagram from the far end
	traffic   relay.Traffic
	book      relay.SABook
	ports     daemonPorts // transparent mode: where replies go

	// fixed is the transport of a fixed mode (tcp, udp); zero when the
	// machine decides (auto).
	fixed fallback.Transport
	// tmu guards transport, which the ingress and both paths' readers use.
	tmu       sync.Mutex
	transport *fallback.Machine

	// Guarded by Client.mu.
	udpOut []udpbatch.Message // UDP sends waiting for flushUDPLocked

	udp atomic.Pointer[udpPath] // opened on the first UDP send

	links linkPaths // the link paths and how datagrams find them
}

func newFlow(ctx context.Context, cl *Client, key flowKey, dial string) *flow {
	f := &flow{
		cl:        cl,
		id:        cl.nextID.Add(1),
		key:       key,
		dial:      dial,
		udpTarget: cl.udpTarget(key),
		created:   time.Now(),
		transport: fallback.New(fallback.Config{Mode: cl.cfg.Transport, Threshold: cl.cfg.FallbackThreshold, Race: cl.cfg.Race}),
	}
	switch cl.cfg.Transport {
	case fallback.ModeTCP:
		f.fixed = fallback.TCP
	case fallback.ModeUDP:
		f.fixed = fallback.UDP
	}
	f.ctx, f.cancel = context.WithCancel(ctx)
	f.links.init()
	return f
}

// stop ends the flow: its links, and its UDP path, whose socket it closes.
func (f *flow) stop() {
	f.cancel()
	if u := f.udp.Load(); u != nil {
		u.bc.Close()
	}
}

// outbound asks the transport machine where a datagram of the daemon's
// goes, and logs any change of transport. A fixed transport (tcp, udp)
// never changes: it is answered without the lock.
func (f *flow) outbound(now time.Time, msg *framing.Message) fallback.Transport {
	if f.fixed != 0 {
		return f.fixed
	}
	f.tmu.Lock()
	route, ch := f.transport.Outbound(now, msg)
	f.tmu.Unlock()
	f.logChange(ch)
	return route
}

// inbound tells the transport machine about an IKE message from the peer
// that arrived over via.
func (f *flow) inbound(now time.Time, via fallback.Transport, msg *framing.Message) {
	if f.fixed != 0 {
		return // only IKE answers a probe; spare the lock
	}
	f.tmu.Lock()
	ch := f.transport.Inbound(now, via, msg)
	f.tmu.Unlock()
	f.logChange(ch)
}

// current returns where the flow's datagrams go now and why.
func (f *flow) current() (fallback.Transport, string) {
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
	if ch.From&fallback.UDP != 0 && ch.To == fallback.TCP {
		f.cl.counters.Fallbacks.Add(1)
	}
	peer := f.key.peer.String()
	if !f.key.peer.IsValid() {
		peer, _, _ = net.SplitHostPort(f.udpTarget)
	}
	f.cl.log.Info(fmt.Sprintf("transport %v->%v for %s: %s", ch.From, ch.To, peer, ch.Reason), "flow", f.id)
}

// peerReader is the state of one reader of the far end's datagrams (the
// link's, or the UDP path's): its scratch, and the burst it delivers.
type peerReader struct {
	f       *flow
	via     fallback.Transport
	link    *linkReader // the link's, when via is TCP
	msg     framing.Message
	lastSPI uint32
	keep    []relay.Datagram
	scratch []udpbatch.Message
}

func newPeerReader(f *flow, via fallback.Transport, link *linkReader) *peerReader {
	return &peerReader{f: f, via: via, link: link, keep: make([]relay.Datagram, 0, clientBatch)}
}

// Receive delivers a burst from the far end to the daemon, after the
// bookkeeping: IKE answers go to the transport machine, SAs to Status.
// Malformed datagrams are dropped, and so are keepalives that came over
// a link (RFC 9329 6.6).
func (r *peerReader) Receive(burst []relay.Datagram) error {
	now := time.Now()
	if r.link != nil {
		r.link.heard.Store(now.UnixNano())
	}
	for _, d := range burst {
		if r.accept(now, d.Bytes()) {
			r.keep = append(r.keep, d)
		}
	}
	if len(r.keep) > 0 {
		if r.link != nil && r.link.member != nil {
			var n uint64
			for _, d := range r.keep {
				n += uint64(d.N)
			}
			r.link.member.stats.CountIn(len(r.keep), n)
			r.link.path.reorder.Receive(int(r.link.member.index), r.keep, now.UnixNano())
		} else {
			r.f.deliver(r.keep, &r.scratch)
		}
	}
	clear(r.keep)
	r.keep = r.keep[:0]
	return nil
}

// accept does the bookkeeping for one datagram and reports whether it
// goes on to the daemon.
func (r *peerReader) accept(now time.Time, dg []byte) bool {
	f := r.f
	if r.msg.Decode(dg) != nil {
		f.cl.counters.Malformed.Add(1)
		return false
	}
	switch r.msg.Kind {
	case framing.KindKeepalive:
		if r.via == fallback.TCP {
			f.cl.counters.KeepalivesDropped.Add(1)
			return false
		}
	case framing.KindESP:
		if r.msg.ESP.SPI != r.lastSPI {
			r.lastSPI = r.msg.ESP.SPI
			f.book.NoteESPIn(r.lastSPI)
			if r.link != nil {
				if spi, from := f.links.fromPeerESP(r.link.path, r.lastSPI, now); from != nil {
					r.link.move(spi, from)
				}
			}
		}
	case framing.KindIKE:
		f.inbound(now, r.via, &r.msg)
		f.book.NoteIKE(&r.msg.IKE)
		if r.link != nil {
			f.links.fromPeer(r.link.path, &r.msg.IKE, now)
		}
	case framing.KindControl:
		if r.link != nil {
			r.link.control(&r.msg.Control)
		}
		return false
	}
	return true
}

// deliver hands a burst of the far end's datagrams to the daemon.
func (f *flow) deliver(burst []relay.Datagram, scratch *[]udpbatch.Message) {
	if err := f.cl.side.deliver(f, burst, scratch); err != nil {
		f.cl.logDrop.Log(f.cl.log, slog.LevelWarn, "delivery to the IKE daemon failed", "flow", f.id,
			"daemon", f.key.daemon.String(), "err", err)
	}
	f.lastPeer.Store(time.Now().UnixNano())
}

// status describes the flow; mode is the client's.
func (f *flow) status(mode string) relay.SessionStatus {
	local := f.key.daemon.String()
	if mode == modeTransparent {
		local = f.key.daemon.Addr().String() // its ports are in Intercepted
	}
	route, why := f.current()
	ss := relay.SessionStatus{
		ID:              f.id,
		Local:           local,
		Intercepted:     f.ports.describe(),
		Transport:       describeRoute(route),
		TransportReason: why,
		Created:         f.created,
		LastActive:      time.Unix(0, max(f.lastLocal.Load(), f.lastPeer.Load())),
		Links:           f.links.status(),
		State:           "waiting",
		Peer:            f.dial,
	}
	for _, l := range ss.Links {
		ss.Connections += l.Connections
		switch {
		case l.State == "up":
			ss.State, ss.Peer = "up", l.Peer
		case l.State == "connecting" && ss.State != "up":
			ss.State = "connecting"
		}
	}
	if route&fallback.TCP == 0 {
		ss.State, ss.Peer = "up", f.udpTarget // UDP has no connection to lose
	}
	f.book.Fill(&ss)
	f.traffic.Fill(&ss)
	return ss
}
