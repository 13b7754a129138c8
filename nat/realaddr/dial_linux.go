package realaddr

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"syscall"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
)

// socket is a session's socket that Dial returned, and its element.
type socket struct {
	conn *net.UDPConn
	set  *nftables.Set
	key  []byte
}

// errClosed is Dial's error after Close.
var errClosed = fmt.Errorf("real-address mode: closed: %w", net.ErrClosed)

// Dial opens a session's UDP socket toward backend, the IKE daemon on this
// host, with the client's address as its source: a transparent socket
// (IP_TRANSPARENT or IPV6_TRANSPARENT) bound to client and a port that
// the kernel picks, connected to backend. The daemon sees the session as
// client:port; its datagrams to client:port from backend are marked and
// delivered to the socket, and no longer leave the host. Two sessions of
// one client address get two ports.
//
// backend must be one of this host's own addresses that is not a loopback
// address, of the client's family (see the package documentation). An
// IPv4-mapped client is taken as IPv4.
//
// release closes the socket and removes its element; it is idempotent.
// Call it instead of, or after, closing the socket itself: until then
// the port stays claimed. Close closes the sockets not yet released.
//
// Dial makes the socket in the calling thread's network namespace, which
// must be the one Setup ran in (the process's, normally). It needs
// CAP_NET_ADMIN, for the element (the socket's own options take
// CAP_NET_RAW too); without it the error wraps nat.ErrNeedsNetAdmin. It
// is safe for concurrent use.
func (n *Net) Dial(client netip.Addr, backend netip.AddrPort) (conn *net.UDPConn, release func() error, err error) {
	client, backend, err = checkAddrs(client, backend)
	if err != nil {
		return nil, nil, err
	}
	if client.Is6() && !n.v6 {
		return nil, nil, fmt.Errorf("real-address mode: client %s is IPv6, but IPv6 was off on this host when real-address mode started (lo's disable_ipv6): turn it on and restart", client)
	}
	if err := n.checkLocal(backend); err != nil {
		return nil, nil, err
	}
	conn, err = n.dialTransparent(client, backend)
	if err != nil {
		return nil, nil, err
	}
	local := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	s := &socket{conn: conn, set: n.set4, key: elementKey(netip.AddrPortFrom(local.Addr().Unmap(), local.Port()), backend)}
	if client.Is6() {
		s.set = n.set6
	}
	if err := n.add(s); err != nil {
		conn.Close()
		return nil, nil, err
	}
	return conn, sync.OnceValue(func() error { return n.release(s) }), nil
}

// checkLocal fails unless backend's address is one of the host's own:
// only there, on their way out of the host, are the daemon's datagrams to
// a session caught. Elsewhere the socket would put the client's address on
// the wire, and the answers would go to the client.
func (n *Net) checkLocal(backend netip.AddrPort) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.nl == nil {
		return errClosed
	}
	routes, err := n.nl.RouteGet(backend.Addr().AsSlice())
	if err == nil && len(routes) > 0 && routes[0].Type == unix.RTN_LOCAL {
		return nil
	}
	if errors.Is(err, unix.EPERM) {
		return modeRealAddr.Failed(fmt.Sprintf("look up the route to the backend %s", backend), err)
	}
	if err == nil {
		err = errors.New("the route to it is not local")
	}
	return fmt.Errorf("real-address mode: backend %s is not an address of this host (%v): a session's socket sends from its client's address, "+
		"which works only to an IKE daemon on this host, whose answers are caught on their way out; "+
		"give the backend as one of this host's own addresses that the daemon listens on", backend, err)
}

// dialTransparent opens the transparent socket from client, at a port the
// kernel picks, to backend.
func (n *Net) dialTransparent(client netip.Addr, backend netip.AddrPort) (*net.UDPConn, error) {
	// The socket belongs to the namespace of the thread that makes it.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if cur := threadNetns(); cur != n.ns {
		return nil, fmt.Errorf("real-address mode: Dial runs in another network namespace than Setup did; its socket would not be where the routing is")
	}
	network, level, opt, name := "udp4", unix.SOL_IP, unix.IP_TRANSPARENT, "IP_TRANSPARENT"
	if client.Is6() {
		network, level, opt, name = "udp6", unix.SOL_IPV6, unix.IPV6_TRANSPARENT, "IPV6_TRANSPARENT"
	}
	// The mark routes the socket's own datagrams by Table too: to the
	// backend, which is local, that changes nothing; but should the
	// backend's address leave the host after Dial checked it, they are
	// delivered locally instead of putting the client's address on the
	// wire.
	var cerr error // the socket options' refusal, said plainly
	d := net.Dialer{
		LocalAddr: net.UDPAddrFromAddrPort(netip.AddrPortFrom(client, 0)),
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			what := name
			if err := c.Control(func(fd uintptr) {
				if serr = unix.SetsockoptInt(int(fd), level, opt, 1); serr != nil {
					return
				}
				what = "SO_MARK"
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(n.cfg.Mark))
			}); err != nil {
				return err
			}
			if serr != nil {
				cerr = modeRealAddr.Failed(fmt.Sprintf("make a transparent socket from %s (%s, which CAP_NET_RAW allows too)", client, what), serr)
			}
			return cerr
		},
	}
	c, err := d.DialContext(context.Background(), network, backend.String())
	if cerr != nil {
		return nil, cerr
	}
	if err != nil {
		return nil, fmt.Errorf("real-address mode: open a socket from %s to the backend %s: %w", client, backend, err)
	}
	return c.(*net.UDPConn), nil
}

// add adds s's element, unless another socket's claims it already, and
// records s.
func (n *Net) add(s *socket) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.nl == nil {
		return errClosed
	}
	if n.claims[string(s.key)] == 0 {
		if err := n.nft.SetAddElements(s.set, []nftables.SetElement{{Key: s.key}}); err != nil {
			return fmt.Errorf("real-address mode: element of %s: %w", s.conn.LocalAddr(), err)
		}
		if err := n.nft.Flush(); err != nil {
			return modeRealAddr.Failed(fmt.Sprintf("add the socket %s to the nftables set %s", s.conn.LocalAddr(), s.set.Name), err)
		}
	}
	n.claims[string(s.key)]++
	n.socks[s] = struct{}{}
	return nil
}

// release closes s and removes its element unless another socket claims
// it: a socket that took the port after s was closed by its owner, before
// its release. It closes s first, so that none of the daemon's datagrams
// to s leaves the host in between.
func (n *Net) release(s *socket) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	var errs []error
	if err := s.conn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		errs = append(errs, err)
	}
	if _, ok := n.socks[s]; !ok || n.nl == nil {
		return errors.Join(errs...) // Close took it, and the table with it
	}
	delete(n.socks, s)
	if n.claims[string(s.key)]--; n.claims[string(s.key)] > 0 {
		return errors.Join(errs...)
	}
	delete(n.claims, string(s.key))
	if err := n.nft.SetDeleteElements(s.set, []nftables.SetElement{{Key: s.key}}); err != nil {
		return errors.Join(append(errs, err)...)
	}
	if err := n.nft.Flush(); err != nil && !setup.Gone(err) {
		errs = append(errs, modeRealAddr.Failed(fmt.Sprintf("remove the socket %s from the nftables set %s", s.conn.LocalAddr(), s.set.Name), err))
	}
	return errors.Join(errs...)
}

// sockets is the number of sockets Dial returned and that are not
// released.
func (n *Net) sockets() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.socks)
}
