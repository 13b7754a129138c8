package faketcp

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// Headroom is the room a payload needs in front of it for Send to build
// its IP and TCP headers in place: IPv6's 40 bytes and TCP's 20, rounded
// up. Received payloads have at least this much writable room in front
// of them too.
const Headroom = 64

// readDeadliner is a tun.Device whose blocked Read can be woken without
// closing it (as *os.File's and net.Conn's can): Stack.Close uses it to
// end its reader goroutine, and NewStack clears a deadline a previous
// Stack left.
type readDeadliner interface {
	SetReadDeadline(t time.Time) error
}

// Limits of a Stack.
const (
	// maxConns bounds the conns a stack holds: established and lingering
	// ones, and Dial's half-open ones. A listener keeps no half-open conn
	// (it answers SYNs with cookies), so SYNs cannot fill it. At the
	// bound a SYN to a listener is dropped (its peer sends it again), a
	// segment that returns a valid cookie is answered with an RST, and
	// Dial fails.
	maxConns = 4096
	// cookieKeyLen is the length of a stack's key for its SYN cookies.
	cookieKeyLen = 32
	// acceptQueue is how many established conns a Listener holds for
	// Accept; one more is reset.
	acceptQueue = 128
	// controlBufSize holds any segment without payload built here:
	// IPv6, TCP and SYN options.
	controlBufSize = 128
	// maxBatch bounds the buffers of one Read.
	maxBatch = 1024
	// Dial's ports (EphemeralPorts).
	ephemeralFirst = 32768
	ephemeralLast  = 60999
	// readRetry is the pause after a Read error that is not the device
	// closing.
	readRetry = 10 * time.Millisecond
)

// PortRange is a block of local TCP ports, First to Last, both included.
type PortRange struct{ First, Last uint16 }

// EphemeralPorts are the ports Dial picks from, as Linux's default
// ip_local_port_range; DialFrom's blocks are usually cut out of them.
var EphemeralPorts = PortRange{ephemeralFirst, ephemeralLast}

// Valid reports whether r holds at least one port, and not port 0.
func (r PortRange) Valid() bool { return r.First != 0 && r.First <= r.Last }

// Contains reports whether port is in r.
func (r PortRange) Contains(port uint16) bool { return r.First <= port && port <= r.Last }

// Len is how many ports r holds.
func (r PortRange) Len() int {
	if !r.Valid() {
		return 0
	}
	return int(r.Last) - int(r.First) + 1
}

func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.First, r.Last) }

// fourTuple identifies a conn: the local address is the stack's own.
type fourTuple struct {
	remote    netip.AddrPort
	localPort uint16
}

// Stack is a userspace TCP endpoint for datagrams over a tun.Device. See the
// package documentation.
type Stack struct {
	// Set by NewStack, read-only afterwards.
	dev tun.Device
	// off is dev when it hands TCP segmentation and checksums to the
	// kernel (tun.OffloadDevice, its Offload nil): the reader takes its
	// packets as the kernel delivers them, super-segments whole, and
	// Send writes runs of equal-sized datagrams as super-segments. Nil
	// otherwise.
	off      tun.OffloadDevice
	cfg      Config // with defaults
	tcbCfg   tcbConfig
	log      *slog.Logger
	random   func() uint32 // the cookie key, Dial's ISNs, ports, IP IDs, flow labels
	interval time.Duration // of the timer goroutine
	started  bool          // the goroutines run (tests drive a stack without them)

	// rx is the reader goroutine's own scratch.
	rx receiveScratch
	// tx is the timer goroutine's own scratch.
	tx tickScratch

	closed     atomic.Bool // set first thing by Close
	cookieKey  [cookieKeyLen]byte
	pause      pauseState    // Pause's: the goroutines stop for a hand-over
	quit       chan struct{} // closed by Close: stops the timer goroutine
	readerDone chan struct{} // closed when the reader goroutine has ended
	timerDone  chan struct{}
	counters   stackCounters

	mu        sync.Mutex // guards the following
	conns     map[fourTuple]*Conn
	listeners map[uint16]*Listener
	failed    error // the device error that ended the reader, if any
}

