package streamlink

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
)

// Handing a live link to another process (a server's upgrade): Detach
// stops the link's reader where it stands, between two reads, keeps what
// it read but did not deliver, waits until everything sent has left, and
// returns a duplicate of the socket with those bytes; the other process's
// Listener.Adopt serves the same stream from there. The far end sees
// nothing: no byte lost, none twice, frames whole.
//
// A TLS link's connection cannot leave this process: Detach stops it the
// same way and returns the connection itself (Detached.Conn), which the
// link's Close then leaves open. The caller keeps it and relays its
// stream, from the bytes pending on, to the other process (a server's
// upgrade does so over a socketpair, whose other end the new server
// adopts: its Adopted says the stream is TLS, and from whom).

// ErrDetached is what Serve returns once Detach stopped it, and Send
// after that.
var ErrDetached = relay.ErrDetached

// ErrNotDetachable is Detach's error for a link over a connection that is
// neither a socket nor TLS over one.
var ErrNotDetachable = errors.New("the link's connection is not a socket: its client reconnects and claims its session")

// Detached is a stopped link's stream, for another process.
type Detached = relay.DetachedLink

// unreader is a connection that holds bytes it read from the socket and
// has not handed out yet (the front door's replay of what it sniffed);
// Unread takes them.
type unreader interface{ Unread() []byte }

// Detach stops the link for another process to serve its stream: the
// reader stops at its next read, the writer once the socket has taken
// everything queued, within timeout. The link then counts as closed
// here: Serve returns ErrDetached, and so does Send. Nothing must be sent
// on the link meanwhile (a server stops its sessions' backend readers
// first). The link's own socket stays open until Close.
//
// A TLS link's Detached has Conn, the connection itself, instead of File:
// the link's Close leaves it open for the caller, who closes it.
func (l *Link) Detach(timeout time.Duration) (*Detached, error) {
	_, isTLS := l.nc.(*tls.Conn)
	raw := rawConn(l.nc)
	if isTLS {
		raw = rawConn(underlying(l.nc))
	}
	if raw == nil {
		return nil, ErrNotDetachable
	}
	if !l.detaching.CompareAndSwap(false, true) {
		return nil, errors.New("link already detached")
	}
	deadline := time.Now().Add(timeout)
	l.nc.SetReadDeadline(time.Now()) // the reader's next (or current) read returns
	select {
	case <-l.served:
	case <-time.After(timeout):
		return nil, fmt.Errorf("the link's reader did not stop within %v", timeout)
	}
	if l.detached == nil {
		return nil, errors.New("the link ended before it could be handed over")
	}
	// Everything queued leaves before the other process writes: the
	// stream's order, and its frames whole.
	for {
		l.wmu.Lock()
		idle := !l.writing && l.rest == nil && l.q.Empty()
		werr := l.werr
		if idle && werr == nil {
			l.werr = ErrDetached // nothing more goes out from here
		}
		l.wmu.Unlock()
		if werr != nil {
			return nil, werr
		}
		if idle {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the client took not everything queued within %v", timeout)
		}
		time.Sleep(time.Millisecond)
	}
	d := l.detached
	d.TLS = l.TLS()
	if isTLS {
		// A read that timed out leaves crypto/tls's connection whole
		// (what it read of a record stays buffered in it): the caller
		// reads on from there.
		l.nc.SetDeadline(time.Time{})
		l.kept.Store(true)
		d.Conn = l.nc
		return d, nil
	}
	f, err := dupSocket(raw)
	if err != nil {
		return nil, err
	}
	d.File = f
	return d, nil
}

// detachedAt notes, as Serve stops for Detach, what it read and did not
// deliver: the decoder's pending bytes, then what the connection holds
// unread. d is nil if Serve had not read yet.
func (l *Link) detachedAt(d *framing.Decoder) error {
	det := &Detached{PrefixPending: l.sh.prefixExpect}
	if d != nil {
		if !d.Resumable() {
			return errors.New("the link stopped inside a skipped frame")
		}
		p, prefix := d.Pending()
		det.Pending, det.PrefixPending = bytes.Clone(p), prefix && l.sh.prefixExpect
	}
	if u, ok := l.nc.(unreader); ok {
		det.Pending = append(det.Pending, u.Unread()...)
	}
	l.detached = det
	return ErrDetached
}

// Adopt serves a stream that another process's link detached: nc is its
// socket (from Detached.File), pending and prefixPending what Detach
// said, and remote, if not empty, the client's address as that process
// knew it (a PROXY header's). Serve reads pending first.
func (l *Listener) Adopt(nc net.Conn, pending []byte, prefixPending bool, remote string) (*Link, error) {
	return l.AdoptStream(nc, Adopted{Pending: pending, PrefixPending: prefixPending, Remote: remote})
}

// Adopted is what another process knew of a stream it handed over.
type Adopted struct {
	// Pending and PrefixPending: what Detach said.
	Pending       []byte
	PrefixPending bool
	// Remote and Local, if not empty, are the client's connection's
	// addresses as that process knew them: the link's RemoteAddr and
	// LocalAddr, for a stream whose socket is not the client's (a PROXY
	// header's client; a socketpair's end, relayed from a TLS connection
	// that process kept).
	Remote, Local string
	// TLS: the client's connection is TLS; Identity is the subject of
	// the certificate the client proved it holds, or "".
	TLS      bool
	Identity string
}

// AdoptStream is Adopt with all that the other process knew of the
// stream: a link over a socketpair's end that it relays from a TLS
// connection it kept says TLS, and the client's identity and addresses,
// not the socketpair's.
func (l *Listener) AdoptStream(nc net.Conn, a Adopted) (*Link, error) {
	if len(a.Pending) > l.sh.cfg.bufferSize()-relay.Headroom {
		return nil, fmt.Errorf("%d bytes pending, more than a link's buffer holds", len(a.Pending))
	}
	link := newLink(nc, l.sh)
	link.adopted, link.carry, link.carryPrefix, link.remote = true, bytes.Clone(a.Pending), a.PrefixPending, a.Remote
	link.local, link.tls, link.identity = a.Local, a.TLS, a.Identity
	return link, nil
}

// TLS reports whether the client's connection is TLS: the link's own, or
// one a predecessor kept and relays to this link's socket.
func (l *Link) TLS() bool {
	_, ok := l.nc.(*tls.Conn)
	return ok || l.tls
}
