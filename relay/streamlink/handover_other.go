//go:build !linux

package streamlink

import (
	"errors"
	"os"
	"syscall"
)

// dupSocket is Linux's: handing links over is not supported elsewhere.
func dupSocket(syscall.RawConn) (*os.File, error) {
	return nil, errors.New("handing a link over is supported on Linux only")
}
