// Package udpbatch is the relay's socket layer: it owns every datagram that
// iketcp reads from or writes to its UDP sockets, and moves them in batches.
//
// On Linux a batch is one recvmmsg(2) or sendmmsg(2) system call, issued
// through the *net.UDPConn's syscall.RawConn so that the Go netpoller still
// does the waiting, and the UDPConn's deadlines and Close keep working as
// they do for the net package. Elsewhere, or when the kernel refuses the
// batch system calls (for example under a seccomp profile that does not allow
// them), a Conn moves one datagram per system call with ReadMsgUDPAddrPort and
// WriteMsgUDPAddrPort; it says so once through Options.Logger, and
// Conn.Fallback reports why.
//
// Where the kernel has UDP generic segmentation offload (UDP_SEGMENT,
// Linux 4.18), WriteBatch sends each run of equal-sized datagrams to one
// destination as one segmentation-offload send, within the same
// sendmmsg: the kernel walks its output path once per run rather than
// once per datagram, and the datagrams arrive one by one as before. If
// the kernel refuses (EIO: a way out without checksum offload), the Conn
// says so once and sends datagram by datagram from then on.
//
// On request (Options.GRO), and where the kernel has UDP generic receive
// offload (UDP_GRO, Linux 5.0), the kernel may queue a run of equal-sized
// datagrams from one sender as one coalesced message: a peer's
// segmentation-offload send over loopback or a veth arrives whole, and
// on a network device the kernel's receive offload may coalesce a run
// that came in datagram by datagram. The Conn reads
// such messages into buffers of its own and splits them, so ReadBatch
// still returns one datagram per Message; what does not fit in the
// caller's batch waits in the Conn for the next call. Conn.GRO reports
// whether it is on.
//
// Neither ReadBatch nor WriteBatch allocates in steady state: the system-call
// scratch (mmsghdr, iovec and sockaddr arrays) is made once and reused, and
// the datagram buffers belong to the caller (with GRO, the Conn's receive
// buffers are made on the first read and reused).
//
// Addresses are netip.AddrPort values. Reads return IPv4 peers in their
// unmapped form even on an IPv6 (dual-stack) socket, so a map keyed by
// AddrPort has one key per peer. Writes accept IPv4 destinations on an IPv6
// socket and map them to ::ffff:a.b.c.d; an IPv6 destination on an IPv4 socket
// is refused with an *AddrError that unwraps to ErrAddressFamily.
package udpbatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

const (
	// DefaultBatchSize is the batch size of a Conn whose Options leave
	// BatchSize zero.
	DefaultBatchSize = 64
	// MaxBatchSize is the largest batch one system call moves; it is the
	// kernel's UIO_MAXIOV, which caps the vlen of recvmmsg and sendmmsg.
	MaxBatchSize = 1024
)

// Message is one datagram of a batch.
type Message struct {
	// Buf on read is the space to fill: its len is the capacity used, so
	// pass Buf[:cap(Buf)] to offer all of it. On write it is the datagram.
	// Buf stays the caller's: a Conn keeps no reference to it once the call
	// that was given it has returned.
	Buf []byte
	// N is, on read, the number of bytes received into Buf. It is never more
	// than len(Buf); see Truncated.
	N int
	// Addr is, on read, the sender (IPv4 peers unmapped). On write it is the
	// destination: leave it zero on a connected socket.
	Addr netip.AddrPort
	// Truncated is set on read when the datagram was longer than Buf: the
	// kernel discarded the rest, N is len(Buf), and Buf holds only the
	// datagram's first N bytes. The relay should drop such a datagram rather
	// than forward a piece of it. Each one is also counted by
	// Conn.Truncated. On systems whose read path cannot tell (Windows), a
	// truncated datagram is instead an error from ReadBatch.
	Truncated bool
}

