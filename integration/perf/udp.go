package perf

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/relay/relaytest"
)

// DatagramSize is the size of every datagram the blaster sends: an ESP
// packet as a tunnel of 1500-byte MTU carries it.
const DatagramSize = 1400

const (
	// maxGSOBytes is the most one UDP_SEGMENT send may carry (a UDP
	// datagram's 65,507 bytes, a whole number of segments).
	maxGSOBytes = 65507
	// socketBuffer is what the harness asks for its sockets' buffers, so
	// that what it counts as lost is lost on the path.
	socketBuffer = 8 << 20
	// pacingDebt caps how far the blaster may fall behind its rate: a
	// longer stall is not made up with one huge burst (the offered rate it
	// reports is then lower than asked, and says so).
	pacingDebt = 2 * time.Millisecond
)

// IOMode is how an endpoint moves datagrams through the kernel.
type IOMode struct {
	// Batch is how many messages one system call moves: 1 is one
	// sendto/recvfrom per message, more is sendmmsg/recvmmsg.
	Batch int
	// GSO sends up to 46 datagrams in one message (UDP_SEGMENT): the
	// kernel splits them as late as it can, on the wire or at the
	// receiving socket.
	GSO bool
	// GRO asks the kernel to hand the sink runs of datagrams as one
	// message (UDP_GRO), as they were sent, instead of splitting them.
	GRO bool
}

// String names the mode as the report shows it.
func (m IOMode) String() string {
	s := "sendto/recvfrom"
	if m.Batch > 1 {
		s = fmt.Sprintf("sendmmsg/recvmmsg x%d", m.Batch)
	}
	if m.GSO {
		s += " + GSO"
	}
	if m.GRO {
		s += " + GRO"
	}
	return s
}

func (m IOMode) batch() int { return max(m.Batch, 1) }

// segments is how many datagrams of size one GSO message carries.
func segments(size int) int { return max(maxGSOBytes/size, 1) }

// listenUDP opens a UDP socket bound to local inside ns with big buffers
// and, if reuse, SO_REUSEADDR (to share a port with a wildcard socket that
// also set it: a socket bound to a specific address then gets that
// address's datagrams).
func listenUDP(ns *lab.Namespace, local netip.AddrPort, reuse bool) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if reuse {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			}
			// Root may exceed net.core.[rw]mem_max; anyone else gets
			// what the sysctls allow.
			for _, o := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
				if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[0], socketBuffer) != nil {
					unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[1], socketBuffer)
				}
			}
		})
		return errors.Join(err, serr)
	}}
	var pc net.PacketConn
	err := ns.Do(func() (err error) {
		pc, err = lc.ListenPacket(context.Background(), "udp4", local.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("udp socket on %s in %s: %w", local, ns.Name, err)
	}
	return pc.(*net.UDPConn), nil
}

// setUDPOpt sets a SOL_UDP option on c.
func setUDPOpt(c *net.UDPConn, opt, value int) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_UDP, opt, value) }); err != nil {
		return err
	}
	return serr
}

func sockaddr4(a netip.AddrPort) unix.RawSockaddrInet4 {
	sa := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.Addr().As4()}
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], a.Port())
	return sa
}

// mmsg is the scratch of one batch system call.
type mmsg struct {
	hdrs []unix.Mmsghdr
	iovs []unix.Iovec
}

func newMmsg(n int) mmsg {
	m := mmsg{hdrs: make([]unix.Mmsghdr, n), iovs: make([]unix.Iovec, n)}
	for i := range m.hdrs {
		m.hdrs[i].Hdr.Iov = &m.iovs[i]
		m.hdrs[i].Hdr.SetIovlen(1)
	}
	return m
}

func (m *mmsg) set(i int, b []byte) {
	m.iovs[i].Base = &b[0]
	m.iovs[i].SetLen(len(b))
}

