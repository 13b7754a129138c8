package streamlink

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// dupSocket returns a duplicate of the socket behind raw, close-on-exec.
func dupSocket(raw syscall.RawConn) (*os.File, error) {
	var nfd int
	var derr error
	if err := raw.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr)
	}
	return os.NewFile(uintptr(nfd), "iketcp-link"), nil
}
