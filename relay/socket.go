package relay

import (
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"
)

// Defaults both roles share; each is a field of the roles' configs, where
// zero means the default.
const (
	DefaultMaxDatagram  = 9216
	DefaultConnBuffer   = 64 << 10
	DefaultWriteTimeout = 10 * time.Second
)

// TCPKeepAlive is the keepalive iketcp's TCP connections use: it keeps NAT
// mappings fresh and finds dead peers on idle connections (RFC 9329 6.7:
// these only refresh middleboxes; IKE's own liveness checks stay
// authoritative).
var TCPKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 4}

// UDP socket buffers iketcp asks for. Its readers never wait for a link
// (a link queues what it cannot send, and drops what waited too long), so
// what a receive buffer holds is only what a reader has not been
// scheduled to take yet: a burst from a daemon, or a few milliseconds of
// a busy machine. That must not be lost, and holds no standing queue.
const (
	// ReceiveBuffer is a UDP socket's receive buffer: about 30 ms at
	// 1 Gbit/s.
	ReceiveBuffer = 4 << 20
	// SendBuffer is a UDP socket's send buffer: sends are batches to a
	// local daemon or the next hop, which drain at once.
	SendBuffer = 1 << 20
)

// SizeSocketBuffers sets a UDP socket's buffers to ReceiveBuffer and
// SendBuffer, past the kernel's default (about 208 KiB), which a burst
// overflows. With CAP_NET_ADMIN it goes past the system's
// rmem_max/wmem_max (the FORCE options); otherwise the kernel caps the
// request silently, which is the best an unprivileged process can do.
func SizeSocketBuffers(uc *net.UDPConn) {
	uc.SetReadBuffer(ReceiveBuffer)
	uc.SetWriteBuffer(SendBuffer)
	rc, err := uc.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		forceBuffers(int(fd), ReceiveBuffer, SendBuffer)
	})
}

// ListenHint adds what to do to an error from listening or binding;
// inUse says what to do when the address is taken.
func ListenHint(err error, inUse string) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("%w (%s)", err, inUse)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("%w (ports below 1024 need root or CAP_NET_BIND_SERVICE)", err)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("%w (no interface has that address)", err)
	}
	return err
}

// SetDeadAfter bounds how long the kernel keeps a TCP connection whose
// peer has gone silent to about d: keepalives start after d/4 of quiet and
// repeat every d/4, and TCP_USER_TIMEOUT (Linux) closes the connection
// once data or keepalives have gone unacknowledged for d. Without it a
// connection with data in flight retransmits for many minutes. It is the
// liveness check toward third-party RFC 9329 peers, which know nothing
// of iketcp's own (relay/client). d <= 0 does nothing.
func SetDeadAfter(tc *net.TCPConn, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	every := max(d/4, time.Second)
	if err := tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: every, Interval: every, Count: 4}); err != nil {
		return err
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = setUserTimeout(int(fd), d) }); err != nil {
		return err
	}
	return serr
}
