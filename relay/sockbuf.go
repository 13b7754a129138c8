package relay

import "net"

// socketBuffer is the receive and send buffer iketcp asks for on its UDP
// sockets: a burst of datagrams from an IKE daemon must not overflow the
// kernel's default (about 208 KiB) while the relay is writing to TCP.
const socketBuffer = 4 << 20

// growSocketBuffers raises a UDP socket's buffers to socketBuffer. With
// CAP_NET_ADMIN it goes past the system's rmem_max/wmem_max (the FORCE
// options); otherwise the kernel caps the request silently, which is the
// best an unprivileged process can do.
func growSocketBuffers(uc *net.UDPConn) {
	uc.SetReadBuffer(socketBuffer)
	uc.SetWriteBuffer(socketBuffer)
	rc, err := uc.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		forceBuffers(int(fd), socketBuffer)
	})
}
