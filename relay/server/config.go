package server

import (
	"log/slog"
	"net/netip"
	"time"

	"github.com/iketcp/iketcp/relay"
)

// Defaults of Config's zero fields.
const (
	DefaultSessionIdle = 5 * time.Minute
	DefaultMaxConns    = 1024
	DefaultMaxSessions = 4096
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
	// MaxConns and MaxSessions bound concurrent connections and sessions.
	MaxConns, MaxSessions int
	// MaxDatagram is the largest datagram relayed from the backend; larger
	// ones are counted and dropped.
	MaxDatagram int
	// Version is reported in Status.
	Version string
}

func (c *Config) logger() *slog.Logger { return relay.OrDefault(c.Logger, slog.Default()) }
func (c *Config) sessionIdle() time.Duration {
	return relay.OrDefault(c.SessionIdle, DefaultSessionIdle)
}
func (c *Config) maxConns() int    { return relay.OrDefault(c.MaxConns, DefaultMaxConns) }
func (c *Config) maxSessions() int { return relay.OrDefault(c.MaxSessions, DefaultMaxSessions) }
func (c *Config) maxDatagram() int { return relay.OrDefault(c.MaxDatagram, relay.DefaultMaxDatagram) }
