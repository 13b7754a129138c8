package streamlink

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// waiter waits for a stream to become readable without reading it. Its
// callback is made once, so that a wait does not allocate.
type waiter struct {
	raw syscall.RawConn
	one [1]byte
	fn  func(fd uintptr) bool
}

func newWaiter(raw syscall.RawConn) *waiter {
	w := &waiter{raw: raw}
	w.fn = w.peek
	return w
}

// wait blocks until the stream has a byte to read, has ended or failed,
// or the read deadline passes; it reads nothing. An error the socket
// holds is the next read's to report.
func (w *waiter) wait() error { return w.raw.Read(w.fn) }

// peek is the RawConn.Read callback: a one-byte MSG_PEEK tells whether
// there is anything, without a buffer of ours standing by.
func (w *waiter) peek(fd uintptr) bool {
	for {
		// The system call itself: unix.Recvfrom would allocate the
		// sender's address.
		_, _, err := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&w.one[0])), 1, unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
		switch err {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		return true
	}
}