// Blaster sends ESP-shaped datagrams of one SPI, numbered, to one
// destination: paced at a rate, flat out, or one at a time for round
// trips. Its socket also receives what comes back.
type Blaster struct {
	conn *net.UDPConn
	raw  syscall.RawConn
	dst  netip.AddrPort
	mode IOMode
	size int
	spi  uint32
	seq  uint32
	// sent counts every datagram sent, for readers on other goroutines.
	sent atomic.Uint64

	bufs [][]byte // one per message: a datagram, or a GSO run of them
	msg  mmsg
	name unix.RawSockaddrInet4
	// send's state, so that the RawConn callback is made once.
	off, end int
	errno    syscall.Errno
	sendFn   func(fd uintptr) bool
}

// BlasterConfig configures NewBlaster.
type BlasterConfig struct {
	Local, Dst netip.AddrPort
	Mode       IOMode
	Size       int    // datagram size; DatagramSize if 0
	SPI        uint32 // the datagrams' SPI; 0xc9 if 0
	Reuse      bool   // SO_REUSEADDR (see listenUDP)
}

// NewBlaster opens the blaster's socket in ns.
func NewBlaster(ns *lab.Namespace, cfg BlasterConfig) (*Blaster, error) {
	if cfg.Size == 0 {
		cfg.Size = DatagramSize
	}
	if cfg.SPI == 0 {
		cfg.SPI = 0xc9
	}
	c, err := listenUDP(ns, cfg.Local, cfg.Reuse)
	if err != nil {
		return nil, err
	}
	return NewBlasterOn(c, cfg)
}

// NewBlasterOn makes a blaster of an open socket, which Close closes.
// cfg.Local and cfg.Reuse are not used.
func NewBlasterOn(c *net.UDPConn, cfg BlasterConfig) (*Blaster, error) {
	if cfg.Size == 0 {
		cfg.Size = DatagramSize
	}
	if cfg.SPI == 0 {
		cfg.SPI = 0xc9
	}
	var err error
	b := &Blaster{conn: c, dst: cfg.Dst, mode: cfg.Mode, size: cfg.Size, spi: cfg.SPI, name: sockaddr4(cfg.Dst)}
	if b.raw, err = c.SyscallConn(); err != nil {
		c.Close()
		return nil, err
	}
	per := cfg.Size
	if cfg.Mode.GSO {
		if err := setUDPOpt(c, unix.UDP_SEGMENT, cfg.Size); err != nil {
			c.Close()
			return nil, fmt.Errorf("UDP_SEGMENT: %w (the kernel has no UDP GSO)", err)
		}
		per = segments(cfg.Size) * cfg.Size
	}
	n := cfg.Mode.batch()
	b.msg = newMmsg(n)
	for i := range n {
		buf := make([]byte, per)
		for off := 0; off+cfg.Size <= per; off += cfg.Size {
			copy(buf[off:], relaytest.ESP(cfg.SPI, 0, cfg.Size))
		}
		b.bufs = append(b.bufs, buf)
		b.msg.hdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&b.name))
		b.msg.hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet4
	}
	b.sendFn = b.send
	return b, nil
}

// Close closes the socket.
func (b *Blaster) Close() error { return b.conn.Close() }

// Mode is the blaster's IOMode.
func (b *Blaster) Mode() IOMode { return b.mode }

// send is the RawConn.Write callback: it sends hdrs[off:end], going back
// to the netpoller when the socket's buffer is full.
func (b *Blaster) send(fd uintptr) bool {
	for b.off < b.end {
		var r uintptr
		var e syscall.Errno
		if b.mode.batch() == 1 {
			iov := b.iovOf(b.off)
			r, _, e = unix.Syscall6(unix.SYS_SENDTO, fd, uintptr(unsafe.Pointer(iov.Base)), uintptr(iov.Len), 0,
				uintptr(unsafe.Pointer(&b.name)), unix.SizeofSockaddrInet4)
			if e == 0 {
				r = 1
			}
		} else {
			r, _, e = unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&b.msg.hdrs[b.off])), uintptr(b.end-b.off), 0, 0, 0)
		}
		switch e {
		case 0:
			b.off += int(r)
		case unix.EINTR:
		case unix.EAGAIN, unix.ENOBUFS:
			return false
		case unix.ECONNREFUSED:
			// An ICMP error for an earlier datagram: nobody listens
			// yet. The datagram in hand is what is lost.
			b.off++
		default:
			b.errno = e
			return true
		}
	}
	return true
}

