package control

import (
	"io/fs"
	"syscall"

	"golang.org/x/sys/unix"
)

// presetMode sets the mode of the unbound socket fd, which bind(2) gives the
// socket file (less the umask).
func presetMode(fd uintptr, mode fs.FileMode) error {
	return unix.Fchmod(int(fd), uint32(mode.Perm()))
}

// peerUID is the effective uid of the process that listens at the other
// end of the connected unix socket rc, as the kernel recorded it at
// listen(2) (SO_PEERCRED).
func peerUID(rc syscall.RawConn) (uid int, ok bool, err error) {
	var cred *unix.Ucred
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		cred, gerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, false, err
	}
	if gerr != nil {
		return 0, false, gerr
	}
	return int(cred.Uid), true, nil
}