// Options configures a Conn. The zero value is valid.
type Options struct {
	// BatchSize is the most datagrams one system call reads: 0 means
	// DefaultBatchSize, and values above MaxBatchSize are lowered to it.
	// One system call sends as many, or 64 where BatchSize is smaller
	// (the send scratch of such Conns is shared: see WriteBatch).
	BatchSize int
	// Logger, if not nil, is told once when the Conn has to fall back to one
	// datagram per system call, and once when GRO was asked for and the
	// kernel refuses it.
	Logger *slog.Logger
	// GRO asks for UDP generic receive offload (UDP_GRO, Linux 5.0): the
	// kernel may then hand over a run of equal-sized datagrams from one
	// sender as one message, walking its receive path once per run rather
	// than once per datagram. The Conn splits the message and copies each
	// datagram into a Message of the caller's: ReadBatch and TryReadBatch
	// return one datagram per Message as without it.
	//
	// It costs 512 KiB per Conn: 8 receive buffers of 64 KiB (a coalesced
	// message must be read whole, or the kernel drops its tail), made on
	// the first read. One system call then reads at most 8 messages, and
	// every datagram is copied once more, so it pays off for peers that
	// send runs (segmentation offload, as WriteBatch does) and costs
	// batch size for peers that do not: leave it off for those.
	//
	// New probes it: where the kernel refuses it (before Linux 5.0), the
	// Conn reads as without it and says so once through Logger. It needs
	// the batch system calls, and is off on a Conn that falls back, and on
	// systems other than Linux. Conn.GRO reports whether it is on.
	GRO bool

	// forceFallback makes New skip the batch system calls; tests set it to
	// run the portable path on Linux.
	forceFallback bool
	// failGSO makes the kernel's answer to every segmentation-offload
	// send EIO, as a device without checksum offload gives; tests set it
	// to run the way back to datagram by datagram.
	failGSO bool
	// failGRO makes New take the kernel's answer to UDP_GRO to be
	// ENOPROTOOPT, as a kernel before 5.0 gives; tests set it to run the
	// way without receive offload.
	failGRO bool
}

// Conn moves batches of datagrams over one *net.UDPConn.
//
// ReadBatch calls are serialised by rmu; WriteBatch calls run in parallel,
// each on scratch of its own. Everything else is set in New and only read
// afterwards, or is atomic.
type Conn struct {
	// Set in New, read-only afterwards.
	uc        *net.UDPConn
	laddr     net.Addr
	batch     int
	log       *slog.Logger
	v4only    bool           // the socket is AF_INET: IPv6 destinations are refused
	connected bool           // the socket has a peer: Message.Addr must be zero or that peer
	raddr     netip.AddrPort // the connected peer, unmapped
	failGSO   bool           // tests: Options.failGSO

	// fallback is nil while the batch system calls are in use. Once it is
	// set it stays set, and every call moves one datagram per system call.
	fallback atomic.Pointer[UnsupportedError]

	// truncated counts datagrams delivered with Message.Truncated set.
	truncated atomic.Uint64
	// coalesced counts messages read that held more than one datagram.
	coalesced atomic.Uint64
	// sendCalls counts sendmmsg calls, for tests.
	sendCalls atomic.Uint64
	// leftover is set while datagrams of coalesced messages already read
	// wait for the next ReadBatch; it is written with rmu held, and read
	// without it by WaitRead.
	leftover atomic.Bool

	// rmu is held for the whole of a ReadBatch; it guards the receive
	// scratch and the leftover datagrams in sys.
	rmu sync.Mutex

	// sys is the platform's batch state (udpbatch_linux.go,
	// udpbatch_other.go).
	sys sysConn
}