// receiveScratch is what the reader reuses from one batch to the next,
// so that receiving does not allocate.
type receiveScratch struct {
	bufs        [][]byte // Read's: Headroom bytes, then the packet
	sizes       []int
	replyBufs   [][]byte // controlBufSize bytes each
	replies     [][]byte // this batch's replies, each inside its replyBufs entry
	pending     []Payload
	pendingConn *Conn   // whose payloads pending holds
	established []*Conn // conns whose handshake completed in this batch
	cookies     cookieJar
}

// tickScratch is what the timer goroutine reuses from one tick to the
// next.
type tickScratch struct {
	conns   []*Conn
	bufs    [][]byte
	packets [][]byte
	removed []*Conn
}

// stackCounters are StackStats' atomics.
type stackCounters struct {
	malformed, notTCP, notLocal, badChecksum atomic.Uint64
	refused, ignoredRST, tableFull           atomic.Uint64
	synCookies, badCookies                   atomic.Uint64
	acceptQueueFull, readErrors, writeErrors atomic.Uint64
	superSegments                            atomic.Uint64
}

// StackStats counts what a Stack dropped or refused before any conn saw
// it, and its device errors.
type StackStats struct {
	Conns           int    // conns held now: established and lingering, and Dial's half-open ones (a listener keeps none)
	Malformed       uint64 // packets too short or inconsistent, bad IPv4 header checksums, fragments, port 0, multicast or broadcast sources
	NotTCP          uint64 // packets of other protocols
	NotLocal        uint64 // packets of the other IP version or to another address than Local
	BadChecksum     uint64 // segments with a wrong TCP checksum
	Refused         uint64 // segments for no conn, answered with an RST (BadCookies, and valid cookies refused at TableFull, among them)
	IgnoredRST      uint64 // RSTs for no conn
	SYNCookies      uint64 // SYNs to a listener, each answered with one SYN-ACK that carries a cookie, and nothing kept
	BadCookies      uint64 // segments to a listener whose ack returned no valid cookie (forged, for another 4-tuple or SYN, off by one, or stale), answered with an RST
	TableFull       uint64 // SYNs dropped, and valid cookies answered with an RST, because the stack held its most conns
	AcceptQueueFull uint64 // conns reset on completing their handshake: the listener's queue was full or closed
	ReadErrors      uint64 // failed device Reads other than its closing
	WriteErrors     uint64 // failed device Writes of the stack's own segments (Send reports its own)
	// SuperSegments counts the packets that arrived as super-segments
	// (with offloads: see Offload), each counted again as its segments.
	SuperSegments uint64
}

// NewStack starts a stack on dev: one reader goroutine and one timer
// goroutine, which Close ends. The stack does not own dev: Close does not
// close it.
func NewStack(dev tun.Device, cfg Config) (*Stack, error) {
	return newStack(dev, cfg, true, randomUint32)
}

// newStack is NewStack; tests make stacks without goroutines, to drive
// processBatch and the timers themselves, and with their own randomness.
func newStack(dev tun.Device, cfg Config, start bool, random func() uint32) (*Stack, error) {
	s, err := buildStack(dev, cfg, random)
	if err != nil {
		return nil, err
	}
	s.start(start)
	return s, nil
}

