//go:build !linux

package tun

import (
	"errors"
	"net"

	"github.com/vishvananda/netlink"

	"github.com/iketcp/iketcp/nat/internal/setup"
)

// TUN is a TUN device; on this system there is none.
type TUN struct{ name string }

var _ OffloadDevice = (*TUN)(nil)

// Create returns m.NeedsLinux: iketcp's TUN devices are Linux's.
func Create(h *netlink.Handle, m setup.Mode, name string, needIPv6 bool, opts Options) (*TUN, error) {
	return nil, m.NeedsLinux
}

var errNoOffload = &OffloadError{Op: "IFF_VNET_HDR", Err: errors.ErrUnsupported}

func (d *TUN) Offload() error { return errNoOffload }

func (d *TUN) ReadOffload(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, errNoOffload
}

func (d *TUN) WriteOffload(pkts []OffloadPacket) (int, error) { return 0, errNoOffload }

func (d *TUN) Name() string   { return d.name }
func (d *TUN) BatchSize() int { return 1 }

func (d *TUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (d *TUN) Write(bufs [][]byte, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (d *TUN) Close() error { return nil }
