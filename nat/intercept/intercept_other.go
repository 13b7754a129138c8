//go:build !linux

package intercept

import (
	"net"
	"syscall"

	"github.com/iketcp/iketcp/nat"
	"github.com/iketcp/iketcp/nat/tun"
)

// Interceptor is a running interception; on this system there is none.
type Interceptor struct {
	cfg Config
}

// Open returns nat.ErrNeedsLinux: transparent mode is built on Linux's TUN
// driver and policy routing.
func Open(cfg Config) (*Interceptor, error) {
	if _, err := cfg.withDefaults(true); err != nil {
		return nil, err
	}
	return nil, nat.ErrNeedsLinux
}

// Cleanup returns nat.ErrNeedsLinux: nothing can have been left here.
func Cleanup(cfg Config) error { return nat.ErrNeedsLinux }

// SetMark returns a Control function that fails with nat.ErrNeedsLinux.
func SetMark(mark uint32) func(network, address string, c syscall.RawConn) error {
	return func(string, string, syscall.RawConn) error { return nat.ErrNeedsLinux }
}

func (i *Interceptor) Name() string   { return i.cfg.Name }
func (i *Interceptor) Mark() uint32   { return i.cfg.Mark }
func (i *Interceptor) MTU() int       { return tun.MTU }
func (i *Interceptor) BatchSize() int { return 1 }

func (i *Interceptor) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (i *Interceptor) Write(bufs [][]byte, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (i *Interceptor) Close() error { return nil }