// New wraps c. Deadlines are set on c as usual, and closing c (directly or
// through Conn.Close) makes a blocked ReadBatch or WriteBatch return an error
// that is net.ErrClosed. Do not read from c other than through the Conn.
//
// New probes the batch system calls once; if the kernel refuses them the
// Conn falls back to one datagram per system call, logs that once through
// opts.Logger, and Fallback reports why.
func New(c *net.UDPConn, opts Options) *Conn {
	batch := opts.BatchSize
	switch {
	case batch <= 0:
		batch = DefaultBatchSize
	case batch > MaxBatchSize:
		batch = MaxBatchSize
	}
	bc := &Conn{uc: c, laddr: c.LocalAddr(), batch: batch, log: opts.Logger, failGSO: opts.failGSO}
	if ua, ok := bc.laddr.(*net.UDPAddr); ok {
		// Go reports the local address of an AF_INET socket as a 4-byte
		// IP and that of an AF_INET6 socket as a 16-byte one, even when
		// it is bound to [::]. The Linux probe asks the kernel instead.
		bc.v4only = len(ua.IP) == net.IPv4len
	}
	if ra, ok := c.RemoteAddr().(*net.UDPAddr); ok && ra != nil {
		bc.connected = true
		bc.raddr = unmap(ra.AddrPort())
	}
	var why *UnsupportedError
	if opts.forceFallback {
		why = &UnsupportedError{Err: errForced}
	} else {
		why = bc.initSys(opts)
	}
	if why != nil {
		bc.disable(why)
	}
	return bc
}

// BatchSize is the most datagrams one ReadBatch returns and one system call
// sends.
func (c *Conn) BatchSize() int { return c.batch }

// UDPConn returns the socket the Conn moves datagrams over.
func (c *Conn) UDPConn() *net.UDPConn { return c.uc }

// Close closes the underlying UDPConn; blocked calls return net.ErrClosed.
func (c *Conn) Close() error { return c.uc.Close() }

// BatchSize, UDPConn, Fallback, Truncated, Coalesced, GSO and GRO are safe
// for concurrent use.

// Fallback returns nil while the Conn uses the batch system calls, and
// otherwise an *UnsupportedError saying why it moves one datagram per
// system call.
func (c *Conn) Fallback() error {
	if why := c.fallback.Load(); why != nil {
		return why
	}
	return nil
}

// Truncated returns how many datagrams have been delivered with
// Message.Truncated set since New.
func (c *Conn) Truncated() uint64 { return c.truncated.Load() }

// Coalesced returns how many messages holding more than one datagram the
// Conn has read and split since New; it stays 0 without GRO.
func (c *Conn) Coalesced() uint64 { return c.coalesced.Load() }

// ReadBatch blocks until at least one datagram has arrived, then fills
// msgs[:n] with as many as are queued, up to min(len(msgs), BatchSize()).
// It sets N, Addr and Truncated of each filled Message and leaves msgs[n:]
// alone. With len(msgs) == 0 it returns 0, nil at once.
//
// It honours the UDPConn's read deadline: past it, the error is (wraps)
// os.ErrDeadlineExceeded. After Close it is net.ErrClosed. On a fallback
// Conn, n is at most 1.
//
// With GRO, datagrams of a coalesced message that did not fit in msgs are
// kept for the next call, which returns them (and only them) without a
// system call, so past the deadline or after Close; their order is
// the order of arrival.
//
// ReadBatch calls are serialised: one reader at a time. To read in parallel,
// open several sockets (SO_REUSEPORT) and give each its own Conn.
func (c *Conn) ReadBatch(msgs []Message) (n int, err error) { return c.readBatch(msgs, false) }

// TryReadBatch is ReadBatch without the wait: with nothing queued it
// returns 0 and no error at once. A reader that takes its buffers from a
// pool only while there is something to read calls WaitRead, takes them,
// and calls TryReadBatch until it returns less than a full batch. On a
// fallback Conn it waits, as ReadBatch does.
func (c *Conn) TryReadBatch(msgs []Message) (n int, err error) { return c.readBatch(msgs, true) }