// buildStack makes a stack on dev, its goroutines not started.
func buildStack(dev tun.Device, cfg Config, random func() uint32) (*Stack, error) {
	if dev == nil {
		return nil, errors.New("faketcp: no device")
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	batch := min(max(dev.BatchSize(), 1), maxBatch)
	s := &Stack{
		dev:        dev,
		cfg:        cfg,
		tcbCfg:     cfg.tcbConfig(),
		log:        cfg.Logger,
		random:     random,
		interval:   min(100*time.Millisecond, max(cfg.KeepAlive/4, time.Millisecond)),
		quit:       make(chan struct{}),
		readerDone: make(chan struct{}),
		timerDone:  make(chan struct{}),
		conns:      make(map[fourTuple]*Conn),
		listeners:  make(map[uint16]*Listener),
	}
	if od, ok := dev.(tun.OffloadDevice); ok {
		if err := od.Offload(); err == nil {
			s.off = od
			s.log.Debug("faketcp: runs of segments move as super-segments (the device offloads)")
		} else {
			s.log.Debug("faketcp: one segment per packet", "reason", err)
		}
	}
	bufSize := Headroom + cfg.MTU
	if s.off != nil {
		bufSize = Headroom + max(cfg.MTU, tun.MTU) // a whole super-segment, whatever the MTU
	}
	s.rx = receiveScratch{
		bufs:        make([][]byte, batch),
		sizes:       make([]int, batch),
		replyBufs:   make([][]byte, batch),
		replies:     make([][]byte, 0, batch),
		pending:     make([]Payload, 0, batch),
		established: make([]*Conn, 0, batch),
	}
	for k := range batch {
		s.rx.bufs[k] = make([]byte, bufSize)
		s.rx.replyBufs[k] = make([]byte, controlBufSize)
	}
	for k := 0; k < len(s.cookieKey); k += 4 {
		binary.BigEndian.PutUint32(s.cookieKey[k:], random())
	}
	s.rx.cookies = newCookieJar(s.cookieKey[:])
	if d, ok := dev.(readDeadliner); ok {
		if err := d.SetReadDeadline(time.Time{}); err != nil {
			return nil, fmt.Errorf("faketcp: clearing the device's read deadline: %w", err)
		}
	}
	return s, nil
}

// start starts the stack's goroutines, or, for tests that drive the
// stack themselves, marks them ended.
func (s *Stack) start(goroutines bool) {
	s.started = goroutines
	if goroutines {
		go s.runReader()
		go s.runTimer()
	} else {
		close(s.readerDone)
		close(s.timerDone)
	}
}

// randomUint32 is the stacks' randomness: ISNs and cookies must not be
// guessable (RFC 6528), so it comes from crypto/rand, which does not
// fail.
func randomUint32() uint32 {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return binary.BigEndian.Uint32(b[:])
}

// LocalAddr is Config.Local.
func (s *Stack) LocalAddr() netip.Addr { return s.cfg.Local }

// Done is closed when the reader goroutine has ended: after Close, once
// the device's Read has returned. Close waits for it itself when the
// device can wake a blocked Read (it has SetReadDeadline); otherwise the
// owner closes the device after Close and may wait for Done.
func (s *Stack) Done() <-chan struct{} { return s.readerDone }

// Stats returns the stack's counters.
func (s *Stack) Stats() StackStats {
	s.mu.Lock()
	n := len(s.conns)
	s.mu.Unlock()
	c := &s.counters
	return StackStats{
		Conns:           n,
		Malformed:       c.malformed.Load(),
		NotTCP:          c.notTCP.Load(),
		NotLocal:        c.notLocal.Load(),
		BadChecksum:     c.badChecksum.Load(),
		Refused:         c.refused.Load(),
		IgnoredRST:      c.ignoredRST.Load(),
		SYNCookies:      c.synCookies.Load(),
		BadCookies:      c.badCookies.Load(),
		TableFull:       c.tableFull.Load(),
		AcceptQueueFull: c.acceptQueueFull.Load(),
		ReadErrors:      c.readErrors.Load(),
		WriteErrors:     c.writeErrors.Load(),
		SuperSegments:   c.superSegments.Load(),
	}
}

// Offload reports whether the stack moves super-segments through its
// device (a tun.OffloadDevice whose Offload is nil): runs of datagrams
// go out, and may come in, many segments to a packet.
func (s *Stack) Offload() bool { return s.off != nil }

// Close ends every conn (an established one with a FIN, Dial's half-open
// one with nothing; each ends with ErrClosed), closes the
// listeners, and stops the stack's goroutines. It waits for the reader
// goroutine only when the device can wake a blocked Read (see Done). It
// does not close the device. It is idempotent. A handler must not call
// it: Close waits for the reader goroutine, which runs the handlers.
func (s *Stack) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.mu.Lock()
	conns := make([]*Conn, 0, len(s.conns))
	for _, c := range s.conns {
		conns = append(conns, c)
	}
	listeners := make([]*Listener, 0, len(s.listeners))
	for _, l := range s.listeners {
		listeners = append(listeners, l)
	}
	s.mu.Unlock()
	for _, l := range listeners {
		_ = l.Close()
	}
	for _, c := range conns {
		c.closeWith(ErrClosed)
	}
	s.mu.Lock()
	clear(s.conns)
	s.mu.Unlock()
	close(s.quit)
	<-s.timerDone
	if d, ok := s.dev.(readDeadliner); ok && s.started {
		if err := d.SetReadDeadline(time.Unix(1, 0)); err == nil {
			<-s.readerDone
		}
	}
	return nil
}

