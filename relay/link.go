package relay

import (
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"time"
)

// Headroom is the room every datagram a link sends has in front of it, to
// build the link's headers in place: the frame Length of an RFC 9329
// stream, or the IP and TCP headers of a fake-TCP segment (IPv6 and TCP,
// rounded up). Every datagram a link receives has at least as much room
// in front of it, for the headers the way to the daemon adds (transparent
// mode's IP and UDP headers).
const Headroom = 64

// A Link is one connection to the far iketcp (or RFC 9329 peer), of any
// kind: an RFC 9329 stream (package relay/streamlink) or a fake-TCP conn
// (package relay/fakelink). Both roles use the same links; only who opens
// them differs.
type Link interface {
	// Send sends each bufs[k][Headroom:] as one datagram, in order;
	// bufs[k][:Headroom] may be overwritten. Send is safe for concurrent
	// use and does not keep bufs.
	Send(bufs [][]byte) error
	// Serve hands what the far end sends to rx, a burst at a time, until
	// the link ends, and returns why: never nil. An error from rx ends
	// the link with that error. Serve is called once.
	Serve(rx Receiver) error
	// Close ends the link; Serve returns. It is idempotent.
	Close() error
	// LocalAddr and RemoteAddr are the link's ends, for logs and Status.
	LocalAddr() string
	RemoteAddr() string
}

// A Receiver takes the datagrams a link receives.
type Receiver interface {
	// Receive takes a burst of datagrams. They alias the link's buffers
	// and are valid only until Receive returns. The room in front of
	// each, Buf[:Off] (at least Headroom bytes), may be overwritten once
	// the datagrams before it in the burst are done with. A non-nil error
	// ends the link: Serve returns it.
	Receive(burst []Datagram) error
}

// Datagram is one received datagram, Buf[Off:Off+N], in port-4500 form
// (IKE behind its non-ESP marker, raw ESP, or a keepalive).
type Datagram struct {
	Buf    []byte
	Off, N int
}

// Bytes returns the datagram.
func (d Datagram) Bytes() []byte { return d.Buf[d.Off : d.Off+d.N] }

// A Dialer opens links to the far end for a client.
type Dialer interface {
	// DialLink opens a link to addr (host:port).
	DialLink(ctx context.Context, addr string) (Link, error)
}

// A Listener accepts the links that clients open to a server.
type Listener interface {
	// Accept waits for the next link. It returns an error matching
	// net.ErrClosed once the listener is closed; other errors are
	// temporary (out of file descriptors, say), and the caller retries.
	Accept(ctx context.Context) (Link, error)
	Close() error
	// Addr is what the listener listens on, for logs and Status.
	Addr() string
	// Encap names the links' kind, for logs and Status: "rfc9329" or
	// "fake-tcp".
	Encap() string
}

// ProtocolError ends a link whose far end broke the protocol (a wrong
// prefix, a frame length of 0 or 1, sustained garbage): an event worth a
// warning, unlike a peer that closes or a network that fails.
type ProtocolError struct {
	Reason string
}

func (e *ProtocolError) Error() string { return e.Reason }

// IsProtocolError reports whether err is, or wraps, a *ProtocolError.
func IsProtocolError(err error) bool {
	var pe *ProtocolError
	return errors.As(err, &pe)
}

// Identified is a link that can say who is at its far end: the identity
// of the certificate a TLS client proved it holds (a link over TLS with
// client certificates). Identity is "" while the far end has proved none,
// as before the TLS handshake, which the link's Serve completes on its
// first read.
type Identified interface {
	Identity() string
}

// IdentityOf returns the identity of the far end of link, or "".
func IdentityOf(link Link) string {
	if id, ok := link.(Identified); ok {
		return id.Identity()
	}
	return ""
}

// A Detachable link can stop and hand its stream to another process, as
// a server's upgrade does: the stream continues there, and the far end
// sees no change. See streamlink's Detach for what it guarantees.
type Detachable interface {
	Detach(timeout time.Duration) (*DetachedLink, error)
}

// DetachedLink is a stopped link's stream, for another process: a
// socket (a stream link's), the state of a link that has none (a
// fake-TCP link's, whose connection lives in a userspace stack), or a
// connection whose state cannot leave this process (TLS's), which this
// process keeps and relays.
type DetachedLink struct {
	// File is a duplicate of the link's socket; the receiver closes it.
	// Nil for a link with State or Conn instead.
	File *os.File
	// Conn is the link's connection itself, for a link whose connection
	// cannot go to another process (TLS: Go's crypto/tls cannot export a
	// live session): the receiver owns it (the link's Close leaves it
	// open), and relays its stream to the other process, Pending first,
	// then what Conn reads, at a frame boundary or not.
	Conn net.Conn
	// TLS: Conn is a TLS connection, or the stream is one a predecessor
	// relays from a TLS connection it kept.
	TLS bool
	// Encap and State, for a link without a socket: its kind ("fake-tcp")
	// and its connection's state, which that kind's adoption reads.
	Encap string
	State []byte
	// Pending is what was read from the stream and not delivered: part
	// of the prefix if PrefixPending, then part of a frame or frames.
	Pending       []byte
	PrefixPending bool
}

// ErrDetached is what a link's Serve returns once Detach stopped it, and
// its Send after that.
var ErrDetached = errors.New("link handed over to another process")

// Drainer is a Link that can let out what it has queued before it is
// closed: a stopping relay drains its links, within a bound, then closes
// them.
type Drainer interface {
	// Drain returns once nothing waits to be written, or ctx ends.
	Drain(ctx context.Context) error
}

// DrainLinks drains, at once, those of links that are Drainers, and
// returns when all have drained or ctx has ended.
func DrainLinks(ctx context.Context, links []Link) {
	var wg sync.WaitGroup
	for _, l := range links {
		if d, ok := l.(Drainer); ok {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d.Drain(ctx)
			}()
		}
	}
	wg.Wait()
}

// ErrClosedHere ends a link that this side closed.
var ErrClosedHere = errors.New("closed by iketcp")
