//go:build !linux

package nat

import (
	"net"
	"syscall"
)

// Interceptor is a running interception; on this system there is none.
type Interceptor struct {
	cfg InterceptConfig
}

// Intercept returns ErrNeedsLinux: transparent mode is built on Linux's TUN
// driver and policy routing.
func Intercept(cfg InterceptConfig) (*Interceptor, error) {
	if _, err := cfg.withDefaults(true); err != nil {
		return nil, err
	}
	return nil, ErrNeedsLinux
}

// Cleanup returns ErrNeedsLinux: nothing can have been left here.
func Cleanup(cfg InterceptConfig) error { return ErrNeedsLinux }

// SetMark returns a Control function that fails with ErrNeedsLinux.
func SetMark(mark uint32) func(network, address string, c syscall.RawConn) error {
	return func(string, string, syscall.RawConn) error { return ErrNeedsLinux }
}

func (i *Interceptor) Name() string   { return i.cfg.Name }
func (i *Interceptor) Mark() uint32   { return i.cfg.Mark }
func (i *Interceptor) MTU() int       { return MTU }
func (i *Interceptor) BatchSize() int { return 1 }

func (i *Interceptor) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (i *Interceptor) Write(bufs [][]byte, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (i *Interceptor) Close() error { return nil }