// Dial opens a connection to remote, which must be of Local's family:
// from a random free port of EphemeralPorts, with a random ISN, a SYN
// (MSS, window scale, SACK permitted) sent again every second until the
// SYN-ACK comes or HandshakeTimeout passes, then an ACK. The conn
// returned has no handler yet.
func (s *Stack) Dial(ctx context.Context, remote netip.AddrPort) (*Conn, error) {
	return s.DialFrom(ctx, remote, EphemeralPorts)
}

// DialFrom is Dial from a random free port of ports: the kernel's NAT can
// tell the conns of one block from another's by their source port (an
// aggregate member's, which leaves by an address of its own).
func (s *Stack) DialFrom(ctx context.Context, remote netip.AddrPort, ports PortRange) (*Conn, error) {
	remote = netip.AddrPortFrom(remote.Addr().Unmap().WithZone(""), remote.Port())
	if !remote.Addr().IsValid() || remote.Port() == 0 || remote.Addr().Is4() != s.cfg.Local.Is4() {
		return nil, fmt.Errorf("faketcp: dial %v: not a %s address and port", remote, familyName(s.cfg.Local))
	}
	if !ports.Valid() {
		return nil, fmt.Errorf("faketcp: dial %v: local ports %v: want First from 1 to Last", remote, ports)
	}
	c, syn, err := s.openActive(remote, ports)
	if err != nil {
		return nil, fmt.Errorf("faketcp: dial %v: %w", remote, err)
	}
	s.writeControl(c, syn)
	select {
	case <-c.established:
		return c, nil
	case <-c.done:
		return nil, fmt.Errorf("faketcp: dial %v: %w", remote, c.Err())
	case <-ctx.Done():
		c.closeWith(fmt.Errorf("%w: %w", ErrClosed, ctx.Err()))
		return nil, fmt.Errorf("faketcp: dial %v: %w", remote, ctx.Err())
	}
}

