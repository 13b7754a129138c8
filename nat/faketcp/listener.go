package faketcp

import (
	"context"
	"fmt"
)

// Listener accepts the connections a Stack completes to one port.
type Listener struct {
	// Set by Listen, read-only afterwards.
	stack  *Stack
	port   uint16
	queue  chan *Conn    // established conns waiting for Accept
	closed chan struct{} // closed by Close

	// closedLocked is set by Close; guarded by stack.mu, under which
	// conns are queued, so that none is queued after Close drained the
	// queue.
	closedLocked bool
}

// Port is the port the listener accepts on.
func (l *Listener) Port() uint16 { return l.port }

// Accept waits for a connection whose handshake completed and returns it,
// with no handler yet. It fails when ctx ends or the listener closes.
func (l *Listener) Accept(ctx context.Context) (*Conn, error) {
	select {
	case c := <-l.queue:
		return c, nil
	case <-l.closed:
		return nil, fmt.Errorf("faketcp: accept on port %d: %w", l.port, ErrClosed)
	case <-ctx.Done():
		return nil, fmt.Errorf("faketcp: accept on port %d: %w", l.port, ctx.Err())
	}
}

// Close stops the listener: SYNs to its port, and segments that return
// the cookies it sent, are answered with an RST, and conns completed but
// not accepted are closed. Conns already accepted go on. It is
// idempotent.
func (l *Listener) Close() error {
	s := l.stack
	s.mu.Lock()
	if l.closedLocked {
		s.mu.Unlock()
		return nil
	}
	l.closedLocked = true
	if s.listeners[l.port] == l {
		delete(s.listeners, l.port)
	}
	s.mu.Unlock()
	close(l.closed)
	for {
		select {
		case c := <-l.queue:
			c.closeWith(fmt.Errorf("%w: the listener closed before Accept took it", ErrClosed))
		default:
			return nil
		}
	}
}
