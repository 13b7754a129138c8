//go:build !linux

package control

import (
	"io/fs"
	"syscall"
)

// presetMode does nothing: only Linux takes the socket file's mode from the
// unbound socket. listenPrivate sets it right after bind instead.
func presetMode(uintptr, fs.FileMode) error { return nil }

// peerUID cannot tell here; Fetch relies on the file checks alone.
func peerUID(syscall.RawConn) (uid int, ok bool, err error) { return 0, false, nil }
