//go:build !linux

package realaddr

import (
	"net"
	"net/netip"
)

// Net is real-address mode, running; on this system there is none.
type Net struct{}

// Setup returns an error that matches nat.ErrNeedsLinux: real-address mode
// is built on Linux's transparent sockets, policy routing and nftables.
func Setup(cfg Config) (*Net, error) {
	if _, err := cfg.withDefaults(); err != nil {
		return nil, err
	}
	return nil, errNeedsLinux
}

// Cleanup returns an error that matches nat.ErrNeedsLinux: nothing can
// have been left here.
func Cleanup(cfg Config) error { return errNeedsLinux }

// Dial returns an error that matches nat.ErrNeedsLinux.
func (n *Net) Dial(client netip.Addr, backend netip.AddrPort) (*net.UDPConn, func() error, error) {
	if _, _, err := checkAddrs(client, backend); err != nil {
		return nil, nil, err
	}
	return nil, nil, errNeedsLinux
}

func (n *Net) IPv6() bool   { return false }
func (n *Net) Close() error { return nil }

// Adopt returns an error that matches nat.ErrNeedsLinux.
func Adopt(cfg Config) (*Net, error) {
	if _, err := cfg.withDefaults(); err != nil {
		return nil, err
	}
	return nil, errNeedsLinux
}

// AdoptSocket returns an error that matches nat.ErrNeedsLinux.
func (n *Net) AdoptSocket(conn *net.UDPConn) (func() error, error) { return nil, errNeedsLinux }

func (n *Net) Release() {}
