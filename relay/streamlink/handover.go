package streamlink

import (
	"bytes"
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

// ErrDetached is what Serve returns once Detach stopped it, and Send
// after that.
var ErrDetached = relay.ErrDetached

// ErrNotDetachable is Detach's error for a link whose state lives in this
// process only: TLS, whose session keys and sequence numbers Go's
// crypto/tls cannot hand over.
var ErrNotDetachable = errors.New("a TLS link cannot be handed over: its client reconnects and claims its session")

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
func (l *Link) Detach(timeout time.Duration) (*Detached, error) {
	if l.direct == nil {
		return nil, ErrNotDetachable
	}
	raw := rawConn(l.nc)
	if raw == nil {
		return nil, errors.New("the link's connection is not a socket")
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
	f, err := dupSocket(raw)
	if err != nil {
		return nil, err
	}
	d := l.detached
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
	if len(pending) > l.sh.cfg.bufferSize()-relay.Headroom {
		return nil, fmt.Errorf("%d bytes pending, more than a link's buffer holds", len(pending))
	}
	link := newLink(nc, l.sh)
	link.adopted, link.carry, link.carryPrefix, link.remote = true, bytes.Clone(pending), prefixPending, remote
	return link, nil
}