func (b *Blaster) iovOf(i int) *unix.Iovec { return &b.msg.iovs[i] }

// Send sends n datagrams (at most Capacity) at once.
func (b *Blaster) Send(n int) error { return b.sendN(min(n, b.capacity())) }

// Capacity is the most datagrams one Send moves: a batch of messages,
// each a GSO run of datagrams in GSO mode.
func (b *Blaster) Capacity() int { return b.capacity() }

// sendN sends n datagrams, numbered on from b.seq.
func (b *Blaster) sendN(n int) error {
	per := 1
	if b.mode.GSO {
		per = segments(b.size)
	}
	total := n
	k := 0
	for n > 0 && k < len(b.bufs) {
		m := min(n, per)
		buf := b.bufs[k][:m*b.size]
		for off := 0; off < len(buf); off += b.size {
			b.seq++
			binary.BigEndian.PutUint32(buf[off+4:], b.seq)
		}
		b.msg.set(k, buf)
		n -= m
		k++
	}
	b.off, b.end, b.errno = 0, k, 0
	if err := b.raw.Write(b.sendFn); err != nil {
		return err
	}
	if b.errno != 0 {
		return fmt.Errorf("send to %s: %w", b.dst, b.errno)
	}
	b.sent.Add(uint64(total - n))
	return nil
}

// Sent is how many datagrams the blaster has sent so far.
func (b *Blaster) Sent() uint64 { return b.sent.Load() }

// capacity is the most datagrams one sendN moves.
func (b *Blaster) capacity() int {
	if b.mode.GSO {
		return len(b.bufs) * segments(b.size)
	}
	return len(b.bufs)
}

// Blast sends for d at rate datagrams a second (flat out if rate is 0),
// and returns how many it sent and how long that took.
func (b *Blaster) Blast(ctx context.Context, rate float64, d time.Duration) (sent int, took time.Duration, err error) {
	start := time.Now()
	end := start.Add(d)
	step := b.capacity()
	debt := int(rate * pacingDebt.Seconds())
	scheduled := 0 // datagrams the pace has called for so far
	for {
		now := time.Now()
		if !now.Before(end) || ctx.Err() != nil {
			break
		}
		n := step
		if rate > 0 {
			due := int(rate*now.Sub(start).Seconds()) - scheduled
			if due > debt+step {
				// Fallen behind: forgive what one burst would not fix.
				scheduled += due - debt - step
				due = debt + step
			}
			if due <= 0 {
				time.Sleep(time.Duration(float64(time.Second) / rate * float64(1-due)))
				continue
			}
			n = min(due, step)
		}
		if err := b.sendN(n); err != nil {
			return sent, time.Since(start), err
		}
		sent += n
		scheduled += n
	}
	return sent, time.Since(start), nil
}

// ExchangeIKE sends an IKE_SA_INIT request for ispi until the answer comes
// back (every 200 ms, at most for d): that opens a session through an
// iketcp path.
func (b *Blaster) ExchangeIKE(ispi uint64, d time.Duration) error {
	req := relaytest.Init(ispi)
	buf := make([]byte, 2048)
	deadline := time.Now().Add(d)
	var h framing.IKEHeader
	for time.Now().Before(deadline) {
		if _, err := b.conn.WriteToUDPAddrPort(req, b.dst); err != nil && !isRefused(err) {
			return err
		}
		b.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		for {
			n, _, err := b.conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				break
			}
			if n > framing.MarkerSize && binary.BigEndian.Uint32(buf) == 0 &&
				h.Decode(buf[framing.MarkerSize:n]) == nil && h.IsInitResponse() && h.InitiatorSPI == ispi {
				b.conn.SetReadDeadline(time.Time{})
				return nil
			}
		}
	}
	b.conn.SetReadDeadline(time.Time{})
	return fmt.Errorf("no IKE_SA_INIT response through the path to %s within %v", b.dst, d)
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

