package faketcp

import (
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// Payload is one received datagram: Buf[Off:Off+N]. Buf[:Off] holds at
// least Headroom bytes the handler may overwrite (to build headers in
// front of the datagram in place) once it is done with the datagrams
// before it in the batch: the segments of a super-segment lie one after
// the other in one buffer, so a datagram's room is the tail of the one
// before.
type Payload struct {
	Buf    []byte
	Off, N int
}

// Conn is one fake-TCP connection: one datagram per segment each way.
type Conn struct {
	// Set when the conn is made, read-only afterwards.
	stack       *Stack
	key         fourTuple
	hdr         headers
	listener    *Listener     // the listener that accepted it; nil for Dial's
	established chan struct{} // closed when Dial or Accept may hand it out
	done        chan struct{} // closed by finish when it ends
	// sendMSS is the largest payload Send sends: the peer's MSS. Set
	// before the conn is handed out, read-only afterwards.
	sendMSS int

	handler atomic.Pointer[func([]Payload)]
	ipID    atomic.Uint32 // IPv4 identification of the last packet sent

	// hmu is held while the handler runs, whoever runs it, so a conn's
	// datagrams reach it one batch at a time and in order. It guards
	// early: copies of the datagrams that arrived before SetHandler, up
	// to maxEarly, which SetHandler delivers first.
	hmu      sync.Mutex
	early    []Payload
	counters connCounters
	doneOnce sync.Once

	sendMu sync.Mutex // serializes Send and Close, so that the wire sees their segments in sequence order; guards sendScratch and runs
	// sendScratch holds the buffers of a batch that Send keeps when it
	// refuses some.
	sendScratch [][]byte
	// runs holds a batch's packets for an offloading device: one per
	// run of equal-sized datagrams.
	runs []tun.OffloadPacket

	mu  sync.Mutex // guards the following
	tcb tcb
}

// connCounters are ConnStats' atomics.
type connCounters struct {
	segmentsSent, bytesSent, superSegmentsSent  atomic.Uint64
	segmentsReceived, bytesReceived             atomic.Uint64
	controlSent, controlReceived                atomic.Uint64
	droppedNoHandler, droppedOversize           atomic.Uint64
	droppedAfterClose, droppedUnacceptable      atomic.Uint64
	refusedEmpty, refusedOversize, writeErrored atomic.Uint64
	droppedWindow                               atomic.Uint64
}

// ConnStats is a snapshot of a conn's counters and sequence numbers.
type ConnStats struct {
	State string // CLOSED, SYN_SENT (Dial's), ESTABLISHED, FIN_WAIT, LAST_ACK, TIME_WAIT

	SegmentsSent, BytesSent         uint64 // data segments written, and their payload bytes
	SuperSegmentsSent               uint64 // packets that carried two or more of those segments, for the kernel to cut (with offloads)
	SegmentsReceived, BytesReceived uint64 // data segments delivered to the handler, and their payload bytes
	ControlSent, ControlReceived    uint64 // segments without payload: handshake (an accepted conn counts the SYN and its SYN-ACK once), ACKs, keepalives, FIN, RST

	// Received segments that did not reach the handler, by why.
	DroppedNoHandler    uint64 // data before SetHandler, past the maxEarly kept
	DroppedOversize     uint64 // payload larger than the MSS this side advertised
	DroppedAfterClose   uint64 // data after the conn ended
	DroppedUnacceptable uint64 // not valid in the conn's state: a bad SYN-ACK, no ACK flag, an RST outside the window, a SYN inside the conn

	// Datagrams Send refused, by why, and data segments the device did
	// not take.
	RefusedEmpty    uint64
	RefusedOversize uint64 // larger than the peer's MSS
	WriteErrors     uint64
	// DroppedWindow counts the datagrams Send dropped, without an error,
	// because they would have run past the window the peer advertised
	// (SendWindow), which middleboxes enforce: a path that holds more
	// than the window, or a burst before the peer's first ACK.
	DroppedWindow uint64

	Seq        uint32 // the next sequence number to send (in SeqFrozen mode, the one every data segment carries)
	Ack        uint32 // the ack segments carry now
	PeerMSS    int    // the largest payload Send sends
	SendWindow int64  // the bytes Send may send now before it runs past the peer's window (SeqLive)
}

// maxEarly bounds the datagrams a conn holds for a handler not yet set.
const maxEarly = 64

// SetHandler registers fn to receive the conn's datagrams. fn runs on
// the stack's reader goroutine with a batch of one or more datagrams in
// the order they arrived; the batch and its buffers are valid only during
// the call (zero-copy). A peer may send as soon as the handshake ends, in
// the same burst as its last ACK, before Dial or Accept has returned: the
// conn keeps copies of up to maxEarly such datagrams, and SetHandler
// hands them to fn first, on its caller's goroutine; beyond that they are
// dropped and counted (ConnStats.DroppedNoHandler). Calls of fn never
// overlap. fn may call Send, not SetHandler. A nil fn drops from then on.
func (c *Conn) SetHandler(fn func(batch []Payload)) {
	c.hmu.Lock()
	defer c.hmu.Unlock()
	if fn == nil {
		c.handler.Store(nil)
		return
	}
	c.handler.Store(&fn)
	if len(c.early) > 0 {
		c.deliverLocked(fn, c.early)
		c.early = nil
	}
}

// deliverLocked hands batch to fn and counts it. c.hmu must be held.
func (c *Conn) deliverLocked(fn func([]Payload), batch []Payload) {
	bytes := 0
	for _, p := range batch {
		bytes += p.N
	}
	c.counters.segmentsReceived.Add(uint64(len(batch)))
	c.counters.bytesReceived.Add(uint64(bytes))
	fn(batch)
}

// receive hands the reader's batch to the handler, or keeps copies of it
// until there is one.
func (c *Conn) receive(batch []Payload) {
	c.hmu.Lock()
	defer c.hmu.Unlock()
	if h := c.handler.Load(); h != nil {
		c.deliverLocked(*h, batch)
		return
	}
	for _, p := range batch {
		if len(c.early) == maxEarly {
			c.counters.droppedNoHandler.Add(1)
			continue
		}
		buf := make([]byte, Headroom+p.N)
		copy(buf[Headroom:], p.Buf[p.Off:p.Off+p.N])
		c.early = append(c.early, Payload{Buf: buf, Off: Headroom, N: p.N})
	}
}

// Send sends each bufs[k][offset:] as one data segment, building its IP
// and TCP headers in place in bufs[k][:offset] (offset >= Headroom), and
// writes the batch with one device Write. Segments carry ACK|PSH, the ack
// of the peer's last seq+len, and sequence numbers that advance by each
// payload's length (SeqLive), or ACK with the frozen seq and ack
// (SeqFrozen).
//
// With offloads (see Stack.Offload) and SeqLive, each run of datagrams of
// one size (the last may be shorter) goes out as one super-segment: one
// set of headers, built in front of the run's first datagram, and the
// datagrams where they lie; the kernel cuts it into the same segments,
// one datagram each, with the same sequence numbers, and finishes their
// checksums. Only the last segment of a run keeps PSH, as from any TCP
// that segments.
//
// Data never runs past the window the peer advertised (its ack plus its
// window), which every stateful middlebox on the way enforces, the
// host's own conntrack first: what would is dropped, from the first
// datagram that does not fit to the end of the batch, and counted
// (ConnStats.DroppedWindow), as a full link drops a datagram, and Send
// returns no error for it. That bites only before the peer's first ACK
// (its SYN-ACK's window is not scaled: 64240 bytes) or when the path
// holds more than the window (8 MiB), as queues full of super-segments
// can; then a sender that ran past it would send only segments the path
// drops, and hear no ACK that could move the window on.
//
// A datagram that is empty or larger than the peer's MSS is not sent:
// Send sends the others and returns an error that wraps ErrTooLarge.
// After the conn ended it returns Err. It is safe for concurrent use (the
// wire sees each batch whole, in sequence order) and does not allocate
// unless it fails.
func (c *Conn) Send(bufs [][]byte, offset int) error {
	if offset < Headroom {
		return errOffset
	}
	if len(bufs) == 0 {
		return nil
	}
	c.sendMu.Lock()
	defer c.sendMu.Unlock()

	total, refusedEmpty, refusedOversize := 0, 0, 0
	for _, b := range bufs {
		switch n := len(b) - offset; {
		case n <= 0:
			refusedEmpty++
		case n > c.sendMSS:
			refusedOversize++
		default:
			total += n
		}
	}
	send := bufs
	if refusedEmpty+refusedOversize > 0 {
		c.counters.refusedEmpty.Add(uint64(refusedEmpty))
		c.counters.refusedOversize.Add(uint64(refusedOversize))
		c.sendScratch = c.sendScratch[:0]
		for _, b := range bufs {
			if n := len(b) - offset; n > 0 && n <= c.sendMSS {
				c.sendScratch = append(c.sendScratch, b)
			}
		}
		send = c.sendScratch
		defer clear(c.sendScratch)
	}

	var sendErr error
	if len(send) > 0 {
		sendErr = c.sendData(send, offset, total)
	}
	if sendErr == nil && refusedEmpty+refusedOversize > 0 {
		sendErr = fmt.Errorf("%w: refused %d empty datagrams and %d larger than the peer's MSS of %d bytes, sent %d",
			ErrTooLarge, refusedEmpty, refusedOversize, c.sendMSS, len(send))
	}
	return sendErr
}

// sendData sends the data segments of bufs, total payload bytes in all;
// the caller holds sendMu.
func (c *Conn) sendData(bufs [][]byte, offset, total int) error {
	c.mu.Lock()
	if c.tcb.state != stateEstablished {
		err := c.tcb.err
		c.mu.Unlock()
		if err == nil {
			err = ErrClosed
		}
		return err
	}
	if room := c.tcb.sendRoom(); int64(total) > room {
		fit, n := 0, 0
		for _, b := range bufs {
			size := len(b) - offset
			if int64(fit+size) > room {
				break
			}
			fit += size
			n++
		}
		c.counters.droppedWindow.Add(uint64(len(bufs) - n))
		bufs, total = bufs[:n], fit
		if n == 0 {
			c.mu.Unlock()
			return nil
		}
	}
	seq, ack := c.tcb.dataFields(total)
	mode := c.tcb.cfg.mode
	c.mu.Unlock()

	fields := tcpFields{seq: seq, ack: ack, flags: flagACK | flagPSH, window: c.stack.cfg.Window}
	if mode == SeqFrozen {
		fields.flags = flagACK
	} else if c.stack.off != nil {
		return c.sendRuns(bufs, offset, fields)
	}
	for _, b := range bufs {
		c.hdr.put(b, offset, fields, nil, c.nextIPID())
		if mode == SeqLive {
			fields.seq += uint32(len(b) - offset)
		}
	}
	start := offset - c.hdr.ipHeaderLen() - tcpHeaderLen
	n, err := c.stack.dev.Write(bufs, start)
	n = min(max(n, 0), len(bufs))
	sent := total
	if n < len(bufs) {
		sent = 0
		for _, b := range bufs[:n] {
			sent += len(b) - offset
		}
	}
	c.counters.segmentsSent.Add(uint64(n))
	c.counters.bytesSent.Add(uint64(sent))
	if err != nil {
		c.counters.writeErrored.Add(uint64(len(bufs) - n))
		return fmt.Errorf("faketcp: the device took %d of %d segments: %w", n, len(bufs), err)
	}
	return nil
}

// Bounds of a super-segment that sendRuns builds.
const (
	// maxRunSegments bounds its segments (and so the pieces of its
	// writev): a run of tiny datagrams gains little from more.
	maxRunSegments = 64
	// maxRunPacket bounds its IP packet: what the IPv4 length field
	// holds, and below the kernel's legacy limit for a super-segment
	// (65536 bytes), so that no device on the way must cut it in
	// software for its size.
	maxRunPacket = 0xffff
	// smallSegment is the largest datagram that never ends a run of
	// bigger ones but leaves as a packet of its own. A byte-limited
	// bottleneck queue that a flood keeps nearly full still admits a
	// ping or a TCP acknowledgement on its own; cut from the end of a
	// super-segment it lost out more often (measured in the lab's
	// loaded test: 31 of 400 pings lost beside a flood, 0 of 400 with
	// it apart). relay/sendq treats the same sizes as small.
	smallSegment = 256
)

// sendRuns sends bufs, SeqLive data segments from fields.seq on, to an
// offloading device: each run of equal-sized datagrams (the last may be
// shorter) as one super-segment, written with the others in one
// WriteOffload. The caller holds sendMu.
func (c *Conn) sendRuns(bufs [][]byte, offset int, fields tcpFields) error {
	hd := &c.hdr
	ipLen := hd.ipHeaderLen()
	maxPayload := maxRunPacket - ipLen - tcpHeaderLen
	gso := uint8(tun.GSOTCPv4)
	if !hd.is4 {
		gso = tun.GSOTCPv6
	}
	runs := c.runs[:0]
	for i := 0; i < len(bufs); {
		size := len(bufs[i]) - offset
		j, total := i+1, size
		for j < len(bufs) && j-i < maxRunSegments {
			n := len(bufs[j]) - offset
			if n > size || total+n > maxPayload || (n < size && n <= smallSegment) {
				break
			}
			total += n
			j++
			if n < size {
				break // a shorter datagram ends the run
			}
		}
		segs := j - i
		// The kernel numbers the segments' IPv4 IDs on from the first.
		ipID := uint16(c.ipID.Add(uint32(segs))) - uint16(segs-1)
		start := hd.putHeaders(bufs[i], offset, total, fields, nil, ipID, true)
		p := tun.OffloadPacket{
			Hdr: tun.VirtioNetHdr{
				Flags:      tun.VirtioNeedsCsum,
				HdrLen:     uint16(ipLen + tcpHeaderLen),
				CsumStart:  uint16(ipLen),
				CsumOffset: 16,
			},
			Head:   bufs[i][start:offset],
			Bufs:   bufs[i:j],
			Offset: offset,
		}
		if segs > 1 {
			p.Hdr.GSOType, p.Hdr.GSOSize = gso, uint16(size)
		}
		runs = append(runs, p)
		fields.seq += uint32(total)
		i = j
	}
	n, err := c.stack.off.WriteOffload(runs)
	n = min(max(n, 0), len(runs))
	segments, sent, supers := 0, 0, 0
	for _, p := range runs[:n] {
		segments += len(p.Bufs)
		for _, b := range p.Bufs {
			sent += len(b) - offset
		}
		if len(p.Bufs) > 1 {
			supers++
		}
	}
	clear(runs) // keep no reference to the caller's buffers
	c.runs = runs[:0]
	c.counters.segmentsSent.Add(uint64(segments))
	c.counters.bytesSent.Add(uint64(sent))
	c.counters.superSegmentsSent.Add(uint64(supers))
	if err != nil {
		c.counters.writeErrored.Add(uint64(len(bufs) - segments))
		return fmt.Errorf("faketcp: the device took %d of %d segments: %w", segments, len(bufs), err)
	}
	return nil
}

// nextIPID is the IPv4 identification of the conn's next packet: a
// per-conn counter from a random start, as Linux uses for its
// connections.
func (c *Conn) nextIPID() uint16 { return uint16(c.ipID.Add(1)) }

// Close sends a FIN and ends the conn with ErrClosed; the stack keeps its
// 4-tuple a little longer to acknowledge the peer's FIN. It is idempotent
// and returns nil.
func (c *Conn) Close() error {
	c.closeWith(ErrClosed)
	return nil
}

// closeWith ends the conn with err: a FIN from an established conn,
// nothing from Dial's half-open one.
func (c *Conn) closeWith(err error) {
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	c.mu.Lock()
	send, ended, remove := c.tcb.close(time.Now(), err)
	c.mu.Unlock()
	if ended {
		c.finish()
	}
	c.stack.writeControl(c, send)
	if remove {
		c.stack.forget(c)
	}
}

// finish closes Done, once.
func (c *Conn) finish() {
	c.doneOnce.Do(func() {
		close(c.done)
		c.stack.log.Debug("faketcp: connection ended", "conn", c, "err", c.Err())
	})
}

// Done is closed when the conn ends: FIN or RST from the peer, keepalive
// timeout, Close, Stack.Close. Err says why.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err says why the conn ended, nil while it lives: an error that matches
// ErrReset, ErrTimeout, ErrClosed or ErrPeerClosed.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tcb.err
}

