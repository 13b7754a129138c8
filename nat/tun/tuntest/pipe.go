// Package tuntest owns in-memory test doubles of tun.Device, for the tests
// of whatever moves packets through one (nat/faketcp's stack, and the
// relay's transparent mode): a pipe between two devices that can lose,
// duplicate, reorder and capture what crosses it, and whose ends can
// offload (tun.OffloadDevice), moving super-segments as the kernel does. For the tests of real
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
//
// An end that NewOffloadPipe made offloading is a tun.OffloadDevice whose
// Offload is nil, as a TUN device with the kernel's offloads is, and the
// pipe moves packets as the kernel between two such devices does: a
// super-segment written to one reaches an offloading other end whole
// (ReadOffload), and a plain one cut into its segments with their
// checksums finished, as the kernel cuts one; an offloading end's Read
// cuts them too. The knobs and the capture hook see each packet as
// written, a super-segment as one.
type PipeEnd struct {
	batch   int
	offload bool          // this end is a tun.OffloadDevice with offloads on
	virtio  bool          // either end offloads: each queued packet has a virtio-net header in front
	in      chan []byte   // packets for this end's Read
	pool    chan []byte   // packet buffers, shared by both ends
	wake    chan struct{} // a read deadline was set in the past
	closed  chan struct{}
	peer    *PipeEnd

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

	rmu      sync.Mutex // serializes Read and ReadOffload, and guards the following
	pend     []byte     // a super-segment that an offloading end's Read has not yet handed out whole (a queued packet, header first)
	pendCut  tun.TCPSplit
	pendNext int
}

var _ tun.OffloadDevice = (*PipeEnd)(nil)

// errNotOffloading is the Offload of an end without offloads.
var errNotOffloading = &tun.OffloadError{Err: tun.ErrOffloadNotAsked}

// superBuf is the size of the buffers of a pipe with an offloading end:
// a virtio-net header and the largest super-segment.
const superBuf = tun.VirtioNetHdrLen + tun.MTU

// NewPipe returns the two ends of a pipe: each Read returns up to batch
// packets, and each end holds up to queue packets for its Read. The fault
// knobs draw from fixed seeds, so a test's faults repeat from run to run.
func NewPipe(batch, queue int) (a, b *PipeEnd) {
	return NewOffloadPipe(batch, queue, false, false)
}

// NewOffloadPipe is NewPipe with offloads on at end a if offloadA, at b
// if offloadB.
func NewOffloadPipe(batch, queue int, offloadA, offloadB bool) (a, b *PipeEnd) {
	pool := make(chan []byte, 2*queue)
	a = &PipeEnd{batch: batch, in: make(chan []byte, queue), pool: pool, wake: make(chan struct{}, 1),
		closed: make(chan struct{}), rng: rand.New(rand.NewPCG(1, 2))}
	b = &PipeEnd{batch: batch, in: make(chan []byte, queue), pool: pool, wake: make(chan struct{}, 1),
		closed: make(chan struct{}), rng: rand.New(rand.NewPCG(3, 4))}
	a.peer, b.peer = b, a
	a.offload, b.offload = offloadA, offloadB
	a.virtio, b.virtio = offloadA || offloadB, offloadA || offloadB
	for _, d := range []*PipeEnd{a, b} {
		if d.offload {
			d.pend = make([]byte, 0, tun.MTU)
		}
	}
	return a, b
}

// Offload is nil at an offloading end, and otherwise says that nobody
// asked for offloads.
func (d *PipeEnd) Offload() error {
	if d.offload {
		return nil
	}
	return errNotOffloading
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
		pkt := d.newPacket()
		if d.virtio {
			pkt = append(pkt, make([]byte, tun.VirtioNetHdrLen)...)
		}
		d.send(append(pkt, b[offset:]...))
	}
	return len(bufs), nil
}

