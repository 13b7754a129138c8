package faketcp

import "errors"

// Why a Conn ended, as Conn.Err reports it; match with errors.Is.
var (
	// ErrReset: the peer (or a stack that no longer knows the connection,
	// such as a restarted peer) sent an RST, or refused the handshake.
	ErrReset = errors.New("faketcp: connection reset by peer")
	// ErrTimeout: Dial's handshake did not complete within
	// Config.HandshakeTimeout, or nothing was heard from the peer for
	// four keepalive intervals.
	ErrTimeout = errors.New("faketcp: connection timed out")
	// ErrClosed: Conn.Close, Listener.Close or Stack.Close ended it, or
	// the device failed.
	ErrClosed = errors.New("faketcp: connection closed")
	// ErrPeerClosed: the peer sent a FIN.
	ErrPeerClosed = errors.New("faketcp: connection closed by peer")
)

// ErrTooLarge is what Send returns, wrapped, when it refused a datagram
// that is empty or larger than the peer's MSS; it sent the others.
var ErrTooLarge = errors.New("faketcp: datagram does not fit one segment")

// Errors of Send that carry no detail, allocated once so that Send never
// allocates.
var (
	errOffset = errors.New("faketcp: Send needs offset >= Headroom")
)
