//go:build !linux

package fakenet

import (
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// Net is fake-TCP mode's plumbing, running; on this system there is none.
type Net struct {
	cfg Config
}

// Setup returns an error that matches nat.ErrNeedsLinux: fake-TCP mode is
// built on Linux's TUN driver, forwarding and nftables.
func Setup(cfg Config) (*Net, error) {
	if _, err := cfg.withDefaults(true); err != nil {
		return nil, err
	}
	return nil, errNeedsLinux
}

// Adopt returns an error that matches nat.ErrNeedsLinux.
func Adopt(cfg Config, dev *os.File) (*Net, error) {
	if _, err := cfg.withDefaults(true); err != nil {
		return nil, err
	}
	return nil, errNeedsLinux
}

// Cleanup returns an error that matches nat.ErrNeedsLinux: nothing can
// have been left here.
func Cleanup(cfg Config) error { return errNeedsLinux }

func (n *Net) Name() string          { return n.cfg.Name }
func (n *Net) Endpoint4() netip.Addr { return netip.Addr{} }
func (n *Net) Endpoint6() netip.Addr { return netip.Addr{} }
func (n *Net) MTU() int              { return tun.MTU }
func (n *Net) BatchSize() int        { return 1 }

func (n *Net) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (n *Net) Write(bufs [][]byte, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (n *Net) Close() error { return nil }

func (n *Net) Offload() error { return net.ErrClosed }

func (n *Net) ReadOffload(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (n *Net) WriteOffload(pkts []tun.OffloadPacket) (int, error) { return 0, net.ErrClosed }

func (n *Net) File() (*os.File, error)           { return nil, net.ErrClosed }
func (n *Net) Release()                          {}
func (n *Net) SetReadDeadline(t time.Time) error { return net.ErrClosed }
