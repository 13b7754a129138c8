// Package tuntest owns in-memory test doubles of tun.Device, for the tests
// of whatever moves packets through one (nat/faketcp's stack, and the
// relay's transparent mode): a pipe between two devices that can lose,
// duplicate, reorder and capture what crosses it. For the tests of real
// devices (nat/tun, nat/intercept, nat/fakenet) it reads one in the
// background (Pump) and checks the device contract: no allocation in
// steady state, and what Close does. Product code never imports it.
package tuntest

import (
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// PipeEnd is one end of an in-memory pipe of IP packets: what one end
// writes, the other reads, as two TUN devices routed to each other would
// move them. Its knobs lose, duplicate or reorder what it writes, and a
// capture hook sees every packet written, in order. It never blocks a
// writer: a full queue drops, as a device does (Overflowed counts them).
// It wakes a blocked Read for a read deadline in the past (as Stack.Close
// of nat/faketcp asks), and does not allocate in steady state.
type PipeEnd struct {
	batch  int
	in     chan []byte   // packets for this end's Read
	pool   chan []byte   // packet buffers, shared by both ends
	wake   chan struct{} // a read deadline was set in the past
	closed chan struct{}
	peer   *PipeEnd

	expired    atomic.Bool
	closeOnce  sync.Once
	written    atomic.Uint64 // packets Write was given
	lost       atomic.Uint64 // dropped by the loss knob
	overflowed atomic.Uint64 // dropped because the peer's queue was full

	mu      sync.Mutex // guards the following; held through Write so that capture order is wire order
	loss    float64    // probability that a packet is dropped
	dup     float64    // probability that a packet is delivered twice
	reorder float64    // probability that a packet is held back behind the next
	rng     *rand.Rand
	held    []byte // a packet held back for reordering
	capture func(pkt []byte)
}

var _ tun.Device = (*PipeEnd)(nil)

// NewPipe returns the two ends of a pipe: each Read returns up to batch
// packets, and each end holds up to queue packets for its Read. The fault
// knobs draw from fixed seeds, so a test's faults repeat from run to run.
func NewPipe(batch, queue int) (a, b *PipeEnd) {
	pool := make(chan []byte, 2*queue)
	a = &PipeEnd{batch: batch, in: make(chan []byte, queue), pool: pool, wake: make(chan struct{}, 1),
		closed: make(chan struct{}), rng: rand.New(rand.NewPCG(1, 2))}
	b = &PipeEnd{batch: batch, in: make(chan []byte, queue), pool: pool, wake: make(chan struct{}, 1),
		closed: make(chan struct{}), rng: rand.New(rand.NewPCG(3, 4))}
	a.peer, b.peer = b, a
	return a, b
}

// SetFaults sets the probabilities that a packet this end writes is lost,
// duplicated or reordered (held back behind the next one).
func (d *PipeEnd) SetFaults(loss, dup, reorder float64) {
	d.mu.Lock()
	d.loss, d.dup, d.reorder = loss, dup, reorder
	d.mu.Unlock()
}

// SetCapture installs fn to see every packet this end writes, before the
// fault knobs, in the order written; fn must not keep the packet. A nil fn
// removes it.
func (d *PipeEnd) SetCapture(fn func(pkt []byte)) {
	d.mu.Lock()
	d.capture = fn
	d.mu.Unlock()
}

// Queued is how many packets wait for this end's Read.
func (d *PipeEnd) Queued() int { return len(d.in) }

// Written is how many packets this end's Write was given.
func (d *PipeEnd) Written() uint64 { return d.written.Load() }

// Lost is how many packets this end's loss knob dropped.
func (d *PipeEnd) Lost() uint64 { return d.lost.Load() }

// Overflowed is how many packets this end wrote that the other end's full
// queue dropped.
func (d *PipeEnd) Overflowed() uint64 { return d.overflowed.Load() }

// BatchSize is the batch NewPipe was given.
func (d *PipeEnd) BatchSize() int { return d.batch }

// Write copies each bufs[k][offset:] toward the other end, through the
// fault knobs. It never blocks; after Close it returns net.ErrClosed.
func (d *PipeEnd) Write(bufs [][]byte, offset int) (int, error) {
	select {
	case <-d.closed:
		return 0, net.ErrClosed
	default:
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, b := range bufs {
		pkt := b[offset:]
		d.written.Add(1)
		if d.capture != nil {
			d.capture(pkt)
		}
		if d.loss > 0 && d.rng.Float64() < d.loss {
			d.lost.Add(1)
			continue
		}
		if d.reorder > 0 && d.held == nil && d.rng.Float64() < d.reorder {
			d.held = d.copyPacket(pkt)
			continue
		}
		d.deliver(d.copyPacket(pkt))
		if d.dup > 0 && d.rng.Float64() < d.dup {
			d.deliver(d.copyPacket(pkt))
		}
		if d.held != nil {
			d.deliver(d.held)
			d.held = nil
		}
	}
	return len(bufs), nil
}

func (d *PipeEnd) copyPacket(pkt []byte) []byte {
	var b []byte
	select {
	case b = <-d.pool:
	default:
		b = make([]byte, 0, 2048)
	}
	return append(b[:0], pkt...)
}

func (d *PipeEnd) deliver(pkt []byte) {
	select {
	case d.peer.in <- pkt:
	default:
		d.overflowed.Add(1)
		d.recycle(pkt)
	}
}

func (d *PipeEnd) recycle(pkt []byte) {
	select {
	case d.pool <- pkt:
	default:
	}
}

// Read blocks until the other end has written a packet, then takes as
// many as are queued, up to len(bufs). A packet longer than its buffer is
// cut. It returns os.ErrDeadlineExceeded while a past read deadline is
// set, and net.ErrClosed after Close.
func (d *PipeEnd) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	for {
		if d.expired.Load() {
			return 0, os.ErrDeadlineExceeded
		}
		select {
		case pkt := <-d.in:
			sizes[0] = copy(bufs[0][offset:], pkt)
			d.recycle(pkt)
			n := 1
			for n < len(bufs) {
				select {
				case pkt := <-d.in:
					sizes[n] = copy(bufs[n][offset:], pkt)
					d.recycle(pkt)
					n++
				default:
					return n, nil
				}
			}
			return n, nil
		case <-d.wake:
		case <-d.closed:
			return 0, net.ErrClosed
		}
	}
}

// SetReadDeadline supports none (the zero time) or one in the past, which
// wakes a blocked Read; a deadline in the future is an error.
func (d *PipeEnd) SetReadDeadline(t time.Time) error {
	switch {
	case t.IsZero():
		d.expired.Store(false)
		select {
		case <-d.wake:
		default:
		}
	case !t.After(time.Now()):
		d.expired.Store(true)
		select {
		case d.wake <- struct{}{}:
		default:
		}
	default:
		return errors.New("tuntest: PipeEnd supports only past read deadlines")
	}
	return nil
}

// Close makes this end's Read and Write fail with net.ErrClosed. It is
// idempotent.
func (d *PipeEnd) Close() error {
	d.closeOnce.Do(func() { close(d.closed) })
	return nil
}
