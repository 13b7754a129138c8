package relay

import "golang.org/x/sys/unix"

// forceBuffers sets SO_RCVBUFFORCE and SO_SNDBUFFORCE; without
// CAP_NET_ADMIN they fail and the capped sizes already set stay.
func forceBuffers(fd, rcv, snd int) {
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rcv)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, snd)
}
