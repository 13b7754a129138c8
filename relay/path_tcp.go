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
		link, err := cl.connect(f)
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
		reason := cl.carry(f, link)
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

// clientLink is a flow's connection to the peer: an RFC 9329 stream to
// the iketcp server, or a fake-TCP flow.
type clientLink interface {
	// send sends a batch of the daemon's datagrams, each with at least
	// linkHeadroom free bytes in front of it (d.buf[:d.off]).
	send(batch []*datagram) error
	// serve hands what the peer sends to the daemon until the link ends,
	// and says why it ended.
	serve(f *flow) string
	// close ends the link; serve returns.
	close()
	remoteAddr() string
	localAddr() string
}

// connect opens a link to the peer for the flow: fake-TCP if the client
// has a stack for it, an RFC 9329 stream otherwise.
func (cl *Client) connect(f *flow) (clientLink, error) {
	var l clientLink
	var err error
	if cl.cfg.FakeTCP != nil {
		l, err = cl.openFake(f)
	} else {
		l, err = cl.openStream(f)
	}
	if err != nil {
		return nil, err
	}
	cl.counters.ConnsDialed.Add(1)
	f.mu.Lock()
	f.peer = l.remoteAddr()
	f.mu.Unlock()
	f.state.Store(stateUp)
	n := f.conns.Add(1)
	msg := "connected"
	if n > 1 {
		msg = "reconnected"
	}
	cl.log.Info(msg, "flow", f.id, "daemon", f.key.daemon.String(), "peer", l.remoteAddr(),
		"local", l.localAddr(), "connections", n)
	return l, nil
}

// openStream dials the iketcp server and sends the prefix.
func (cl *Client) openStream(f *flow) (*clientStream, error) {
	nc, err := cl.cfg.dial(f.ctx, f.dial)
	if err != nil {
		return nil, err
	}
	nc.SetWriteDeadline(time.Now().Add(cl.cfg.writeTimeout()))
	if _, err := io.WriteString(nc, framing.Prefix); err != nil {
		nc.Close()
		return nil, fmt.Errorf("sending the IKETCP prefix: %w", err)
	}
	return &clientStream{cl: cl, nc: nc, vecBack: make([][]byte, 0, clientBatch)}, nil
}

// carry moves the flow's traffic over l both ways until l fails or the
// flow ends, closes l, and says why it ended.
func (cl *Client) carry(f *flow, l clientLink) string {
	readDone := make(chan string, 1)
	cl.wg.Add(1)
	go func() {
		defer cl.wg.Done()
		readDone <- l.serve(f)
	}()
	reason, readerEnded := cl.writePeer(f, l, readDone)
	l.close()
	if !readerEnded {
		<-readDone
	}
	return reason
}

// writePeer sends batches from the flow's queue on l until a send fails,
// the reader ends (readerEnded) or the flow ends, and says why.
func (cl *Client) writePeer(f *flow, l clientLink, readDone <-chan string) (reason string, readerEnded bool) {
	batch := make([]*datagram, 0, clientBatch)
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
			bytes += uint64(p.n)
		}
		err := l.send(batch)
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

// peerReader is one reader's state for fromPeer.
type peerReader struct {
	msg     framing.Message
	lastSPI uint32
}

// fromPeer does the bookkeeping for a datagram from the peer that arrived
// over via: it tells the transport machine about IKE answers and notes
// SAs for Status. It reports whether the datagram goes on to the daemon:
// malformed ones do not, nor keepalives over TCP (RFC 9329 6.6).
func (f *flow) fromPeer(now time.Time, via fallback.Transport, dg []byte, r *peerReader) bool {
	if r.msg.Decode(dg) != nil {
		f.cl.counters.Malformed.Add(1)
		return false
	}
	switch r.msg.Kind {
	case framing.KindKeepalive:
		if via == fallback.TCP {
			f.cl.counters.KeepalivesDropped.Add(1)
			return false
		}
	case framing.KindESP:
		if r.msg.ESP.SPI != r.lastSPI {
			r.lastSPI = r.msg.ESP.SPI
			f.book.noteESPIn(r.lastSPI)
		}
	case framing.KindIKE:
		f.inbound(now, via, &r.msg)
		f.book.noteIKE(&r.msg.IKE)
	}
	return true
}

// toDaemon hands a burst of the peer's datagrams to the daemon.
func (f *flow) toDaemon(ps []payload, scratch *[]udpbatch.Message) {
	if err := f.cl.deliver(f, ps, scratch); err != nil {
		f.cl.logDrop.log(f.cl.log, slog.LevelWarn, "delivery to the IKE daemon failed", "flow", f.id,
			"daemon", f.key.daemon.String(), "err", err)
	}
	f.lastPeer.Store(time.Now().UnixNano())
}

// clientStream is the RFC 9329 link: a TCP connection to the iketcp
// server carrying length-framed datagrams behind the IKETCP prefix.
type clientStream struct {
	cl      *Client
	nc      net.Conn
	vecBack [][]byte    // owned by writePeer
	vec     net.Buffers // reused: WriteTo takes its address
}

// send writes the datagrams as frames, each Length written in place in
// front of it, in one writev.
func (l *clientStream) send(batch []*datagram) error {
	l.vecBack = l.vecBack[:0]
	for _, p := range batch {
		l.vecBack = append(l.vecBack, p.frame())
	}
	l.vec = l.vecBack
	l.nc.SetWriteDeadline(time.Now().Add(l.cl.cfg.writeTimeout()))
	_, err := l.vec.WriteTo(l.nc)
	return err
}

// serve relays frames from the stream to the daemon until it fails. Each
// burst of frames goes to the daemon in one call of the return path.
func (l *clientStream) serve(f *flow) string {
	cl := l.cl
	d := framing.NewDecoder(l.nc, cl.cfg.connBuffer(), false)
	d.SetHeadroom(linkHeadroom)
	d.LimitPayload(cl.cfg.maxDatagram())
	ps := make([]payload, 0, clientBatch)
	var scratch []udpbatch.Message
	var r peerReader
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
		if f.fromPeer(time.Now(), fallback.TCP, p, &r) {
			buf, off := d.Offset(p)
			ps = append(ps, payload{buf, off, len(p)})
		}
		if len(ps) == 0 || d.Buffered() && len(ps) < cap(ps) {
			continue
		}
		f.toDaemon(ps, &scratch)
		clear(ps)
		ps = ps[:0]
	}
}

func (l *clientStream) close()             { l.nc.Close() }
func (l *clientStream) remoteAddr() string { return l.nc.RemoteAddr().String() }
func (l *clientStream) localAddr() string  { return l.nc.LocalAddr().String() }

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
