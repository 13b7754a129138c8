package client

import (
	"context"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/framing"
)

// takeLocked routes one of the daemon's datagrams, in port-4500 form in
// a.d, to its flow, starting the flow if needed; the flow's transport
// machine says where it goes. Sends wait, on UDP in the flow's udpOut,
// on a link in its path's out, until flushLocked at the end of the
// caller's batch: a.d stays the caller's, to reuse after that. cl.mu must
// be held.
func (cl *Client) takeLocked(ctx context.Context, a *arrival, now int64) {
	kind, ok := cl.decodeLocked(a)
	if !ok {
		return
	}
	f := cl.flows[a.key]
	if kind == framing.KindKeepalive {
		cl.keepaliveLocked(f, a.d, now)
		return
	}
	if f == nil {
		if f = cl.newFlowLocked(ctx, a.key); f == nil {
			return
		}
	}
	f.lastLocal.Store(now)
	if a.intercepted {
		f.ports.note(kind, a.rawESP, a.srcPort, a.dstPort)
	}
	cl.sendLocked(f, a.d, now)
}

// decodeLocked parses a's datagram into cl.msg. A datagram that is not a
// well-formed IKE message, ESP packet or keepalive is counted and
// dropped here, so it never starts a flow or a connection.
func (cl *Client) decodeLocked(a *arrival) (framing.Kind, bool) {
	if err := cl.msg.Decode(a.d.bytes()); err != nil {
		cl.counters.Malformed.Add(1)
		cl.logDrop.Log(cl.log, slog.LevelWarn, "datagram from the daemon dropped: not IKE, ESP or a keepalive",
			"from", a.key.daemon.String(), "len", a.d.n, "err", err)
		return framing.KindInvalid, false
	}
	return cl.msg.Kind, true
}

// keepaliveLocked handles a NAT keepalive of the daemon's: it keeps a
// flow alive, goes out on UDP, whose path it keeps open, and never on a
// link (RFC 9329 6.6: the link's own keepalives refresh that path).
func (cl *Client) keepaliveLocked(f *flow, d *datagram, now int64) {
	if f != nil {
		f.lastLocal.Store(now)
		if route, _ := f.current(); route&fallback.UDP != 0 {
			cl.queueUDPLocked(f, d)
			return
		}
	}
	cl.counters.KeepalivesDropped.Add(1)
}

// sendLocked sends d the way the flow's transport machine says: on UDP,
// on the flow's link, or both while racing.
func (cl *Client) sendLocked(f *flow, d *datagram, now int64) {
	route := f.outbound(time.Unix(0, now), &cl.msg)
	if route&fallback.UDP != 0 {
		cl.queueUDPLocked(f, d)
	}
	if route&fallback.TCP != 0 {
		f.links.forDaemon(f, &cl.msg, now).queueLocked(d)
	}
}

// flushLocked sends what the caller's batch queued, on UDP and on links.
// cl.mu must be held.
func (cl *Client) flushLocked() {
	cl.flushUDPLocked()
	cl.flushLinksLocked()
}

// newFlowLocked starts a flow for a new key, or returns nil over the flow
// limit. cl.mu must be held.
func (cl *Client) newFlowLocked(ctx context.Context, key flowKey) *flow {
	if cl.draining {
		cl.counters.FlowsRejected.Add(1)
		cl.logDrop.Log(cl.log, slog.LevelInfo, "datagram dropped: the client is stopping and takes no new flow", "from", key.daemon.String())
		return nil
	}
	if len(cl.flows) >= cl.cfg.maxFlows() {
		cl.counters.FlowsRejected.Add(1)
		cl.logDrop.Log(cl.log, slog.LevelWarn, "datagram dropped: flow limit reached (raise --max-flows)", "from", key.daemon.String())
		return nil
	}
	dial := cl.cfg.Peer
	if cl.mode == modeTransparent {
		dial = net.JoinHostPort(key.peer.String(), strconv.Itoa(int(cl.cfg.tcpPort())))
	}
	f := newFlow(ctx, cl, key, dial)
	cl.flows[key] = f
	cl.counters.FlowsCreated.Add(1)
	cl.log.Info("flow started", "flow", f.id, "mode", cl.mode, "transport", cl.cfg.Transport.String(),
		"daemon", key.daemon.String(), "peer", dial)
	return f
}