// LocalAddr is the conn's local address and port.
func (c *Conn) LocalAddr() netip.AddrPort { return c.hdr.local }

// RemoteAddr is the peer's address and port.
func (c *Conn) RemoteAddr() netip.AddrPort { return c.hdr.remote }

// String names the conn by its addresses, for logs.
func (c *Conn) String() string { return c.hdr.local.String() + "->" + c.hdr.remote.String() }

// LogValue makes a conn one attribute in structured logs.
func (c *Conn) LogValue() slog.Value { return slog.StringValue(c.String()) }

// Stats returns a snapshot of the conn's counters and sequence numbers.
func (c *Conn) Stats() ConnStats {
	c.mu.Lock()
	state, seq, ack, room := c.tcb.state, c.tcb.sndNxt, c.tcb.rcvNxt, c.tcb.sendRoom()
	c.mu.Unlock()
	k := &c.counters
	return ConnStats{
		State:               state.String(),
		SegmentsSent:        k.segmentsSent.Load(),
		BytesSent:           k.bytesSent.Load(),
		SuperSegmentsSent:   k.superSegmentsSent.Load(),
		SegmentsReceived:    k.segmentsReceived.Load(),
		BytesReceived:       k.bytesReceived.Load(),
		ControlSent:         k.controlSent.Load(),
		ControlReceived:     k.controlReceived.Load(),
		DroppedNoHandler:    k.droppedNoHandler.Load(),
		DroppedOversize:     k.droppedOversize.Load(),
		DroppedAfterClose:   k.droppedAfterClose.Load(),
		DroppedUnacceptable: k.droppedUnacceptable.Load(),
		RefusedEmpty:        k.refusedEmpty.Load(),
		RefusedOversize:     k.refusedOversize.Load(),
		WriteErrors:         k.writeErrored.Load(),
		DroppedWindow:       k.droppedWindow.Load(),
		Seq:                 seq,
		Ack:                 ack,
		PeerMSS:             c.sendMSS,
		SendWindow:          room,
	}
}
