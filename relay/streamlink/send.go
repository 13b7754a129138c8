package streamlink

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/sendq"
)

// The write side of a link.
//
// Send never waits for the network. The goroutine that calls it (a
// server's session reading its backend, a client reading its daemon)
// writes its frames itself while the socket takes them: one non-blocking
// writev, no copy, no hand-off. What the socket does not take waits in
// the link's queue (package relay/sendq: bytes, not datagrams; IKE first;
// late ESP dropped), and a writer goroutine, started then and gone once
// the queue is empty, writes it as the socket drains. The socket itself
// holds little unsent (TCP_NOTSENT_LOWAT), so that what waits, waits in
// the queue, where IKE can pass ESP and old ESP can be dropped, rather
// than in the kernel, where it cannot.
//
// TLS cannot write without blocking: over TLS every frame goes through
// the queue and the writer, which writes a batch in one TLS write.

const (
	// directChunk is about the most bytes the writer takes from the queue
	// for one write on a raw socket: more than the socket takes at once
	// (TCP_NOTSENT_LOWAT) and few enough to put back cheaply.
	directChunk = 64 << 10
	// tlsChunk is the most bytes for one TLS write, which blocks: one
	// record.
	tlsChunk = 16 << 10
	// maxIov bounds the frames in one writev.
	maxIov = burstSize
)

// Send sends the datagrams as frames, each Length written in place in
// front of it: those the socket takes at once are sent now, the rest
// queued for the writer. It returns an error only once the link has
// failed.
func (l *Link) Send(bufs [][]byte) error {
	now := time.Now().UnixNano()
	if l.kernel != nil {
		var n uint64
		for _, b := range bufs {
			n += uint64(len(b) - relay.Headroom + framing.LengthSize)
		}
		l.handed.Add(n)
	}
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.werr != nil {
		return l.werr
	}
	if l.closed.Load() {
		return net.ErrClosed
	}
	for len(bufs) > 0 {
		chunk := bufs[:min(len(bufs), maxIov)]
		bufs = bufs[len(chunk):]
		if l.pendBack == nil {
			l.pendBack = make([][]byte, 0, maxIov)
		}
		l.pend = l.pendBack[:0] // try advances pend's start: begin again from its backing
		for _, b := range chunk {
			f := b[relay.Headroom-framing.LengthSize:]
			framing.PutLength(f, len(b)-relay.Headroom)
			l.pend = append(l.pend, f)
		}
		if l.direct != nil && !l.writing && l.rest == nil && l.q.Empty() {
			if err := l.direct.try(&l.pend); err != nil {
				clear(l.pendBack[:cap(l.pendBack)])
				l.failLocked(err)
				return l.werr
			}
			if len(l.pend) > 0 && l.partial(chunk, len(l.pend)) {
				// A frame went out in part: its tail goes next, before
				// anything else, or the stream breaks.
				l.restBuf = append(l.restBuf[:0], l.pend[0]...)
				l.rest = l.restBuf
				l.pend = l.pend[1:]
			}
		}
		for _, f := range l.pend {
			l.q.Push(f, sendq.LaneOf(f[framing.LengthSize:]), now)
		}
		clear(l.pendBack[:cap(l.pendBack)])
	}
	l.countDropsLocked()
	if !l.writing && (l.rest != nil || !l.q.Empty()) {
		l.writing = true
		l.writers.Add(1)
		go l.writeQueued()
	}
	return nil
}

// partial reports whether the first of the n frames left unsent of chunk
// went out in part.
func (l *Link) partial(chunk [][]byte, n int) bool {
	whole := chunk[len(chunk)-n]
	return len(l.pend[0]) < len(whole)-(relay.Headroom-framing.LengthSize)
}

// countDropsLocked adds what the queue dropped to the counters.
func (l *Link) countDropsLocked() {
	d := l.q.TakeDrops()
	if d.Full == 0 && d.Late == 0 {
		return
	}
	c := l.sh.cfg.Counters
	c.QueueFull.Add(d.Full)
	c.QueueLate.Add(d.Late)
}

