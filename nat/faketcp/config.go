package faketcp

import (
	"fmt"
	"log/slog"
	"net/netip"
	"time"
)

// SeqMode chooses how data segments number themselves.
type SeqMode uint8

const (
	// SeqLive: each data segment's sequence number follows the previous
	// one's by its payload length, and acks follow the peer's, as in any
	// healthy TCP connection.
	SeqLive SeqMode = iota
	// SeqFrozen: every data segment carries the same seq (ISN+1) and ack
	// (the peer's ISN+1), as FortiOS's fortinet-esp does. Middleboxes
	// with anti-replay checks drop such streams; for interoperability
	// tests and demonstrations only.
	SeqFrozen
)

func (m SeqMode) String() string {
	switch m {
	case SeqLive:
		return "live"
	case SeqFrozen:
		return "frozen"
	}
	return fmt.Sprintf("SeqMode(%d)", uint8(m))
}

// Defaults of Config.
const (
	DefaultIPv4MSS          = 1460 // a 1500-byte MTU less IPv4 and TCP headers
	DefaultIPv6MSS          = 1440 // the same for IPv6
	DefaultWindow           = 64240
	DefaultKeepAlive        = 15 * time.Second
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultMTU              = 65535
)

// Config configures a Stack.
type Config struct {
	// Local is the stack's own IP address on the device, IPv4 or IPv6;
	// required. The stack serves that family only.
	Local netip.Addr
	// Seq is the numbering of data segments; SeqLive unless testing.
	Seq SeqMode
	// MSS is the MSS advertised on SYN and SYN-ACK, and the largest
	// payload accepted: a longer segment is dropped and counted. 0 means
	// DefaultIPv4MSS or DefaultIPv6MSS.
	MSS int
	// Window is the window field of every segment (scaled by 2^7 after
	// the handshake when both offer window scaling). 0 means
	// DefaultWindow.
	Window uint16
	// KeepAlive is the idle time (nothing heard from the peer) after
	// which a dialled conn sends a keepalive, and then again each
	// KeepAlive while still idle; an accepted conn waits 1.5*KeepAlive
	// before its first, so that on an idle conn one side probes and the
	// other answers. A conn that hears nothing for 4*KeepAlive ends with
	// ErrTimeout. 0 means DefaultKeepAlive.
	KeepAlive time.Duration
	// HandshakeTimeout bounds Dial's handshake; its SYN is sent again
	// every second until then. (A listener keeps no half-open conn to
	// bound: it answers SYNs with cookies.) 0 means
	// DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// MTU is the largest IP packet the device delivers: each Read buffer
	// holds Headroom plus this many bytes. It must fit a segment of MSS
	// bytes. 0 means DefaultMTU (any IP packet). On a device that
	// offloads, the buffers hold a whole super-segment (tun.MTU bytes)
	// whatever MTU says.
	MTU int
	// Logger receives connection events at debug level and device
	// errors at warn level; nil discards them.
	Logger *slog.Logger
}

// withDefaults checks cfg and fills in its defaults.
func (cfg Config) withDefaults() (Config, error) {
	if !cfg.Local.IsValid() {
		return cfg, fmt.Errorf("faketcp: Config.Local is required")
	}
	cfg.Local = cfg.Local.Unmap().WithZone("")
	if cfg.Seq != SeqLive && cfg.Seq != SeqFrozen {
		return cfg, fmt.Errorf("faketcp: unknown sequence mode %d", cfg.Seq)
	}
	is4 := cfg.Local.Is4()
	maxMSS, headers := maxIPv6MSS, ipv6HeaderLen+tcpHeaderLen
	if is4 {
		maxMSS, headers = maxIPv4MSS, ipv4HeaderLen+tcpHeaderLen
	}
	if cfg.MSS == 0 {
		cfg.MSS = DefaultIPv6MSS
		if is4 {
			cfg.MSS = DefaultIPv4MSS
		}
	}
	if cfg.MSS < 1 || cfg.MSS > maxMSS {
		return cfg, fmt.Errorf("faketcp: MSS %d outside 1..%d", cfg.MSS, maxMSS)
	}
	if cfg.Window == 0 {
		cfg.Window = DefaultWindow
	}
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = DefaultKeepAlive
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.KeepAlive < 0 || cfg.HandshakeTimeout < 0 {
		return cfg, fmt.Errorf("faketcp: negative KeepAlive %v or HandshakeTimeout %v", cfg.KeepAlive, cfg.HandshakeTimeout)
	}
	if cfg.MTU == 0 {
		cfg.MTU = DefaultMTU
	}
	if cfg.MTU < cfg.MSS+headers {
		return cfg, fmt.Errorf("faketcp: MTU %d cannot hold a %d-byte segment with its %d bytes of headers", cfg.MTU, cfg.MSS, headers)
	}
	if cfg.MTU > maxPacket {
		return cfg, fmt.Errorf("faketcp: MTU %d is more than the largest IP packet, %d bytes", cfg.MTU, maxPacket)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return cfg, nil
}

// tcbConfig is what each conn's state machine is told.
func (cfg *Config) tcbConfig() tcbConfig {
	t := tcbConfig{
		mode:             cfg.Seq,
		mss:              uint16(cfg.MSS),
		window:           cfg.Window,
		keepAlive:        cfg.KeepAlive,
		handshakeTimeout: cfg.HandshakeTimeout,
		maxSendMSS:       maxIPv6MSS,
		defaultPeerMSS:   defaultIPv6PeerMSS,
	}
	if cfg.Local.Is4() {
		t.maxSendMSS, t.defaultPeerMSS = maxIPv4MSS, defaultIPv4PeerMSS
	}
	return t
}
