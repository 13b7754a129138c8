package server

import (
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/reorder"
)

// Defaults of Config's zero fields. The per-source limits suit carrier-
// grade NAT, where many clients share one public address: they bound what
// one address can hold that has not been confirmed, not what its
// established clients use.
const (
	DefaultSessionIdle             = 5 * time.Minute
	DefaultMaxConns                = 4096
	DefaultMaxUnconfirmedPerSource = 64
	DefaultConfirmTimeout          = 60 * time.Second
	DefaultMaxSessions             = 4096
	DefaultMaxSessionsPerSource    = 256
	DefaultMaxHalfOpen             = 1024
	DefaultMaxHalfOpenPerSource    = 32
	DefaultHalfOpenTimeout         = 30 * time.Second
)

// Config configures a Server. Only Backend is required; zero values mean
// the defaults. What concerns one kind of link (the prefix timeout, a
// stream's read buffer, write timeouts) is its listener's.
type Config struct {
	// Backend is the IKE daemon's UDP NAT-T socket, usually 127.0.0.1:4500.
	Backend netip.AddrPort
	// Counters, if set, is where the server counts; its listeners' links
	// should count there too. Nil means counters of the server's own.
	Counters *relay.Counters
	Logger   *slog.Logger
	// SessionIdle is how long a session without a connection waits for its
	// client to reconnect before it expires.
	SessionIdle time.Duration
	// MaxConns bounds concurrent connections. When it is reached, a new
	// connection takes the place of the oldest one that carries no
	// confirmed session, or is refused if every one carries one.
	MaxConns int
	// MaxUnconfirmedPerSource bounds the connections without a confirmed
	// session from one source: an IPv4 address or an IPv6 /64.
	MaxUnconfirmedPerSource int
	// ConfirmTimeout closes a connection that has carried no confirmed
	// session for that long (since it was accepted, or since its last one
	// left).
	ConfirmTimeout time.Duration
	// MaxSessions and MaxSessionsPerSource bound sessions, each with a
	// backend socket, in all and per source.
	MaxSessions, MaxSessionsPerSource int
	// MaxHalfOpen and MaxHalfOpenPerSource bound the sessions whose
	// IKE_SA_INIT the backend has not answered yet; HalfOpenTimeout is how
	// long one may wait for that answer.
	MaxHalfOpen, MaxHalfOpenPerSource int
	HalfOpenTimeout                   time.Duration
	// DialBackend, if set, opens each session's socket toward the backend,
	// for the client at client (its address as the server sees it, or as
	// a PROXY header says): nat/realaddr's sockets carry that address, so
	// the daemon sees its real peers. release closes the socket. Nil means
	// a socket of the server's own address.
	DialBackend func(client netip.Addr, backend netip.AddrPort) (conn *net.UDPConn, release func() error, err error)
	// AdoptBackend, if set, takes over a backend socket that a
	// predecessor's Handover gave (DialBackend's, in the predecessor), and
	// returns its release, as DialBackend does; Adopt calls it for each
	// session. Nil means the release only closes the socket.
	AdoptBackend func(conn *net.UDPConn) (release func() error, err error)
	// MaxDatagram is the largest datagram relayed from the backend; larger
	// ones are counted and dropped.
	MaxDatagram int
	// StatePath, if set, is the file in which the server keeps its
	// session table (package statefile), and from which it rebuilds the
	// sessions when it starts again. It holds the sessions' ticket keys:
	// it is written with mode 0600.
	StatePath string
	// StateInterval is the least time between two writes of the state
	// file; changes in between are written together.
	StateInterval time.Duration
	// Version is reported in Status.
	Version string
	// ReorderMax caps how long an aggregate's reorder buffer holds ESP
	// behind a gap before the daemon gets it (package relay/reorder):
	// zero means reorder.DefaultMax, negative turns the buffer off.
	ReorderMax time.Duration
	// ReorderMemory bounds the bytes that every aggregate's reorder
	// buffers hold together (reorder.Budget): past it, ESP behind a gap
	// goes to the daemon at once instead of waiting. Zero means
	// DefaultReorderMemory.
	ReorderMemory int64
}

// DefaultReorderMemory is the default of Config.ReorderMemory: 32,768
// held datagrams of up to 2 KiB, whichever aggregates hold them.
const DefaultReorderMemory = 64 << 20

func (c *Config) logger() *slog.Logger { return relay.OrDefault(c.Logger, slog.Default()) }
func (c *Config) sessionIdle() time.Duration {
	return relay.OrDefault(c.SessionIdle, DefaultSessionIdle)
}
func (c *Config) maxConns() int { return relay.OrDefault(c.MaxConns, DefaultMaxConns) }
func (c *Config) maxUnconfirmedPerSource() int {
	return relay.OrDefault(c.MaxUnconfirmedPerSource, DefaultMaxUnconfirmedPerSource)
}
func (c *Config) confirmTimeout() time.Duration {
	return relay.OrDefault(c.ConfirmTimeout, DefaultConfirmTimeout)
}
func (c *Config) maxSessions() int { return relay.OrDefault(c.MaxSessions, DefaultMaxSessions) }
func (c *Config) maxSessionsPerSource() int {
	return relay.OrDefault(c.MaxSessionsPerSource, DefaultMaxSessionsPerSource)
}
func (c *Config) maxHalfOpen() int { return relay.OrDefault(c.MaxHalfOpen, DefaultMaxHalfOpen) }
func (c *Config) maxHalfOpenPerSource() int {
	return relay.OrDefault(c.MaxHalfOpenPerSource, DefaultMaxHalfOpenPerSource)
}
func (c *Config) halfOpenTimeout() time.Duration {
	return relay.OrDefault(c.HalfOpenTimeout, DefaultHalfOpenTimeout)
}
func (c *Config) reorderMax() time.Duration { return reorder.Limit(c.ReorderMax) }
func (c *Config) maxDatagram() int          { return relay.OrDefault(c.MaxDatagram, relay.DefaultMaxDatagram) }