// writeQueued is the writer: it writes what the queue holds until the
// queue is empty or the link fails.
//
// Over a raw socket it writes what the socket takes, waits for it to
// drain if it did not take all, and puts back what is left before it
// takes again: so that each time, the queue decides afresh what goes next (IKE
// that came meanwhile, ESP that is now late), and nothing waits
// committed to a write. Over TLS, which cannot write so, it writes a
// batch of at most one record's worth at a time.
func (l *Link) writeQueued() {
	defer l.writers.Done()
	var frames, pend [][]byte
	var lens []int       // the frames' lengths as popped
	var coalesced []byte // TLS: a batch in one buffer, one write
	for {
		l.wmu.Lock()
		l.q.Release()
		if l.werr != nil || l.closed.Load() {
			l.q.Reset()
			l.rest, l.writing = nil, false
			l.wmu.Unlock()
			return
		}
		frames = frames[:0]
		hasRest := l.rest != nil
		if hasRest {
			frames = append(frames, l.rest)
			l.rest = nil
		}
		chunk := tlsChunk
		if l.direct != nil {
			chunk = directChunk
		}
		frames = l.q.Pop(frames, maxIov, chunk, time.Now().UnixNano())
		l.countDropsLocked()
		if len(frames) == 0 {
			l.writing = false
			l.wmu.Unlock()
			return
		}
		l.wmu.Unlock()

		if l.direct == nil {
			if l.lowat != nil {
				l.lowat.adjust(time.Now().UnixNano())
			}
			coalesced = coalesced[:0]
			for _, f := range frames {
				coalesced = append(coalesced, f...)
			}
			l.nc.SetWriteDeadline(time.Now().Add(l.sh.cfg.writeTimeout()))
			_, err := l.nc.Write(coalesced)
			l.nc.SetWriteDeadline(time.Time{})
			clear(frames)
			if err != nil {
				l.wmu.Lock()
				l.failLocked(err)
				l.wmu.Unlock()
			}
			continue
		}

		lens = lens[:0]
		for _, f := range frames {
			lens = append(lens, len(f))
		}
		pend = frames
		if l.lowat != nil {
			l.lowat.adjust(time.Now().UnixNano())
		}
		l.nc.SetWriteDeadline(time.Now().Add(l.sh.cfg.writeTimeout()))
		err := l.direct.write(&pend)
		// The deadline bounds the wait, and must not outlive it: a
		// non-blocking write would fail on it once it passed.
		l.nc.SetWriteDeadline(time.Time{})
		l.wmu.Lock()
		if err != nil {
			l.failLocked(err)
		} else if len(pend) > 0 {
			l.putBackLocked(pend, lens[len(lens)-len(pend)], hasRest && len(pend) == len(frames))
		}
		l.wmu.Unlock()
		clear(frames)
	}
}

// putBackLocked returns what a write left of a batch: the first of pend
// (popped whole at firstLen bytes, or the rest of a frame if isRest) as
// the rest if it went out in part, and the whole frames after it to the
// queue.
func (l *Link) putBackLocked(pend [][]byte, firstLen int, isRest bool) {
	whole := len(pend)
	if isRest || len(pend[0]) < firstLen {
		// copy, not append: pend[0] may be the tail of restBuf itself.
		if cap(l.restBuf) < len(pend[0]) {
			l.restBuf = make([]byte, len(pend[0]), max(len(pend[0]), 2048))
		}
		l.rest = l.restBuf[:copy(l.restBuf[:cap(l.restBuf)], pend[0])]
		whole--
	}
	l.q.Requeue(whole)
}

// failLocked records the write error that ends the link and closes the
// connection, so that Serve returns and says why.
func (l *Link) failLocked(err error) {
	if l.werr != nil {
		return
	}
	if l.closed.Load() {
		l.werr = net.ErrClosed // closed here: not a failure
		return
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		err = fmt.Errorf("the peer took no data for %v (--write-timeout)", l.sh.cfg.writeTimeout())
	}
	l.sh.cfg.Counters.WriteErrors.Add(1)
	l.werr = fmt.Errorf("write failed: %w", err)
	l.nc.Close()
}

