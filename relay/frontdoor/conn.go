package frontdoor

import (
	"bytes"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
)

// conn is a connection as Accept returns it (or as a *tls.Conn wraps it):
// the accepted connection, with what the front door read from it replayed
// first, and the client a PROXY header named as its RemoteAddr.
type conn struct {
	net.Conn
	remote  net.Addr    // nil: the connection's own
	drained atomic.Bool // the replay has been read: reads go straight through

	mu     sync.Mutex // guards the following
	replay []byte
}

// newConn wraps nc, replaying a copy of replay.
func newConn(nc net.Conn, remote net.Addr, replay []byte) *conn {
	c := &conn{Conn: nc, remote: remote, replay: bytes.Clone(replay)}
	c.drained.Store(len(c.replay) == 0)
	return c
}

// Read reads the replayed bytes first, then the connection.
func (c *conn) Read(p []byte) (int, error) {
	if c.drained.Load() {
		return c.Conn.Read(p)
	}
	c.mu.Lock()
	n := copy(p, c.replay)
	c.replay = c.replay[n:]
	if len(c.replay) == 0 {
		c.replay = nil
		c.drained.Store(true)
	}
	c.mu.Unlock()
	if n == 0 && len(p) > 0 { // a reader that raced another to the last bytes
		return c.Conn.Read(p)
	}
	return n, nil
}

// Unread takes the replayed bytes not read yet, for a process that
// serves the connection's stream from here on (streamlink's Detach).
func (c *conn) Unread() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.replay
	c.replay = nil
	c.drained.Store(true)
	return b
}

// RemoteAddr is the client's address: the one a PROXY header named, or
// the connection's own.
func (c *conn) RemoteAddr() net.Addr {
	if c.remote != nil {
		return c.remote
	}
	return c.Conn.RemoteAddr()
}

// CloseWrite half-closes the connection, where it can.
func (c *conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// SyscallConn returns the socket's raw connection, so that a reader can
// wait for data without a buffer (streamlink's idle links do). While
// replayed bytes remain, its Read returns at once without calling f: the
// connection is readable, through Read. It is for waiting, not reading.
func (c *conn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.ErrUnsupported
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	return &rawConn{RawConn: raw, c: c}, nil
}

// rawConn is a socket's raw connection behind a replay.
type rawConn struct {
	syscall.RawConn
	c *conn
}

func (r *rawConn) Read(f func(fd uintptr) bool) error {
	if !r.c.drained.Load() {
		return nil
	}
	return r.RawConn.Read(f)
}