// RTTs holds the round trips of a ping-pong.
type RTTs struct {
	Sorted []time.Duration
	Lost   int
}

// Quantile returns the q-quantile (0..1) of the round trips, 0 if none.
func (r RTTs) Quantile(q float64) time.Duration {
	if len(r.Sorted) == 0 {
		return 0
	}
	return r.Sorted[min(int(q*float64(len(r.Sorted))), len(r.Sorted)-1)]
}

// PingPong sends n datagrams one at a time, each after the previous one
// came back (or was given up after timeout), and returns the round trips.
func (b *Blaster) PingPong(ctx context.Context, n int, timeout time.Duration) (RTTs, error) {
	pkt := relaytest.ESP(b.spi^0x77, 0, b.size)
	buf := make([]byte, 65536)
	var out RTTs
	defer b.conn.SetReadDeadline(time.Time{})
	for i := range n {
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		binary.BigEndian.PutUint32(pkt[4:], uint32(i+1))
		start := time.Now()
		if _, err := b.conn.WriteToUDPAddrPort(pkt, b.dst); err != nil && !isRefused(err) {
			return out, err
		}
		b.conn.SetReadDeadline(start.Add(timeout))
		for {
			m, _, err := b.conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				out.Lost++
				break
			}
			if m == len(pkt) && binary.BigEndian.Uint32(buf[4:]) == uint32(i+1) {
				out.Sorted = append(out.Sorted, time.Since(start))
				break
			}
		}
	}
	sortDurations(out.Sorted)
	return out, nil
}

// Sink receives datagrams and counts them; on request it answers
// IKE_SA_INIT requests as an IKE daemon would, and echoes ESP back.
type Sink struct {
	conn *net.UDPConn
	mode IOMode

	answerIKE bool
	echoTo    netip.AddrPort // the echo's destination; zero: the sender

	echo      atomic.Bool
	datagrams atomic.Uint64 // ESP datagrams received (GRO runs counted by segment)
	messages  atomic.Uint64 // messages the kernel handed up
	answered  atomic.Uint64 // IKE_SA_INIT requests answered

	progress chan struct{} // signalled after each batch received

	wg sync.WaitGroup
}

// SinkConfig configures NewSink.
type SinkConfig struct {
	Local     netip.AddrPort
	Mode      IOMode
	AnswerIKE bool           // answer IKE_SA_INIT requests (the backend of an iketcp server)
	EchoTo    netip.AddrPort // where echoes go; zero means back to the sender
	Reuse     bool           // SO_REUSEADDR (see listenUDP)
}

// NewSink opens the sink's socket in ns and starts receiving; Close stops
// it.
func NewSink(ns *lab.Namespace, cfg SinkConfig) (*Sink, error) {
	c, err := listenUDP(ns, cfg.Local, cfg.Reuse)
	if err != nil {
		return nil, err
	}
	return NewSinkOn(c, cfg)
}

// NewSinkOn makes a sink of an open socket, which Close closes.
// cfg.Local and cfg.Reuse are not used.
func NewSinkOn(c *net.UDPConn, cfg SinkConfig) (*Sink, error) {
	if cfg.Mode.GRO {
		if err := setUDPOpt(c, unix.UDP_GRO, 1); err != nil {
			c.Close()
			return nil, fmt.Errorf("UDP_GRO: %w (the kernel has no UDP GRO)", err)
		}
	}
	s := &Sink{conn: c, mode: cfg.Mode, answerIKE: cfg.AnswerIKE, echoTo: cfg.EchoTo, progress: make(chan struct{}, 1)}
	raw, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, err
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.receiveLoop(raw)
	}()
	return s, nil
}

// Close stops the sink and waits for its goroutine.
func (s *Sink) Close() error {
	err := s.conn.Close()
	s.wg.Wait()
	return err
}

// Datagrams is how many ESP datagrams the sink has received.
func (s *Sink) Datagrams() uint64 { return s.datagrams.Load() }

