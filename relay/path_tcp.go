package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

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
	ps := make([]payload, 0, clientBatch)
	var scratch []udpbatch.Message
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
			f.inbound(time.Now(), fallback.TCP, &msg)
			f.book.noteIKE(&msg.IKE)
		}
		buf, off := d.Offset(p)
		ps = append(ps, payload{buf, off, len(p)})
		if d.Buffered() && len(ps) < cap(ps) {
			continue
		}
		if err := cl.deliver(f, ps, &scratch); err != nil {
			cl.logDrop.log(cl.log, slog.LevelWarn, "delivery to the IKE daemon failed", "flow", f.id,
				"daemon", f.key.daemon.String(), "err", err)
		}
		f.lastPeer.Store(time.Now().UnixNano())
		clear(ps)
		ps = ps[:0]
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
