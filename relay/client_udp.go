package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/iketcp/iketcp/relay/udpbatch"
)

// Client modes, as Status reports them.
const (
	modeExplicit    = "explicit"
	modeTransparent = "transparent"
)

// Serve runs explicit mode: the daemon is configured to send to pc (its
// remote address and port are pc's), from port 4500, so that every
// datagram is already in port-4500 form. Serve reads pc until ctx is done
// or pc fails, then closes pc and every flow, waits for its goroutines and
// returns. It returns nil when ctx ended it.
func (cl *Client) Serve(ctx context.Context, pc *net.UDPConn) error {
	if cl.cfg.Peer == "" {
		return errors.New("relay: explicit mode needs a peer (the iketcp server, host:port)")
	}
	if _, _, err := net.SplitHostPort(cl.cfg.Peer); err != nil {
		return fmt.Errorf("relay: peer %q: %w (want host:port, e.g. 203.0.113.2:4500 or [2001:db8::1]:4500)", cl.cfg.Peer, err)
	}
	cl.mu.Lock()
	cl.mode = modeExplicit
	cl.listen = pc.LocalAddr().String()
	cl.udp = udpbatch.New(pc, udpbatch.Options{BatchSize: clientBatch, Logger: cl.log})
	cl.deliver = cl.deliverUDP
	cl.mu.Unlock()
	cl.log.Info("client listening", "mode", modeExplicit, "listen", cl.listen, "peer", cl.cfg.Peer)
	return cl.run(ctx, pc, cl.readLocal)
}

// readLocal reads batches of datagrams from the daemon's socket and hands
// each to its flow.
func (cl *Client) readLocal(ctx context.Context) error {
	dgs := make([]*datagram, clientBatch)
	msgs := make([]udpbatch.Message, clientBatch)
	for i := range dgs {
		dgs[i] = cl.getDatagram()
		msgs[i].Buf = dgs[i].buf[linkHeadroom:]
	}
	defer func() {
		for _, d := range dgs {
			cl.putDatagram(d)
		}
	}()
	for {
		n, err := cl.udp.ReadBatch(msgs)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
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
			if m.Addr.Port() == 500 {
				cl.logDrop.log(cl.log, slog.LevelWarn, "the IKE daemon sends from port 500: configure it with local_port = 4500, "+
					"so that its datagrams carry the non-ESP marker explicit mode relays as they are (or use --tun)", "daemon", m.Addr.String())
			}
			d := dgs[i]
			d.off, d.n = linkHeadroom, m.N
			if _, _, took := cl.takeLocked(ctx, flowKey{daemon: m.Addr}, d, now); took {
				dgs[i] = cl.getDatagram()
				m.Buf = dgs[i].buf[linkHeadroom:]
			}
		}
		cl.flushUDPLocked()
		cl.mu.Unlock()
	}
}

// deliverUDP is explicit mode's return path: the payloads go to the
// daemon's address as they are, in one sendmmsg. scratch is the caller's.
func (cl *Client) deliverUDP(f *flow, ps []payload, scratch *[]udpbatch.Message) error {
	out := (*scratch)[:0]
	var bytes uint64
	for _, p := range ps {
		out = append(out, udpbatch.Message{Buf: p.buf[p.off : p.off+p.n], Addr: f.key.daemon})
		bytes += uint64(p.n)
	}
	n, err := writeAll(cl.udp, out)
	f.stats.countIn(&cl.counters, n, bytes)
	if err != nil {
		cl.counters.WriteErrors.Add(uint64(len(out) - n))
	}
	clear(out)
	*scratch = out[:0]
	return err
}
