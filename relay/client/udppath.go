package client

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strconv"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// udpPath is a flow's UDP transport: one socket connected to the peer's
// NAT-T port, so the client is a plain NAT-T relay for the flow. Its
// source port is the flow's for the flow's life, so the peer sees one
// NAT mapping.
type udpPath struct {
	bc *udpbatch.Conn
}

// udpTarget is the peer's UDP NAT-T address for a flow: the iketcp
// server's host in explicit mode, the intercepted peer in transparent
// mode, at UDPPort.
func (cl *Client) udpTarget(key flowKey) string {
	port := strconv.Itoa(int(cl.cfg.udpPort()))
	if key.peer.IsValid() {
		return net.JoinHostPort(key.peer.String(), port)
	}
	host, _, _ := net.SplitHostPort(cl.cfg.Peer)
	return net.JoinHostPort(host, port)
}

// udpLocked returns the flow's UDP path, opening it (and starting its
// reader) on first use, or nil if it cannot be opened. cl.mu must be held.
func (cl *Client) udpLocked(f *flow) *udpPath {
	if u := f.udp.Load(); u != nil {
		return u
	}
	if f.ctx.Err() != nil {
		return nil
	}
	d := net.Dialer{Control: cl.cfg.Control}
	ctx, cancel := context.WithTimeout(f.ctx, cl.cfg.dialTimeout())
	defer cancel()
	c, err := d.DialContext(ctx, "udp", f.udpTarget)
	if err != nil {
		cl.counters.DialFailures.Add(1)
		cl.logDial.Log(cl.log, slog.LevelWarn, "cannot open the UDP path", "flow", f.id, "peer", f.udpTarget, "err", err)
		return nil
	}
	uc := c.(*net.UDPConn)
	relay.SizeSocketBuffers(uc)
	u := &udpPath{bc: udpbatch.New(uc, udpbatch.Options{BatchSize: clientBatch, Logger: cl.log})}
	f.udp.Store(u)
	cl.log.Info("UDP path open", "flow", f.id, "local", uc.LocalAddr().String(), "peer", f.udpTarget)
	cl.wg.Add(1)
	go f.readUDP(u)
	return u
}

// queueUDPLocked puts d's datagram in the flow's pending UDP sends, which
// flushUDPLocked sends at the end of the caller's batch. cl.mu must be
// held.
func (cl *Client) queueUDPLocked(f *flow, d *datagram) {
	if cl.udpLocked(f) == nil {
		cl.counters.WriteErrors.Add(1)
		return
	}
	if len(f.udpOut) == 0 {
		cl.udpSends = append(cl.udpSends, f)
	}
	f.udpOut = append(f.udpOut, udpbatch.Message{Buf: d.bytes()})
}

// flushUDPLocked sends every flow's pending UDP datagrams, one sendmmsg
// per flow, before the caller reuses their buffers. cl.mu must be held.
func (cl *Client) flushUDPLocked() {
	for i, f := range cl.udpSends {
		if u := f.udp.Load(); u != nil {
			n, err := relay.WriteUDP(u.bc, f.udpOut)
			cl.countUDPSent(f, f.udpOut[:n], err)
		}
		clear(f.udpOut)
		f.udpOut = f.udpOut[:0]
		cl.udpSends[i] = nil
	}
	cl.udpSends = cl.udpSends[:0]
}

func (cl *Client) countUDPSent(f *flow, sent []udpbatch.Message, err error) {
	var bytes uint64
	var k relay.Kinds
	for i := range sent {
		bytes += uint64(len(sent[i].Buf))
		k.Note(sent[i].Buf)
	}
	f.traffic.CountOut(cl.counters, len(sent), bytes, k)
	if err != nil && !errors.Is(err, net.ErrClosed) {
		cl.counters.WriteErrors.Add(1)
		cl.logDrop.Log(cl.log, slog.LevelWarn, "send on the UDP path failed", "flow", f.id, "peer", f.udpTarget, "err", err)
	}
}

// readUDP relays what the peer sends on the flow's UDP path to the daemon
// and tells the transport machine, until the path is closed.
func (f *flow) readUDP(u *udpPath) {
	cl := f.cl
	defer cl.wg.Done()
	bufs := make([][]byte, clientBatch)
	msgs := make([]udpbatch.Message, clientBatch)
	for i := range bufs {
		bufs[i] = make([]byte, relay.Headroom+cl.cfg.maxDatagram())
		msgs[i].Buf = bufs[i][relay.Headroom:]
	}
	burst := make([]relay.Datagram, 0, clientBatch)
	r := newPeerReader(f, fallback.UDP, nil)
	for {
		// A connected UDP socket reports an ICMP unreachable from the
		// peer as an error: nothing listens on its NAT-T port, or a
		// middlebox refuses. The fallback machine sees the silence.
		n, err := relay.ReadUDP(u.bc, msgs, cl.counters, func(err error) {
			cl.logDial.Log(cl.log, slog.LevelWarn, "UDP path: receive failed", "flow", f.id, "peer", f.udpTarget, "err", err)
		})
		if err != nil {
			return
		}
		for i := range msgs[:n] {
			if m := &msgs[i]; !m.Truncated {
				burst = append(burst, relay.Datagram{Buf: bufs[i], Off: relay.Headroom, N: m.N})
			}
		}
		r.Receive(burst)
		clear(burst)
		burst = burst[:0]
	}
}