// writeErr returns the write error that ended the link, or nil.
func (l *Link) writeErr() error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	return l.werr
}

// directWriter writes frames on a socket without Go's blocking Write: try
// sends what the socket takes now.
type directWriter interface {
	// try sends what the socket takes now of *pend, and leaves the rest
	// in *pend.
	try(pend *[][]byte) error
	// write is try that, if the socket does not take all, then waits
	// (within the write deadline) until it can take more.
	write(pend *[][]byte) error
}

// tuneSocket sets the options a link's socket needs: TCP_NOTSENT_LOWAT,
// so that little waits unsent in the kernel, and the congestion control.
// It returns the lowat to adjust to the delivery rate, if that is the
// configuration, and why an option could not be set, for a warning.
func tuneSocket(nc net.Conn, cfg *Config) (*autoLowat, error) {
	raw := rawConn(underlying(nc))
	if raw == nil {
		return nil, nil
	}
	lowat, auto := cfg.notSentLowat()
	if err := setSocketOptions(raw, lowat, cfg.congestion()); err != nil {
		return nil, err
	}
	if !auto {
		return nil, nil
	}
	return &autoLowat{raw: raw, set: lowat}, nil
}

// autoLowat keeps a socket's TCP_NOTSENT_LOWAT at about AutoNotSentTime
// of its delivery rate. The writer, the only one to use it, checks at
// most every adjustEvery, while it has something waiting.
type autoLowat struct {
	raw     syscall.RawConn
	set     int   // the lowat set now
	checked int64 // unix ns of the last check
	rate    atomic.Uint64
}

const adjustEvery = int64(50 * time.Millisecond)

// adjust sets the lowat anew if the delivery rate moved it by more than a
// quarter.
func (a *autoLowat) adjust(now int64) {
	if now-a.checked < adjustEvery {
		return
	}
	a.checked = now
	rate, err := deliveryRate(a.raw)
	if err != nil || rate == 0 {
		return
	}
	a.rate.Store(rate)
	want := int(min(max(rate*uint64(AutoNotSentTime)/uint64(time.Second), MinNotSentLowat), MaxNotSentLowat))
	if diff := want - a.set; diff > a.set/4 || -diff > a.set/4 {
		if setSocketOptions(a.raw, want, "") == nil {
			a.set = want
		}
	}
}

// Backlog says what waits on the link, in bytes: in its queue, and, on
// Linux over TCP, in the socket, unsent or unacknowledged (TCP_INFO, read
// at most every millisecond); and the connection's delivery rate in bytes
// a second (0: unknown), plus what Send was handed since the socket was
// read. An aggregate's least-latency scheduler asks it
// (package relay/aggregate).
func (l *Link) Backlog() (queued int, rate uint64) {
	l.wmu.Lock()
	p, b := l.q.Bytes()
	l.wmu.Unlock()
	if l.kernel != nil {
		// What was handed over since the socket was last read is on its
		// way in, or queued: counted, once or twice, rather than not.
		k, r := l.kernel.get(time.Now().UnixNano(), l.handed.Load())
		return p + b + k, r
	}
	if l.lowat != nil {
		rate = l.lowat.rate.Load()
	}
	return p + b, rate
}

// underlying returns the connection under TLS.
func underlying(nc net.Conn) net.Conn {
	if tc, ok := nc.(*tls.Conn); ok {
		return tc.NetConn()
	}
	return nc
}

// directFor returns the direct writer of nc, or nil where frames must go
// through nc's Write (TLS).
func directFor(nc net.Conn) directWriter {
	if _, ok := nc.(*tls.Conn); ok {
		return nil
	}
	if raw := rawConn(nc); raw != nil {
		return newDirect(raw)
	}
	return nil
}

// Drain returns once the link has written everything queued (or it has
// failed), or ctx ends: a stopping relay lets its frames out so.
func (l *Link) Drain(ctx context.Context) error {
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for {
		l.wmu.Lock()
		idle := l.werr != nil || !l.writing && l.rest == nil && l.q.Empty()
		l.wmu.Unlock()
		if idle || l.closed.Load() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