// Messages is how many messages the kernel handed the sink (with GRO, a
// message may hold many datagrams).
func (s *Sink) Messages() uint64 { return s.messages.Load() }

// Answered is how many IKE_SA_INIT requests the sink has answered.
func (s *Sink) Answered() uint64 { return s.answered.Load() }

// Progress is signalled (without blocking the sink: signals coalesce)
// after each batch the sink receives, for a sender that waits for room.
func (s *Sink) Progress() <-chan struct{} { return s.progress }

// SetEcho turns echoing on or off.
func (s *Sink) SetEcho(on bool) { s.echo.Store(on) }

// receiveLoop is the sink's goroutine: it reads until the socket closes.
func (s *Sink) receiveLoop(raw syscall.RawConn) {
	n := s.mode.batch()
	bufSize := 2048
	if s.mode.GRO {
		bufSize = 65536
	}
	msg := newMmsg(n)
	bufs := make([][]byte, n)
	names := make([]unix.RawSockaddrInet4, n)
	oob := make([][]byte, n)
	for i := range n {
		bufs[i] = make([]byte, bufSize)
		msg.set(i, bufs[i])
		oob[i] = make([]byte, unix.CmsgSpace(4))
		msg.hdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&names[i]))
	}
	var got int
	var errno syscall.Errno
	recv := func(fd uintptr) bool {
		for i := range n {
			h := &msg.hdrs[i].Hdr
			h.Namelen = unix.SizeofSockaddrInet4
			h.Control = &oob[i][0]
			h.SetControllen(len(oob[i]))
			h.Flags = 0
		}
		for {
			r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&msg.hdrs[0])), uintptr(n), 0, 0, 0)
			switch e {
			case 0:
				got, errno = int(r), 0
				return true
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false
			default:
				got, errno = 0, e
				return true
			}
		}
	}
	var h framing.IKEHeader
	for {
		if err := raw.Read(recv); err != nil {
			return // closed
		}
		if errno != 0 {
			if errno == unix.ECONNREFUSED {
				continue // an echo found nobody listening
			}
			return
		}
		s.messages.Add(uint64(got))
		for i := range got {
			size := int(msg.hdrs[i].Len)
			p := bufs[i][:size]
			from := netip.AddrPortFrom(netip.AddrFrom4(names[i].Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&names[i].Port))[:]))
			if size >= framing.MarkerSize+framing.IKEHeaderSize && binary.BigEndian.Uint32(p) == 0 {
				if s.answerIKE && h.Decode(p[framing.MarkerSize:]) == nil && h.IsInitRequest() {
					s.conn.WriteToUDPAddrPort(relaytest.InitResponse(h.InitiatorSPI), from)
					s.answered.Add(1)
				}
				continue
			}
			if size < 8 {
				continue // keepalives
			}
			seg := size
			if s.mode.GRO {
				if g := groSize(oob[i][:msg.hdrs[i].Hdr.Controllen]); g > 0 {
					seg = g
				}
			}
			s.datagrams.Add(uint64((size + seg - 1) / seg))
			if s.echo.Load() {
				to := s.echoTo
				if !to.IsValid() {
					to = from
				}
				for off := 0; off < size; off += seg {
					s.conn.WriteToUDPAddrPort(p[off:min(off+seg, size)], to)
				}
			}
		}
		select {
		case s.progress <- struct{}{}:
		default:
		}
	}
}

// groSize reads the segment size of a UDP_GRO control message, 0 if none.
// It parses by hand: unix.ParseSocketControlMessage allocates.
func groSize(oob []byte) int {
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		if h.Len < unix.SizeofCmsghdr || int(h.Len) > len(oob) {
			return 0
		}
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && h.Len >= unix.SizeofCmsghdr+4 {
			return int(*(*int32)(unsafe.Pointer(&oob[unix.SizeofCmsghdr])))
		}
		next := (int(h.Len) + 7) &^ 7
		if next >= len(oob) {
			return 0
		}
		oob = oob[next:]
	}
	return 0
}

func sortDurations(d []time.Duration) { slices.Sort(d) }