// WaitRead blocks until a datagram (or a pending error) is queued, or the
// read deadline passes, or the Conn is closed (an error that is
// net.ErrClosed). It reads nothing. On a fallback Conn, and while the Conn
// keeps datagrams of a coalesced message for the next read, it returns
// at once.
func (c *Conn) WaitRead() error {
	if c.fallback.Load() != nil || c.leftover.Load() {
		return nil
	}
	return c.waitReadSys()
}

// StopGRO turns receive offload off, for a Conn whose peers turn out to
// send no runs: each datagram would only be copied once more. The
// datagrams already split stay for the next reads; its buffers go. A
// message the kernel coalesced in the instant before is read as one
// datagram, truncated.
func (c *Conn) StopGRO() {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.stopGRO()
}

func (c *Conn) readBatch(msgs []Message, try bool) (n int, err error) {
	if len(msgs) == 0 {
		return 0, nil
	}
	if len(msgs) > c.batch {
		msgs = msgs[:c.batch]
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.leftover.Load() {
		return c.takeLeftoversLocked(msgs), nil
	}
	if c.fallback.Load() == nil {
		n, err = c.readBatchSys(msgs, try)
		why, refused := err.(*UnsupportedError)
		if !refused {
			return n, err
		}
		c.disable(why)
	}
	return c.readOne(&msgs[0])
}

// WriteBatch sends msgs in order, as many system calls as it takes (the
// kernel may take part of a batch), and returns how many were sent. On
// error, msgs[:n] were sent and msgs[n] was not; the error says why (an
// *AddrError for a destination the socket cannot reach, else the kernel's
// answer wrapped in a *net.OpError). Sending to an unreachable peer can
// fail only on a later call, as with any UDP socket.
//
// It honours the UDPConn's write deadline, and returns net.ErrClosed after
// Close. WriteBatch is safe for concurrent use by several goroutines; each
// call's datagrams are handed to the kernel in order, but the calls' batches
// may interleave. The Conn keeps no reference to msgs after it returns.
func (c *Conn) WriteBatch(msgs []Message) (n int, err error) {
	if len(msgs) == 0 {
		return 0, nil
	}
	if c.fallback.Load() == nil {
		n, err = c.writeBatchSys(msgs)
		why, refused := err.(*UnsupportedError)
		if !refused {
			return n, err
		}
		c.disable(why)
	}
	for i := n; i < len(msgs); i++ {
		if err := c.writeOne(i, &msgs[i]); err != nil {
			return i, err
		}
	}
	return len(msgs), nil
}

// readOne is the portable read: one datagram per system call.
func (c *Conn) readOne(m *Message) (int, error) {
	n, _, flags, addr, err := c.uc.ReadMsgUDPAddrPort(m.Buf, nil)
	if err != nil {
		return 0, err
	}
	m.N, m.Addr, m.Truncated = n, unmap(addr), flags&msgTrunc != 0
	if m.Truncated {
		m.N = len(m.Buf)
		c.truncated.Add(1)
	}
	return 1, nil
}

// writeOne is the portable write: one datagram per system call.
func (c *Conn) writeOne(i int, m *Message) error {
	dst, err := c.dest(i, m.Addr)
	if err != nil {
		return err
	}
	_, _, err = c.uc.WriteMsgUDPAddrPort(m.Buf, nil, dst)
	return err
}

// dest checks the destination of message i and returns what to hand the
// kernel: the zero AddrPort for the connected peer, otherwise a with any
// IPv4-mapped address unmapped (the batch path maps it back on an IPv6
// socket, as the net package does).
func (c *Conn) dest(i int, a netip.AddrPort) (netip.AddrPort, error) {
	if !a.IsValid() {
		if !c.connected {
			return a, &AddrError{Index: i, Addr: a, Err: ErrNoDestination}
		}
		return a, nil
	}
	a = unmap(a)
	if c.connected {
		if a != c.raddr {
			return a, &AddrError{Index: i, Addr: a, Err: ErrConnectedDestination, peer: c.raddr}
		}
		return netip.AddrPort{}, nil
	}
	if c.v4only && !a.Addr().Is4() {
		return a, &AddrError{Index: i, Addr: a, Err: ErrAddressFamily}
	}
	return a, nil
}

// disable switches the Conn to one datagram per system call, and says so
// once. Receive offload goes with the batch path.
func (c *Conn) disable(why *UnsupportedError) {
	if !c.fallback.CompareAndSwap(nil, why) {
		return
	}
	c.stopGRO()
	if c.log == nil {
		return
	}
	level := slog.LevelWarn
	if why.Err == nil || why.Err == errForced {
		level = slog.LevelInfo // expected: no batch system calls here
	}
	c.log.Log(context.Background(), level, "udpbatch: moving one datagram per system call",
		slog.String("local", c.laddr.String()), slog.String("reason", why.Error()))
}

func unmap(a netip.AddrPort) netip.AddrPort {
	if a.Addr().Is4In6() {
		return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
	}
	return a
}

var (
	// ErrAddressFamily is wrapped by the *AddrError for an IPv6 destination
	// on an IPv4 (AF_INET) socket.
	ErrAddressFamily = errors.New("IPv6 destination on an IPv4 socket")
	// ErrNoDestination is wrapped by the *AddrError for a message without
	// Addr on a socket that is not connected.
	ErrNoDestination = errors.New("no destination address on an unconnected socket")
	// ErrConnectedDestination is wrapped by the *AddrError for a message
	// whose Addr is not the peer of a connected socket.
	ErrConnectedDestination = errors.New("destination is not the connected socket's peer")

	errForced = errors.New("disabled by the caller")
)

// AddrError is WriteBatch's error for a destination the socket cannot send
// to. Messages before Index were sent; that one and the rest were not.
type AddrError struct {
	Index int            // index of the message in the WriteBatch call
	Addr  netip.AddrPort // its Addr
	Err   error          // ErrAddressFamily, ErrNoDestination or ErrConnectedDestination

	peer netip.AddrPort
}

func (e *AddrError) Error() string {
	var fix string
	switch e.Err {
	case ErrAddressFamily:
		fix = `; to reach IPv6 peers, listen on an IPv6 or dual-stack address such as "[::]:4500"`
	case ErrNoDestination:
		fix = "; set Message.Addr, or use a connected socket"
	case ErrConnectedDestination:
		fix = fmt.Sprintf("; leave Message.Addr zero (the peer is %v), or use an unconnected socket", e.peer)
	}
	return fmt.Sprintf("udpbatch: message %d to %v: %v%s", e.Index, e.Addr, e.Err, fix)
}

func (e *AddrError) Unwrap() error { return e.Err }

// UnsupportedError says why a Conn moves one datagram per system call
// instead of a batch. errors.Is(err, errors.ErrUnsupported) holds for it.
type UnsupportedError struct {
	// Op is the system call the kernel refused ("recvmmsg", "sendmmsg"), or
	// "" when this system has no batch system calls or they were disabled.
	Op string
	// Err is the kernel's answer (such as syscall.ENOSYS or syscall.EPERM),
	// or nil when this system has no batch system calls.
	Err error
}

func (e *UnsupportedError) Error() string {
	switch {
	case e.Op == "" && e.Err == nil:
		return "udpbatch: this system has no recvmmsg/sendmmsg; each datagram takes a system call"
	case e.Op == "":
		return "udpbatch: batched I/O " + e.Err.Error() + "; each datagram takes a system call"
	default:
		return fmt.Sprintf("udpbatch: the kernel refused %s (%v); each datagram takes a system call "+
			"until recvmmsg and sendmmsg are allowed (check the seccomp profile or sandbox)", e.Op, e.Err)
	}
}

func (e *UnsupportedError) Unwrap() error { return e.Err }

// Is reports errors.ErrUnsupported as a match.
func (e *UnsupportedError) Is(target error) bool { return target == errors.ErrUnsupported }
