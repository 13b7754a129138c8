package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// The fake-TCP links: each datagram travels in a TCP-shaped segment of its
// own, built by a userspace stack (package nat/faketcp) that no kernel TCP
// stream owns, so nothing queues behind a lost segment. IKE keeps its
// non-ESP marker, ESP travels raw, as in RFC 9329, without the Length or
// prefix: the segment is the frame.

// clientFake is a flow's fake-TCP link to the peer's iketcp server.
type clientFake struct {
	cl   *Client
	conn *faketcp.Conn
	bufs [][]byte // send's scratch, owned by writePeer
}

// openFake dials the peer's iketcp server through the fake-TCP stack.
func (cl *Client) openFake(f *flow) (*clientFake, error) {
	remote, err := netip.ParseAddrPort(f.dial)
	if err != nil {
		addr, rerr := net.ResolveTCPAddr("tcp", f.dial)
		if rerr != nil {
			return nil, fmt.Errorf("fake-TCP peer %q: %w", f.dial, rerr)
		}
		remote = addr.AddrPort()
	}
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	ctx, cancel := context.WithTimeout(f.ctx, cl.cfg.dialTimeout())
	defer cancel()
	conn, err := cl.cfg.FakeTCP.Dial(ctx, remote)
	if err != nil {
		return nil, err
	}
	return &clientFake{cl: cl, conn: conn, bufs: make([][]byte, 0, clientBatch)}, nil
}

// send sends each datagram as one segment, its headers built in place.
func (l *clientFake) send(batch []*datagram) error {
	l.bufs = l.bufs[:0]
	for _, d := range batch {
		l.bufs = append(l.bufs, d.buf[d.off-linkHeadroom:d.off+d.n])
	}
	err := l.conn.Send(l.bufs, linkHeadroom)
	clear(l.bufs)
	return err
}

// serve hands the segments' datagrams to the daemon, on the stack's
// reader goroutine, until the link ends.
func (l *clientFake) serve(f *flow) string {
	var r peerReader
	ps := make([]payload, 0, clientBatch)
	var scratch []udpbatch.Message
	l.conn.SetHandler(func(batch []faketcp.Payload) {
		now := time.Now()
		for _, p := range batch {
			if f.fromPeer(now, fallback.TCP, p.Buf[p.Off:p.Off+p.N], &r) {
				ps = append(ps, payload{p.Buf, p.Off, p.N})
			}
			if len(ps) == cap(ps) {
				f.toDaemon(ps, &scratch)
				clear(ps)
				ps = ps[:0]
			}
		}
		if len(ps) > 0 {
			f.toDaemon(ps, &scratch)
			clear(ps)
			ps = ps[:0]
		}
	})
	<-l.conn.Done()
	l.conn.SetHandler(nil) // waits out a delivery in flight: the flow's state is ours again
	return fakeEnded(l.conn.Err())
}

func (l *clientFake) close()             { l.conn.Close() }
func (l *clientFake) remoteAddr() string { return l.conn.RemoteAddr().String() }
func (l *clientFake) localAddr() string  { return l.conn.LocalAddr().String() }

// fakeEnded says why a fake-TCP conn ended, for the log.
func fakeEnded(err error) string {
	switch {
	case errors.Is(err, faketcp.ErrReset):
		return "peer reset the fake-TCP connection (restarted?)"
	case errors.Is(err, faketcp.ErrTimeout):
		return "fake-TCP connection timed out: nothing heard from the peer"
	case errors.Is(err, faketcp.ErrPeerClosed):
		return "peer closed the fake-TCP connection"
	case errors.Is(err, faketcp.ErrClosed):
		return "closed by iketcp"
	case err != nil:
		return err.Error()
	}
	return "fake-TCP connection ended"
}

// serverFake is a client's fake-TCP link, on the server.
type serverFake struct {
	conn *faketcp.Conn
}

// serve routes each segment's datagram to its session, on the stack's
// reader goroutine, until the link ends.
func (l *serverFake) serve(c *serverConn) (string, slog.Level) {
	closing := make(chan string, 1)
	l.conn.SetHandler(func(batch []faketcp.Payload) {
		for _, p := range batch {
			c.frames++
			if reason := c.handleFrame(p.Buf[p.Off : p.Off+p.N]); reason != "" {
				c.flush()
				select {
				case closing <- reason:
				default:
				}
				l.conn.Close()
				return
			}
			if len(c.pending) == cap(c.pending) {
				c.flush()
			}
		}
		c.flush()
	})
	<-l.conn.Done()
	l.conn.SetHandler(nil) // waits out a delivery in flight: c's reader state is ours again
	select {
	case reason := <-closing:
		return reason, slog.LevelWarn
	default:
	}
	level := slog.LevelInfo
	if c.closed.Load() {
		return "closed by iketcp", level
	}
	return fakeEnded(l.conn.Err()), level
}

func (l *serverFake) send(bufs [][]byte) error { return l.conn.Send(bufs, linkHeadroom) }
func (l *serverFake) close()                   { l.conn.Close() }

// ServeFakeTCP accepts fake-TCP connections from ln until ctx is done or
// ln fails, and relays them as Serve relays TCP: the same sessions, the
// same backend sockets, the same limits. addr is what Status shows. It
// returns nil when ctx ended it.
func (s *Server) ServeFakeTCP(ctx context.Context, ln *faketcp.Listener, addr string) error {
	return s.run(ctx, addr, "fake-tcp", ln, func(ctx context.Context) error {
		for {
			conn, err := ln.Accept(ctx)
			if err != nil {
				return err
			}
			if !s.admit(&serverFake{conn: conn}, conn.RemoteAddr().String()) {
				conn.Close()
			}
		}
	})
}
