//go:build !linux

package tun

import (
	"net"

	"github.com/vishvananda/netlink"

	"github.com/iketcp/iketcp/nat/internal/setup"
)

// TUN is a TUN device; on this system there is none.
type TUN struct{ name string }

var _ Device = (*TUN)(nil)

// Create returns m.NeedsLinux: iketcp's TUN devices are Linux's.
func Create(h *netlink.Handle, m setup.Mode, name string, needIPv6 bool) (*TUN, error) {
	return nil, m.NeedsLinux
}

func (d *TUN) Name() string   { return d.name }
func (d *TUN) BatchSize() int { return 1 }

func (d *TUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (d *TUN) Write(bufs [][]byte, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (d *TUN) Close() error { return nil }
