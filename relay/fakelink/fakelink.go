// Package fakelink is the fake-TCP link, for both roles: each datagram
// travels in a TCP-shaped segment of its own, built by a userspace stack
// (package nat/faketcp) that no kernel TCP stream owns, so nothing queues
// behind a lost segment. IKE keeps its non-ESP marker and ESP travels raw,
// as in RFC 9329, but without the Length or the prefix: the segment is
// the frame. Both ends must be iketcp. A server's link can be handed to
// another process as its connection's state (Detach, Adopt), for a
// planned restart.
package fakelink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/relay"
)

// The stack builds its headers in the room the relay leaves.
const _ = uint(relay.Headroom - faketcp.Headroom) // relay.Headroom >= faketcp.Headroom

// burstSize is the most datagrams handed to the receiver at once.
const burstSize = 64

// Dialer opens fake-TCP links through a stack, for a client.
type Dialer struct {
	Stack *faketcp.Stack
	// Ports, if valid, is the block of local ports the links come from:
	// an aggregate member's, which the kernel's NAT gives the member's own
	// address (nat/fakenet's Config.Sources). The zero PortRange means the
	// stack's ephemeral ports.
	Ports faketcp.PortRange
	// Source, if valid, is the address the kernel's NAT gives the links
	// (Ports' source address): their LocalAddr shows it, with the stack's
	// port, in place of the endpoint's address behind the TUN device.
	Source netip.Addr
}

// DialLink connects to addr (host:port) through the stack.
func (d *Dialer) DialLink(ctx context.Context, addr string) (relay.Link, error) {
	remote, err := netip.ParseAddrPort(addr)
	if err != nil {
		ta, rerr := net.ResolveTCPAddr("tcp", addr)
		if rerr != nil {
			return nil, fmt.Errorf("fake-TCP peer %q: %w", addr, rerr)
		}
		remote = ta.AddrPort()
	}
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	ports := d.Ports
	if !ports.Valid() {
		ports = faketcp.EphemeralPorts
	}
	conn, err := d.Stack.DialFrom(ctx, remote, ports)
	if err != nil {
		return nil, err
	}
	l := &Link{conn: conn}
	if d.Source.IsValid() {
		l.local = netip.AddrPortFrom(d.Source, conn.LocalAddr().Port()).String()
	}
	return l, nil
}

// Listener accepts fake-TCP links from a stack's listener, for a server.
type Listener struct {
	ln   *faketcp.Listener
	addr string
}

// NewListener accepts links from ln; addr is what logs and Status show.
func NewListener(ln *faketcp.Listener, addr string) *Listener {
	return &Listener{ln: ln, addr: addr}
}

func (l *Listener) Accept(ctx context.Context) (relay.Link, error) {
	conn, err := l.ln.Accept(ctx)
	if errors.Is(err, faketcp.ErrClosed) {
		// As a closed socket's: the relay's accept loop ends on it.
		return nil, fmt.Errorf("%w: %w", net.ErrClosed, err)
	}
	if err != nil {
		return nil, err
	}
	return &Link{conn: conn}, nil
}

func (l *Listener) Close() error  { return l.ln.Close() }
func (l *Listener) Addr() string  { return l.addr }
func (l *Listener) Encap() string { return Encap }

// Link is one fake-TCP conn.
type Link struct {
	conn   *faketcp.Conn
	local  string // LocalAddr's, if not the conn's own (Dialer.Source)
	closed atomic.Bool
}

// Send sends each datagram as one segment, its headers built in place.
func (l *Link) Send(bufs [][]byte) error { return l.conn.Send(bufs, relay.Headroom) }

// Serve hands the segments' datagrams to rx, on the stack's reader
// goroutine, until the conn ends.
func (l *Link) Serve(rx relay.Receiver) error {
	refused := make(chan error, 1)
	burst := make([]relay.Datagram, 0, burstSize)
	deliver := func() bool {
		err := rx.Receive(burst)
		clear(burst)
		burst = burst[:0]
		if err != nil {
			refused <- err
			l.conn.Close()
		}
		return err == nil
	}
	l.conn.SetHandler(func(batch []faketcp.Payload) {
		if len(refused) > 0 {
			return
		}
		for _, p := range batch {
			burst = append(burst, relay.Datagram{Buf: p.Buf, Off: p.Off, N: p.N})
			if len(burst) == cap(burst) && !deliver() {
				return
			}
		}
		if len(burst) > 0 {
			deliver()
		}
	})
	<-l.conn.Done()
	l.conn.SetHandler(nil) // waits out a delivery in flight: rx is the caller's again
	select {
	case err := <-refused:
		return err
	default:
	}
	if l.closed.Load() {
		return relay.ErrClosedHere
	}
	return ended(l.conn.Err())
}

// ended says why a fake-TCP conn ended.
func ended(err error) error {
	switch {
	case errors.Is(err, faketcp.ErrReset):
		return errors.New("peer reset the fake-TCP connection (restarted?)")
	case errors.Is(err, faketcp.ErrTimeout):
		return errors.New("fake-TCP connection timed out: nothing heard from the peer")
	case errors.Is(err, faketcp.ErrPeerClosed):
		return errors.New("peer closed the fake-TCP connection")
	case errors.Is(err, faketcp.ErrDetached):
		return relay.ErrDetached
	case errors.Is(err, faketcp.ErrClosed):
		return relay.ErrClosedHere
	case err != nil:
		return err
	}
	return errors.New("fake-TCP connection ended")
}

// Encap names the links of this package in a hand-over
// (relay.DetachedLink's Encap).
const Encap = "fake-tcp"

// Detach hands the link to another process (a server's upgrade): its
// conn's state (faketcp's Conn.Detach, which needs the stack paused),
// for that process's stack to resume (faketcp.ResumeStack) and Adopt to
// serve. The link then counts as closed here, sending nothing: Serve
// returns relay.ErrDetached, and so does Send. The timeout is not needed:
// nothing waits in a fake-TCP link.
func (l *Link) Detach(time.Duration) (*relay.DetachedLink, error) {
	cs, err := l.conn.Detach()
	if err != nil {
		return nil, err
	}
	state, err := json.Marshal(cs)
	if err != nil {
		return nil, err
	}
	return &relay.DetachedLink{Encap: Encap, State: state}, nil
}

// Adopt serves a conn that a stack resumed from another process's
// detached link (ResumeStack's).
func Adopt(conn *faketcp.Conn) *Link { return &Link{conn: conn} }

// Close ends the conn (with a FIN); Serve returns.
func (l *Link) Close() error {
	l.closed.Store(true)
	return l.conn.Close()
}

// LocalAddr is the conn's address and port, or, for a Dialer with a
// Source, that address with the conn's port: as the kernel's NAT maps it,
// unless the port collided there.
func (l *Link) LocalAddr() string {
	if l.local != "" {
		return l.local
	}
	return l.conn.LocalAddr().String()
}

func (l *Link) RemoteAddr() string { return l.conn.RemoteAddr().String() }
