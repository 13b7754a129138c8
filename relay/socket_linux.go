package relay

import (
	"time"

	"golang.org/x/sys/unix"
)

// forceBuffers sets SO_RCVBUFFORCE and SO_SNDBUFFORCE; without
// CAP_NET_ADMIN they fail and the capped sizes already set stay.
func forceBuffers(fd, rcv, snd int) {
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rcv)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, snd)
}

// setUserTimeout sets TCP_USER_TIMEOUT, in milliseconds.
func setUserTimeout(fd int, d time.Duration) error {
	return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
}