// WriteOffload gathers each of pkts into one packet toward the other end,
// through the fault knobs, as Write does; see tun.OffloadDevice. At an
// end without offloads it returns Offload's error.
func (d *PipeEnd) WriteOffload(pkts []tun.OffloadPacket) (int, error) {
	if !d.offload {
		return 0, errNotOffloading
	}
	select {
	case <-d.closed:
		return 0, net.ErrClosed
	default:
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range pkts {
		p := &pkts[i]
		pkt := d.newPacket()[:tun.VirtioNetHdrLen]
		_ = p.Hdr.Encode(pkt)
		pkt = append(pkt, p.Head...)
		for _, b := range p.Bufs {
			pkt = append(pkt, b[p.Offset:]...)
		}
		d.send(pkt)
	}
	return len(pkts), nil
}

// send puts pkt, a buffer of the pool (with its virtio-net header in a
// virtio pipe), through the capture hook and the fault knobs, toward the
// other end. d.mu is held.
func (d *PipeEnd) send(pkt []byte) {
	d.written.Add(1)
	wire := pkt
	if d.virtio {
		wire = pkt[tun.VirtioNetHdrLen:]
	}
	if d.capture != nil {
		d.capture(wire)
	}
	if d.loss > 0 && d.rng.Float64() < d.loss {
		d.lost.Add(1)
		d.recycle(pkt)
		return
	}
	if d.reorder > 0 && d.held == nil && d.rng.Float64() < d.reorder {
		d.held = pkt
		return
	}
	if d.dup > 0 && d.rng.Float64() < d.dup {
		d.deliver(append(d.newPacket(), pkt...))
	}
	d.deliver(pkt)
	if d.held != nil {
		d.deliver(d.held)
		d.held = nil
	}
}

// newPacket is an empty buffer from the pool.
func (d *PipeEnd) newPacket() []byte {
	select {
	case b := <-d.pool:
		return b[:0]
	default:
	}
	if d.virtio {
		return make([]byte, 0, superBuf)
	}
	return make([]byte, 0, 2048)
}

// deliver queues pkt for the other end's Read. An end without offloads
// gets a super-segment cut into its segments, and checksums finished, as
// the kernel hands them to a TUN device without offloads.
func (d *PipeEnd) deliver(pkt []byte) {
	if d.virtio && !d.peer.offload {
		var h tun.VirtioNetHdr
		_ = h.Decode(pkt)
		body := pkt[tun.VirtioNetHdrLen:]
		if h.IsGSO() {
			cut, err := tun.SplitTCP(&h, body)
			for k := range cut.Segments() {
				seg := d.newPacket()[:superBuf]
				clear(seg[:tun.VirtioNetHdrLen])
				n := cut.Put(seg[tun.VirtioNetHdrLen:], body, k)
				d.queue(seg[:tun.VirtioNetHdrLen+n])
			}
			if err != nil {
				d.overflowed.Add(1) // the kernel would not have made it: lost
			}
			d.recycle(pkt)
			return
		}
		if tun.FinishChecksum(&h, body) != nil {
			d.recycle(pkt)
			return
		}
		clear(pkt[:tun.VirtioNetHdrLen])
	}
	d.queue(pkt)
}

func (d *PipeEnd) queue(pkt []byte) {
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
// set, and net.ErrClosed after Close. At an offloading end it cuts
// super-segments into their segments and finishes checksums, as a TUN
// device's Read does.
func (d *PipeEnd) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return d.read(bufs, sizes, offset, false)
}

// ReadOffload is Read at an offloading end, packets as they came, each
// with its virtio-net header in bufs[k][offset-tun.VirtioNetHdrLen:offset];
// see tun.OffloadDevice. At an end without offloads it returns Offload's
// error.
func (d *PipeEnd) ReadOffload(bufs [][]byte, sizes []int, offset int) (int, error) {
	if !d.offload {
		return 0, errNotOffloading
	}
	if offset < tun.VirtioNetHdrLen {
		return 0, errors.New("tuntest: ReadOffload needs room for the virtio-net header")
	}
	return d.read(bufs, sizes, offset, true)
}

func (d *PipeEnd) read(bufs [][]byte, sizes []int, offset int, virtio bool) (int, error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	d.rmu.Lock()
	defer d.rmu.Unlock()
	n := d.takePending(bufs, sizes, offset, virtio, 0)
	if n == len(bufs) {
		return n, nil
	}
	for n == 0 {
		if d.expired.Load() {
			return 0, os.ErrDeadlineExceeded
		}
		select {
		case pkt := <-d.in:
			n = d.take(pkt, bufs, sizes, offset, virtio, 0)
		case <-d.wake:
		case <-d.closed:
			return 0, net.ErrClosed
		}
	}
	for n < len(bufs) {
		select {
		case pkt := <-d.in:
			n = d.take(pkt, bufs, sizes, offset, virtio, n)
		default:
			return n, nil
		}
	}
	return n, nil
}

// take puts the queued pkt into bufs[n:], and returns how many buffers
// are filled: a virtio pipe's header goes to ReadOffload's caller, and an
// offloading end's Read cuts a super-segment and finishes a checksum.
func (d *PipeEnd) take(pkt []byte, bufs [][]byte, sizes []int, offset int, virtio bool, n int) int {
	defer d.recycle(pkt)
	switch {
	case !d.virtio:
		sizes[n] = copy(bufs[n][offset:], pkt)
		return n + 1
	case virtio:
		sizes[n] = max(copy(bufs[n][offset-tun.VirtioNetHdrLen:], pkt)-tun.VirtioNetHdrLen, 0)
		return n + 1
	}
	var h tun.VirtioNetHdr
	_ = h.Decode(pkt)
	body := pkt[tun.VirtioNetHdrLen:]
	if !h.IsGSO() {
		if tun.FinishChecksum(&h, body) != nil {
			return n
		}
		sizes[n] = copy(bufs[n][offset:], body)
		return n + 1
	}
	cut, err := tun.SplitTCP(&h, body)
	if err != nil {
		return n
	}
	d.pend = append(d.pend[:0], body...)
	d.pendCut, d.pendNext = cut, 0
	return d.takePending(bufs, sizes, offset, false, n)
}

// takePending hands out the pending super-segment's segments into
// bufs[n:], one to a buffer; ReadOffload's with an empty header.
func (d *PipeEnd) takePending(bufs [][]byte, sizes []int, offset int, virtio bool, n int) int {
	for d.pendNext < d.pendCut.Segments() && n < len(bufs) {
		if virtio {
			clear(bufs[n][offset-tun.VirtioNetHdrLen : offset])
		}
		sizes[n] = d.pendCut.Put(bufs[n][offset:], d.pend, d.pendNext)
		d.pendNext++
		n++
	}
	return n
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
