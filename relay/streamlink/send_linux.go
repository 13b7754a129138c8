package streamlink

import (
	"fmt"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// direct writes frames with sendmsg on the raw socket: a writev that
// neither raises SIGPIPE nor allocates. Its callbacks are made once, so
// that a write does not allocate either. The link's write lock, or its
// writer (which runs alone), owns it.
type direct struct {
	raw  syscall.RawConn
	iov  [maxIov]unix.Iovec
	msg  unix.Msghdr
	pend [][]byte // what is left to send; the callbacks advance it
	err  error
	// In write: the first callback sends and, on EAGAIN, asks to wait
	// (waiting); the one after the wait (waited) returns at once, for the
	// writer to take afresh what goes next.
	waiting, waited bool

	fn func(fd uintptr) bool
}

func newDirect(raw syscall.RawConn) directWriter {
	d := &direct{raw: raw}
	d.fn = d.send
	return d
}

// try sends what the socket takes now of *pend, and leaves in *pend what
// it did not: the first frame perhaps cut to its unsent tail.
func (d *direct) try(pend *[][]byte) error {
	d.pend, d.err = *pend, nil
	err := d.raw.Write(d.fn)
	*pend = d.pend
	d.pend = nil
	if err != nil {
		return err
	}
	return d.err
}

// write sends what the socket takes of *pend and, if it does not take
// all, waits (within the connection's write deadline) until it can take
// more; it leaves in *pend what is left. The send and the wait are one
// RawConn.Write: a wait in a call of its own would begin by clearing the
// poller's note that the socket drained meanwhile, and sleep through it.
func (d *direct) write(pend *[][]byte) error {
	d.pend, d.err, d.waiting, d.waited = *pend, nil, true, false
	err := d.raw.Write(d.fn)
	*pend = d.pend
	d.pend, d.waiting = nil, false
	if err != nil {
		return err
	}
	return d.err
}

// send is the RawConn.Write callback: it reports whether it is done (all
// sent, failed, or the socket full: try gives up, with what is left in
// d.pend).
func (d *direct) send(fd uintptr) bool {
	if d.waited {
		return true
	}
	for len(d.pend) > 0 {
		n := 0
		for _, f := range d.pend[:min(len(d.pend), maxIov)] {
			d.iov[n].Base = &f[0]
			d.iov[n].SetLen(len(f))
			n++
		}
		d.msg.Iov = &d.iov[0]
		d.msg.SetIovlen(n)
		sent, _, errno := unix.Syscall(unix.SYS_SENDMSG, fd, uintptr(unsafe.Pointer(&d.msg)), unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
		clear(d.iov[:n])
		switch errno {
		case 0:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			if d.waiting {
				d.waited = true
				return false
			}
			return true
		default:
			d.err = errno
			return true
		}
		d.advance(int(sent))
	}
	return true
}

// advance drops the first n bytes of d.pend.
func (d *direct) advance(n int) {
	for n > 0 && len(d.pend) > 0 {
		if n < len(d.pend[0]) {
			d.pend[0] = d.pend[0][n:]
			return
		}
		n -= len(d.pend[0])
		d.pend[0] = nil
		d.pend = d.pend[1:]
	}
}

// setSocketOptions sets TCP_NOTSENT_LOWAT (0: leave it) and the
// congestion control ("": the system's).
func setSocketOptions(raw syscall.RawConn, lowat int, congestion string) error {
	var err error
	cerr := raw.Control(func(fd uintptr) {
		if lowat > 0 {
			if e := unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, lowat); e != nil {
				err = fmt.Errorf("TCP_NOTSENT_LOWAT: %w", e)
				return
			}
		}
		if congestion != "" {
			if e := unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, congestion); e != nil {
				err = fmt.Errorf("TCP congestion control %q: %w (load its module, or allow it in net.ipv4.tcp_allowed_congestion_control)", congestion, e)
			}
		}
	})
	if cerr != nil {
		return cerr
	}
	return err
}

// deliveryRate returns the connection's recent delivery rate, bytes a
// second (TCP_INFO).
func deliveryRate(raw syscall.RawConn) (uint64, error) {
	var rate uint64
	var err error
	cerr := raw.Control(func(fd uintptr) {
		var info *unix.TCPInfo
		if info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			rate = info.Delivery_rate
		}
	})
	if cerr != nil {
		return 0, cerr
	}
	return rate, err
}

// kernelBacklog reads what waits in the socket from TCP_INFO, at most
// every backlogEvery: bytes not sent yet, bytes in flight, and the
// delivery rate. It does not allocate.
type kernelBacklog struct {
	raw syscall.RawConn
	fn  func(fd uintptr)

	mu      sync.Mutex // guards the following
	info    unix.TCPInfo
	size    uint32
	at      int64
	queued  int
	rate    uint64
	handed  uint64 // the link's handed bytes at the last read
	readErr syscall.Errno
}

const backlogEvery = int64(time.Millisecond)

func newKernelBacklog(raw syscall.RawConn) *kernelBacklog {
	if raw == nil {
		return nil
	}
	k := &kernelBacklog{raw: raw}
	k.fn = k.read
	return k
}

func (k *kernelBacklog) read(fd uintptr) {
	k.size = uint32(unsafe.Sizeof(k.info))
	_, _, k.readErr = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.IPPROTO_TCP, unix.TCP_INFO,
		uintptr(unsafe.Pointer(&k.info)), uintptr(unsafe.Pointer(&k.size)), 0)
}

// get returns the bytes waiting in the socket (unsent, and sent but not
// acknowledged) as of at most backlogEvery ago, plus what the link was
// handed since (handed counts all it was ever handed), and the delivery
// rate.
func (k *kernelBacklog) get(now int64, handed uint64) (int, uint64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if now-k.at >= backlogEvery {
		k.at = now
		if k.raw.Control(k.fn) == nil && k.readErr == 0 {
			k.queued = int(k.info.Notsent_bytes) + int(k.info.Unacked)*int(k.info.Snd_mss)
			k.rate = k.info.Delivery_rate
			k.handed = handed
		}
	}
	return k.queued + int(handed-k.handed), k.rate
}