func familyName(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// openActive makes Dial's conn, in SYN_SENT, with a free local port of
// ports.
func (s *Stack) openActive(remote netip.AddrPort, ports PortRange) (*Conn, emit, error) {
	iss := s.random()
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.refuseLocked(); err != nil {
		return nil, emit{}, err
	}
	port, ok := s.freePortLocked(remote, ports)
	if !ok {
		return nil, emit{}, fmt.Errorf("no free local port in %v", ports)
	}
	c := s.newConn(remote, port, nil, s.random(), uint16(s.random()))
	var syn emit
	c.tcb, syn = newActiveTCB(s.tcbCfg, now, iss)
	s.conns[c.key] = c
	return c, syn, nil
}

// refuseLocked says why the stack takes no new conn, if it does not.
func (s *Stack) refuseLocked() error {
	switch {
	case s.closed.Load():
		return fmt.Errorf("%w: the stack is closed", ErrClosed)
	case s.failed != nil:
		return fmt.Errorf("%w: the device failed: %v", ErrClosed, s.failed)
	case len(s.conns) >= maxConns:
		return fmt.Errorf("the stack holds its most conns, %d", maxConns)
	}
	return nil
}

// freePortLocked picks a random port of ports that no listener has and
// no conn to remote uses.
func (s *Stack) freePortLocked(remote netip.AddrPort, ports PortRange) (uint16, bool) {
	span := uint32(ports.Len())
	start := s.random() % span
	for i := range span {
		port := uint16(uint32(ports.First) + (start+i)%span)
		if _, ok := s.listeners[port]; ok {
			continue
		}
		if _, ok := s.conns[fourTuple{remote, port}]; ok {
			continue
		}
		return port, true
	}
	return 0, false
}

// newConn makes a conn for the 4-tuple, whose IPv6 packets carry
// flowLabel and whose IPv4 IDs count up from ipID; the caller sets its
// tcb.
func (s *Stack) newConn(remote netip.AddrPort, localPort uint16, l *Listener, flowLabel uint32, ipID uint16) *Conn {
	c := &Conn{
		stack:       s,
		key:         fourTuple{remote, localPort},
		hdr:         newHeaders(netip.AddrPortFrom(s.cfg.Local, localPort), remote, flowLabel),
		listener:    l,
		established: make(chan struct{}),
		done:        make(chan struct{}),
	}
	c.ipID.Store(uint32(ipID))
	return c
}

// Listen accepts connections to Local:port. It answers each SYN with one
// SYN-ACK whose ISN is a SYN cookie, keeps nothing, and never sends it
// again (the peer's SYN, sent again, gets one answer each time). The
// peer's ACK that returns the cookie, or its first data segment when
// that ACK was lost, opens the conn, which waits for Accept.
func (s *Stack) Listen(port uint16) (*Listener, error) {
	if port == 0 {
		return nil, errors.New("faketcp: listen: port 0")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() || s.failed != nil {
		return nil, fmt.Errorf("faketcp: listen on port %d: %w", port, ErrClosed)
	}
	if _, ok := s.listeners[port]; ok {
		return nil, fmt.Errorf("faketcp: listen on port %d: already listening", port)
	}
	l := &Listener{
		stack:  s,
		port:   port,
		queue:  make(chan *Conn, acceptQueue),
		closed: make(chan struct{}),
	}
	s.listeners[port] = l
	return l, nil
}

// forget removes c from the table, unless another conn took its 4-tuple.
func (s *Stack) forget(c *Conn) {
	s.mu.Lock()
	if s.conns[c.key] == c {
		delete(s.conns, c.key)
	}
	s.mu.Unlock()
}

// buildControl writes the segment without payload that e describes, with
// hd's headers, into the end of buf (controlBufSize bytes), and returns
// the packet.
func (s *Stack) buildControl(buf []byte, hd *headers, e emit, ipID uint16) []byte {
	buf = buf[:controlBufSize]
	fields := tcpFields{seq: e.seq, ack: e.ack, flags: e.flags, window: s.cfg.Window}
	if e.flags&flagRST != 0 {
		fields.window = 0 // as Linux sends its RSTs
	}
	var opts []byte
	var o synOptions
	if e.synOptions {
		o = makeSYNOptions(uint16(s.cfg.MSS), e.windowScale, e.sackPermitted)
		opts = o.buf[:o.n]
	}
	start := hd.put(buf, controlBufSize, fields, opts, ipID)
	return buf[start:]
}

// writeControl sends e for c at once, outside any batch: Dial's SYN,
// Close's FIN. It allocates.
func (s *Stack) writeControl(c *Conn, e emit) {
	if e.flags == 0 {
		return
	}
	pkt := s.buildControl(make([]byte, controlBufSize), &c.hdr, e, c.nextIPID())
	c.counters.controlSent.Add(1)
	if _, err := s.dev.Write([][]byte{pkt}, 0); err != nil {
		s.counters.writeErrors.Add(1)
		s.log.Debug("faketcp: writing a segment failed", "conn", c, "err", err)
	}
}

// runReader is the reader goroutine: it reads batches of packets and runs
// each through the stack, until Close or the device's end.
func (s *Stack) runReader() {
	defer close(s.readerDone)
	for {
		var n int
		var err error
		if s.off != nil {
			n, err = s.off.ReadOffload(s.rx.bufs, s.rx.sizes, Headroom)
		} else {
			n, err = s.dev.Read(s.rx.bufs, s.rx.sizes, Headroom)
		}
		if s.closed.Load() {
			return
		}
		if n > 0 {
			s.processBatch(n, time.Now())
		}
		if s.pause.on.Load() {
			if !s.park() {
				return
			}
			continue
		}
		switch {
		case err == nil, errors.Is(err, os.ErrDeadlineExceeded):
		case errors.Is(err, net.ErrClosed), errors.Is(err, os.ErrClosed), errors.Is(err, io.EOF):
			if !s.closed.Load() {
				s.fail(err)
			}
			return
		default:
			s.counters.readErrors.Add(1)
			s.log.Warn("faketcp: reading the device failed", "err", err)
			select {
			case <-s.quit:
				return
			case <-time.After(readRetry):
			}
		}
	}
}

// fail ends every conn after the device's Read reported its end.
func (s *Stack) fail(err error) {
	s.log.Warn("faketcp: the device is gone; ending every connection", "err", err)
	s.mu.Lock()
	s.failed = err
	conns := make([]*Conn, 0, len(s.conns))
	for _, c := range s.conns {
		conns = append(conns, c)
	}
	clear(s.conns)
	s.mu.Unlock()
	for _, c := range conns {
		c.closeWith(fmt.Errorf("%w: the device failed: %v", ErrClosed, err))
	}
}

// processBatch runs the n packets in s.rx.bufs, received at now, through
// the stack: handlers get their conns' payloads, replies go out in one
// Write, then Dial and Accept learn of completed handshakes.
func (s *Stack) processBatch(n int, now time.Time) {
	rx := &s.rx
	for k := range n {
		s.receivePacket(k, now)
	}
	s.flushPending()
	if len(rx.replies) > 0 {
		if _, err := s.dev.Write(rx.replies, 0); err != nil {
			s.counters.writeErrors.Add(1)
			s.log.Debug("faketcp: writing replies failed", "err", err)
		}
		clear(rx.replies)
		rx.replies = rx.replies[:0]
	}
	for _, c := range rx.established {
		s.announce(c)
	}
	clear(rx.established)
	rx.established = rx.established[:0]
}

// receivePacket runs the packet in s.rx.bufs[k] through the stack. With
// offloads its virtio-net header lies just before it, and it may be a
// super-segment, which runs through as the segments it stands for, each
// delivered where it lies.
func (s *Stack) receivePacket(k int, now time.Time) {
	rx := &s.rx
	buf := rx.bufs[k]
	size := min(max(rx.sizes[k], 0), len(buf)-Headroom)
	pkt := buf[Headroom : Headroom+size]
	var h tun.VirtioNetHdr
	if s.off != nil {
		_ = h.Decode(buf[Headroom-tun.VirtioNetHdrLen : Headroom])
	}
	var in inbound
	if !s.counted(parseTrusted(pkt, s.cfg.Local, s.cfg.Local.Is4(), &in, h.ChecksumTrusted())) {
		return
	}
	if !h.IsGSO() {
		s.receiveSegment(buf, Headroom+in.payloadOff, &in, now, nil)
		return
	}
	cut, err := tun.SplitTCP(&h, pkt)
	if err != nil || cut.TCPOffset() != in.tcpOff || cut.HeaderLen() != in.payloadOff {
		s.counters.malformed.Add(1)
		return
	}
	s.counters.superSegments.Add(1)
	flags := in.seg.flags
	var c *Conn // the segments' conn, looked up once
	for i := range cut.Segments() {
		start, end, seq := cut.Segment(i)
		in.seg.seq, in.seg.payloadLen, in.seg.flags = seq, end-start, cut.SegmentFlags(i, flags)
		c = s.receiveSegment(buf, Headroom+start, &in, now, c)
	}
}

// counted counts a packet that parsing refused, and reports whether it
// did not.
func (s *Stack) counted(v verdictIP) bool {
	switch v {
	case packetMalformed:
		s.counters.malformed.Add(1)
	case packetNotTCP:
		s.counters.notTCP.Add(1)
	case packetNotLocal:
		s.counters.notLocal.Add(1)
	case packetBadChecksum:
		s.counters.badChecksum.Add(1)
	}
	return v == packetOK
}

// receiveSegment runs the segment in (its payload at buf[payloadOff:])
// through its conn's state machine, or the listener's, and queues what
// it delivers and what it answers. c, if not nil, is the segment's conn,
// which the caller looked up for an earlier segment of the same
// super-segment; receiveSegment returns the conn for the next one, nil
// if it is to be looked up again.
func (s *Stack) receiveSegment(buf []byte, payloadOff int, in *inbound, now time.Time, c *Conn) *Conn {
	rx := &s.rx
	key := fourTuple{netip.AddrPortFrom(in.src, in.seg.srcPort), in.seg.dstPort}
	if c == nil {
		s.mu.Lock()
		c = s.conns[key]
		s.mu.Unlock()
	}
	opened := false
	if c == nil {
		if c = s.receiveUnknown(key, &in.seg, now); c == nil {
			return nil
		}
		opened = true // by a cookie: the segment is the conn's first
	}

	c.mu.Lock()
	v := c.tcb.receive(now, &in.seg)
	if v.established {
		c.sendMSS = int(c.tcb.peerMSS) // before Dial or Accept hands c out
	}
	c.mu.Unlock()
	if in.seg.payloadLen == 0 {
		c.counters.controlReceived.Add(1)
	}
	switch v.drop {
	case dropOversize:
		c.counters.droppedOversize.Add(1)
	case dropAfterClose:
		c.counters.droppedAfterClose.Add(1)
	case dropUnacceptable:
		c.counters.droppedUnacceptable.Add(1)
	}
	if v.reply.flags != 0 {
		s.addReply(&c.hdr, v.reply, c.nextIPID())
		c.counters.controlSent.Add(1)
	}
	if v.deliver {
		// A conn's payloads go to its handler together; a full batch
		// goes at once, so that a batch of super-segments never makes
		// pending grow.
		if rx.pendingConn != c || len(rx.pending) == cap(rx.pending) {
			s.flushPending()
			rx.pendingConn = c
		}
		rx.pending = append(rx.pending, Payload{Buf: buf, Off: payloadOff, N: in.seg.payloadLen})
	}
	if v.established || opened {
		rx.established = append(rx.established, c)
	}
	if v.ended {
		c.finish()
	}
	if v.remove || v.reopen {
		s.forget(c)
	}
	if v.reopen {
		c.mu.Lock()
		_, ended, _ := c.tcb.close(now, fmt.Errorf("%w: the peer opened the connection again", ErrReset))
		c.mu.Unlock()
		if ended {
			c.finish()
		}
		s.receiveUnknown(key, &in.seg, now) // a SYN: it opens nothing
	}
	if v.remove || v.reopen {
		return nil
	}
	return c
}

// receiveUnknown handles a segment for no conn. To a listener, a SYN is
// answered with a SYN cookie, and a segment with ACK (no SYN, no RST)
// that returns a valid cookie opens a conn, which it returns for the
// segment to be received by. An RST is ignored. Anything else, a bad
// cookie among it, is answered with an RST, as a real stack does (RFC
// 9293 §3.10.7.1; a peer that kept a conn across our restart learns so).
// Toward an address that has not returned a cookie it sends one segment
// for each segment, and keeps nothing.
func (s *Stack) receiveUnknown(key fourTuple, seg *segment, now time.Time) *Conn {
	s.mu.Lock()
	l := s.listeners[key.localPort]
	refuse, full := s.refuseLocked(), len(s.conns) >= maxConns
	s.mu.Unlock()
	if l != nil {
		switch seg.flags & (flagSYN | flagACK | flagRST) {
		case flagSYN:
			switch {
			case full:
				s.counters.tableFull.Add(1)
			case refuse == nil:
				s.answerSYN(key, seg, now)
			}
			return nil
		case flagACK:
			if c := s.openByCookie(l, key, seg, now); c != nil {
				return c
			}
		}
	}
	reset := resetFor(seg)
	if reset.flags == 0 {
		s.counters.ignoredRST.Add(1)
		return nil
	}
	s.counters.refused.Add(1)
	hd := newHeaders(netip.AddrPortFrom(s.cfg.Local, key.localPort), key.remote, 0)
	s.addReply(&hd, reset, 0)
	return nil
}

// answerSYN answers syn, for a listener, with a SYN-ACK whose ISN is a
// cookie, and keeps nothing.
func (s *Stack) answerSYN(key fourTuple, syn *segment, now time.Time) {
	local := netip.AddrPortFrom(s.cfg.Local, key.localPort)
	ck := s.rx.cookies.make(now, local, key.remote, syn, s.tcbCfg.defaultPeerMSS)
	hd := newHeaders(local, key.remote, ck.flowLabel)
	s.addReply(&hd, synAckEmit(syn, ck.iss), ck.ipID)
	s.counters.synCookies.Add(1)
}

// openByCookie opens a conn for l if seg returns a valid cookie and the
// stack has room, and returns it, in the table; otherwise it counts why
// and returns nil, for seg to be answered with an RST.
func (s *Stack) openByCookie(l *Listener, key fourTuple, seg *segment, now time.Time) *Conn {
	ck, ok := s.rx.cookies.check(now, netip.AddrPortFrom(s.cfg.Local, key.localPort), key.remote, seg)
	if !ok {
		s.counters.badCookies.Add(1)
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.listeners[key.localPort] != l || s.conns[key] != nil {
		return nil // closed, or replaced, since receiveUnknown looked
	}
	if s.refuseLocked() != nil {
		if len(s.conns) >= maxConns {
			s.counters.tableFull.Add(1)
		}
		return nil
	}
	c := s.newConn(key.remote, key.localPort, l, ck.flowLabel, ck.ipID)
	c.tcb = newPassiveTCB(s.tcbCfg, now, ck, seg.seq-1)
	c.sendMSS = int(c.tcb.peerMSS)
	c.counters.controlReceived.Store(1) // the SYN
	c.counters.controlSent.Store(1)     // the SYN-ACK
	s.conns[key] = c
	return c
}

// addReply adds a segment without payload to the batch's replies.
func (s *Stack) addReply(hd *headers, e emit, ipID uint16) {
	rx := &s.rx
	k := len(rx.replies)
	if k == len(rx.replyBufs) {
		rx.replyBufs = append(rx.replyBufs, make([]byte, controlBufSize))
	}
	rx.replies = append(rx.replies, s.buildControl(rx.replyBufs[k], hd, e, ipID))
}

// flushPending hands the pending payloads to their conn's handler, or to
// the conn to keep until it has one.
func (s *Stack) flushPending() {
	rx := &s.rx
	c := rx.pendingConn
	if c == nil || len(rx.pending) == 0 {
		rx.pendingConn = nil
		return
	}
	c.receive(rx.pending)
	clear(rx.pending)
	rx.pending = rx.pending[:0]
	rx.pendingConn = nil
}

// announce tells Dial or the listener that c's handshake has completed.
func (s *Stack) announce(c *Conn) {
	if c.listener == nil {
		close(c.established)
		s.log.Debug("faketcp: connected", "conn", c)
		return
	}
	l := c.listener
	queued := false
	s.mu.Lock()
	if !l.closedLocked {
		select {
		case l.queue <- c:
			queued = true
		default:
		}
	}
	s.mu.Unlock()
	if queued {
		close(c.established)
		s.log.Debug("faketcp: accepted", "conn", c)
		return
	}
	s.counters.acceptQueueFull.Add(1)
	c.mu.Lock()
	rst, ended := c.tcb.abort(fmt.Errorf("%w: the listener's accept queue is full or closed", ErrClosed))
	c.mu.Unlock()
	if ended {
		c.finish()
	}
	s.forget(c)
	s.writeControl(c, rst)
}

// runTimer is the timer goroutine: every interval it runs each conn's
// timers, until Close.
func (s *Stack) runTimer() {
	defer close(s.timerDone)
	ticker := time.NewTicker(s.interval)
	defer ticker.Stop()
	for {
		select {
		case <-s.quit:
			return
		case <-ticker.C:
			s.pause.tick.Lock()
			if !s.pause.on.Load() {
				s.tickAll(time.Now())
			}
			s.pause.tick.Unlock()
		}
	}
}

// tickAll runs every conn's timers at now and sends what they ask for in
// one Write.
func (s *Stack) tickAll(now time.Time) {
	tx := &s.tx
	s.mu.Lock()
	for _, c := range s.conns {
		tx.conns = append(tx.conns, c)
	}
	s.mu.Unlock()
	for _, c := range tx.conns {
		c.mu.Lock()
		r := c.tcb.tick(now)
		c.mu.Unlock()
		if r.send.flags != 0 {
			k := len(tx.packets)
			if k == len(tx.bufs) {
				tx.bufs = append(tx.bufs, make([]byte, controlBufSize))
			}
			tx.packets = append(tx.packets, s.buildControl(tx.bufs[k], &c.hdr, r.send, c.nextIPID()))
			c.counters.controlSent.Add(1)
		}
		if r.ended {
			c.finish()
		}
		if r.remove {
			tx.removed = append(tx.removed, c)
		}
	}
	if len(tx.packets) > 0 {
		if _, err := s.dev.Write(tx.packets, 0); err != nil {
			s.counters.writeErrors.Add(1)
			s.log.Debug("faketcp: writing timer segments failed", "err", err)
		}
	}
	for _, c := range tx.removed {
		s.forget(c)
	}
	clear(tx.conns)
	clear(tx.packets)
	clear(tx.removed)
	tx.conns, tx.packets, tx.removed = tx.conns[:0], tx.packets[:0], tx.removed[:0]
}
