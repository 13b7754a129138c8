package client

import (
	"log/slog"
	"net/netip"
	"syscall"
	"time"

	"github.com/iketcp/iketcp/fallback"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/aggregate"
)

// Defaults of Config's zero fields.
const (
	DefaultMaxFlows     = 64
	DefaultFlowIdle     = 2 * time.Minute
	DefaultDialTimeout  = 5 * time.Second
	DefaultReconnectMin = 100 * time.Millisecond
	DefaultReconnectMax = 5 * time.Second
)

// Config configures a Client. Zero values mean the defaults.
type Config struct {
	// Peer is the iketcp server in explicit mode (Serve), host:port. It is
	// resolved at each dial.
	Peer string
	// Peers are the IKE peers whose traffic transparent mode (ServeTUN)
	// carries; each is dialled at TCPPort. Packets to other addresses are
	// dropped and counted.
	Peers []netip.Addr
	// TCPPort is the iketcp server's port on each of Peers (default 4500).
	TCPPort uint16
	// Transport is how flows reach the peer: ModeTCP (the default: links
	// to the iketcp server), ModeUDP (datagrams to the peer's UDPPort: a
	// plain NAT-T relay), or ModeFallback (UDP first, a link when UDP
	// stays unanswered for FallbackThreshold; with Race, a link alongside
	// UDP after the first unanswered retransmission).
	Transport         fallback.Mode
	FallbackThreshold time.Duration
	Race              bool
	// UDPPort is the peer's UDP NAT-T port for the UDP transport (default
	// 4500): the IKE daemon's own, not iketcp's.
	UDPPort uint16
	// Control, if set, is applied to every UDP socket the client opens
	// toward a peer (transparent mode marks them to bypass its
	// interception); the Dialer's sockets need it too.
	Control func(network, address string, c syscall.RawConn) error
	// Dialer opens the links of the TCP transport; nil means RFC 9329
	// streams (relay/streamlink) with the defaults.
	Dialer relay.Dialer
	// PlainRFC9329 says the server is a third-party RFC 9329 responder (a
	// FortiGate, libreswan with espintcp): the client then sends nothing
	// but RFC 9329 frames, and no iketcp control messages. Its sessions
	// then come back after a reconnect only through IKE.
	PlainRFC9329 bool
	// Counters, if set, is where the client counts; its links' dialer
	// should count there too. Nil means counters of the client's own.
	Counters *relay.Counters
	Logger   *slog.Logger
	// MaxFlows bounds local flows (daemon addresses) served at once.
	MaxFlows int
	// FlowIdle closes a flow, and its link, when the daemon has sent
	// nothing (not even a keepalive) for that long.
	FlowIdle time.Duration
	// QueueBytes bounds the ESP waiting for a link that is not up yet,
	// and QueueDelay is how long it may wait (package relay/sendq); the
	// links' own queues are their Dialer's.
	QueueBytes int
	QueueDelay time.Duration
	// MaxDatagram is the largest datagram relayed either way.
	MaxDatagram int
	// DialTimeout bounds one connection attempt.
	DialTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the backoff between attempts.
	ReconnectMin, ReconnectMax time.Duration
	// LivenessTimeout is how long a link to an iketcp server may hear
	// nothing before the client takes it for dead, closes it and
	// reconnects (liveness.go); zero means DefaultLivenessTimeout, a
	// negative value turns the check off. Toward third-party servers
	// (PlainRFC9329) it does nothing: give the Dialer's links the same
	// bound in TCP (streamlink.Config.DeadAfter).
	LivenessTimeout time.Duration
	// Version is reported in Status.
	Version string
	// Members, if set, make each IKE SA's way to the server an aggregate
	// of these links (members.go), all joined to the server's one session
	// for it, with LocationID and the Aggregate algorithm (default
	// round-robin). They need an iketcp server and explicit mode.
	Members    []Member
	LocationID [4]byte
	Aggregate  aggregate.Algorithm
	// ReorderMax caps how long an aggregate's reorder buffer holds ESP
	// behind a gap before the daemon gets it (package relay/reorder):
	// zero means reorder.DefaultMax, negative turns the buffer off.
	ReorderMax time.Duration
	// HelloWait is how long a new link waits for the server's answer to
	// iketcp's hello before it takes the server for a third-party RFC 9329
	// responder: the link is given up, and the path's next links send RFC
	// 9329 frames only. Zero means DefaultHelloWait.
	HelloWait time.Duration
}

// DefaultHelloWait is Config.HelloWait's default: an iketcp server
// answers at once, so this is a round trip with a wide margin.
const DefaultHelloWait = 2 * time.Second

func (c *Config) logger() *slog.Logger    { return relay.OrDefault(c.Logger, slog.Default()) }
func (c *Config) maxFlows() int           { return relay.OrDefault(c.MaxFlows, DefaultMaxFlows) }
func (c *Config) flowIdle() time.Duration { return relay.OrDefault(c.FlowIdle, DefaultFlowIdle) }
func (c *Config) maxDatagram() int        { return relay.OrDefault(c.MaxDatagram, relay.DefaultMaxDatagram) }
func (c *Config) dialTimeout() time.Duration {
	return relay.OrDefault(c.DialTimeout, DefaultDialTimeout)
}
func (c *Config) reconnectMin() time.Duration {
	return relay.OrDefault(c.ReconnectMin, DefaultReconnectMin)
}
func (c *Config) reconnectMax() time.Duration {
	return relay.OrDefault(c.ReconnectMax, DefaultReconnectMax)
}
func (c *Config) livenessTimeout() time.Duration {
	return relay.OrDefault(c.LivenessTimeout, DefaultLivenessTimeout)
}
func (c *Config) helloWait() time.Duration {
	return relay.OrDefault(c.HelloWait, DefaultHelloWait)
}
func (c *Config) tcpPort() uint16 { return relay.OrDefault(c.TCPPort, 4500) }
func (c *Config) udpPort() uint16 { return relay.OrDefault(c.UDPPort, 4500) }
