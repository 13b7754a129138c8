//go:build !linux

package nat

import (
	"net"
	"net/netip"
)

// FakeTCPNet is fake-TCP mode's plumbing, running; on this system there is
// none.
type FakeTCPNet struct {
	cfg FakeTCPConfig
}

// errFakeTCPNeedsLinux is fake-TCP mode's ErrNeedsLinux.
var errFakeTCPNeedsLinux = &modeError{"fake-TCP mode needs Linux (TUN device, IP forwarding and nftables NAT); on this system use the TCP transport", ErrNeedsLinux}

// SetupFakeTCP returns an error that matches ErrNeedsLinux: fake-TCP mode
// is built on Linux's TUN driver, forwarding and nftables.
func SetupFakeTCP(cfg FakeTCPConfig) (*FakeTCPNet, error) {
	if _, err := cfg.withDefaults(true); err != nil {
		return nil, err
	}
	return nil, errFakeTCPNeedsLinux
}

// CleanupFakeTCP returns an error that matches ErrNeedsLinux: nothing can
// have been left here.
func CleanupFakeTCP(cfg FakeTCPConfig) error { return errFakeTCPNeedsLinux }

func (n *FakeTCPNet) Name() string          { return n.cfg.Name }
func (n *FakeTCPNet) Endpoint4() netip.Addr { return netip.Addr{} }
func (n *FakeTCPNet) Endpoint6() netip.Addr { return netip.Addr{} }
func (n *FakeTCPNet) MTU() int              { return MTU }
func (n *FakeTCPNet) BatchSize() int        { return 1 }

func (n *FakeTCPNet) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (n *FakeTCPNet) Write(bufs [][]byte, offset int) (int, error) {
	return 0, net.ErrClosed
}

func (n *FakeTCPNet) Close() error { return nil }
