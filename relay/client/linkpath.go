package client

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
)

// stableAfter is how long a link must last for the next reconnect to
// start again from the shortest backoff.
const stableAfter = 5 * time.Second

// runLink keeps a link to the iketcp server for the flow, reconnecting
// with backoff, and writes the flow's queue onto it.
//
// A flow leaves cl.flows (under cl.mu, which readDaemon holds while it
// queues) before it is stopped, and readDaemon has returned before run
// stops the rest, so nothing is queued after runLink drains the queue.
func (f *flow) runLink() {
	cl := f.cl
	defer cl.wg.Done()
	defer f.drain()
	backoff := time.Duration(0)
	for f.ctx.Err() == nil {
		f.state.Store(stateConnecting)
		link, err := f.connect()
		if err != nil {
			if f.ctx.Err() != nil {
				return
			}
			cl.counters.DialFailures.Add(1)
			backoff = nextBackoff(backoff, cl.cfg.reconnectMin(), cl.cfg.reconnectMax())
			cl.logDial.Log(cl.log, slog.LevelWarn, "cannot connect to the iketcp server, retrying", "flow", f.id,
				"peer", f.dial, "err", err, "retry_in", backoff.Round(time.Millisecond).String())
			f.state.Store(stateWaiting)
			if !relay.SleepCtx(f.ctx, backoff) {
				return
			}
			continue
		}
		connected := time.Now()
		reason := f.carry(link)
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
		if !relay.SleepCtx(f.ctx, backoff) {
			return
		}
	}
}

// drain returns queued datagrams to the pool as runLink ends.
func (f *flow) drain() {
	for {
		select {
		case d := <-f.queue:
			f.cl.putDatagram(d)
		default:
			return
		}
	}
}

// connect opens a link to the iketcp server for the flow.
func (f *flow) connect() (relay.Link, error) {
	cl := f.cl
	ctx, cancel := context.WithTimeout(f.ctx, cl.cfg.dialTimeout())
	defer cancel()
	link, err := cl.dialer.DialLink(ctx, f.dial)
	if err != nil {
		return nil, err
	}
	cl.counters.ConnsDialed.Add(1)
	f.mu.Lock()
	f.peer = link.RemoteAddr()
	f.mu.Unlock()
	f.state.Store(stateUp)
	n := f.conns.Add(1)
	msg := "connected"
	if n > 1 {
		msg = "reconnected"
	}
	cl.log.Info(msg, "flow", f.id, "daemon", f.key.daemon.String(), "peer", link.RemoteAddr(),
		"local", link.LocalAddr(), "connections", n)
	return link, nil
}

// carry moves the flow's traffic over link both ways until the link fails
// or the flow ends, closes the link, and says why it ended.
func (f *flow) carry(link relay.Link) string {
	readDone := make(chan error, 1)
	f.cl.wg.Add(1)
	go func() {
		defer f.cl.wg.Done()
		readDone <- link.Serve(newPeerReader(f, fallback.TCP))
	}()
	reason, readerEnded := f.writeLink(link, readDone)
	link.Close()
	if !readerEnded {
		<-readDone
	}
	return reason
}

// writeLink sends batches from the flow's queue on link until a send
// fails, the reader ends (readerEnded) or the flow ends, and says why.
func (f *flow) writeLink(link relay.Link, readDone <-chan error) (reason string, readerEnded bool) {
	cl := f.cl
	batch := make([]*datagram, 0, clientBatch)
	bufs := make([][]byte, 0, clientBatch)
	var msg framing.Message
	var lastOutSPI uint32
	for {
		select {
		case d := <-f.queue:
			batch = append(batch, d)
		case err := <-readDone:
			return err.Error(), true
		case <-f.ctx.Done():
			return "flow closed", false
		}
	gather:
		for len(batch) < cap(batch) {
			select {
			case d := <-f.queue:
				batch = append(batch, d)
			default:
				break gather
			}
		}
		var bytes uint64
		for _, d := range batch {
			if msg.Decode(d.bytes()) == nil {
				switch {
				case msg.Kind == framing.KindESP && msg.ESP.SPI != lastOutSPI:
					lastOutSPI = msg.ESP.SPI
					f.book.NoteESPOut(lastOutSPI)
				case msg.Kind == framing.KindIKE:
					f.book.NoteIKE(&msg.IKE)
				}
			}
			bytes += uint64(d.n)
			bufs = append(bufs, d.withHeadroom())
		}
		err := link.Send(bufs)
		n := len(batch)
		for i, d := range batch {
			cl.putDatagram(d)
			batch[i] = nil
		}
		batch = batch[:0]
		clear(bufs)
		bufs = bufs[:0]
		if err != nil {
			cl.counters.WriteErrors.Add(1)
			return "write: " + err.Error(), false
		}
		f.traffic.CountOut(cl.counters, n, bytes)
	}
}

// nextBackoff doubles the previous backoff within [lo, hi], with ±20%
// jitter so that many clients do not reconnect in step.
func nextBackoff(prev, lo, hi time.Duration) time.Duration {
	next := min(max(2*prev, lo), hi)
	jitter := time.Duration(rand.Int64N(int64(next)/5+1)) - next/10
	return next + jitter
}
