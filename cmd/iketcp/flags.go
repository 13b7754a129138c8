package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/nat/fakenet"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/control"
	"github.com/iketcp/iketcp/relay/sendq"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// Flags shared by server and client.
func commonFlags(role string) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "encap", Value: "rfc9329", Usage: "rfc9329 (standard TCP encapsulation) or fake-tcp (each datagram in a TCP-shaped segment that no kernel TCP stream owns; both ends must be iketcp; needs CAP_NET_ADMIN)", EnvVars: envVar("encap")},
		&cli.StringFlag{Name: "fake-tcp-seq", Value: "live", Usage: "fake-tcp: live (sequence numbers advance, acks track the peer) or frozen (FortiOS's constant sequence number: strict anti-replay middleboxes drop it; for interoperability tests and demonstrations only)", EnvVars: envVar("fake-tcp-seq")},
		&cli.StringFlag{Name: "fake-tcp-net", Usage: "fake-tcp: the /30 of the TUN device that connects the userspace TCP endpoint to the network, unused by anything else on the host (default 100.127.255.252/30)", EnvVars: envVar("fake-tcp-net")},
		&cli.StringFlag{Name: "fake-tcp-name", Value: fakenet.DefaultName, Usage: "fake-tcp: the TUN device's name", EnvVars: envVar("fake-tcp-name")},
		&cli.BoolFlag{Name: "fake-tcp-offload", Value: true, Usage: "fake-tcp: hand TCP segmentation and checksums to the kernel, so that a run of datagrams takes one system call (--fake-tcp-offload=false: one segment per system call, as where the kernel refuses)", EnvVars: envVar("fake-tcp-offload")},
		&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: envVar("log-level")},
		&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json", EnvVars: envVar("log-format")},
		&cli.StringFlag{Name: "control", Value: control.DefaultPath(role), Usage: "unix socket that `iketcp status` reads", EnvVars: envVar("control")},
		&cli.IntFlag{Name: "max-datagram", Value: relay.DefaultMaxDatagram, Usage: "largest datagram relayed either way, bytes (up to 65533)", EnvVars: envVar("max-datagram")},
		&cli.IntFlag{Name: "conn-buffer", Value: relay.DefaultConnBuffer, Usage: "read buffer of each TCP connection, bytes, taken from a pool while data is in flight", EnvVars: envVar("conn-buffer")},
		&cli.DurationFlag{Name: "write-timeout", Value: relay.DefaultWriteTimeout, Usage: "close a TCP connection that takes no data for this long", EnvVars: envVar("write-timeout")},
		&cli.IntFlag{Name: "queue-bytes", Value: sendq.DefaultBudget, Usage: "ESP held for a connection that cannot send it yet, bytes; beyond it the newest is dropped (IKE waits apart and goes first)", EnvVars: envVar("queue-bytes")},
		&cli.DurationFlag{Name: "queue-delay", Value: sendq.DefaultTarget, Usage: "ESP (but small packets) that waited this long for its connection is dropped rather than sent late", EnvVars: envVar("queue-delay")},
		&cli.IntFlag{Name: "tcp-notsent", Value: 0, Usage: "TCP_NOTSENT_LOWAT of each TCP connection: about the most it holds unsent, bytes (0: about 2 ms at the connection's delivery rate, 4 KiB to 1 MiB; -1: the system's, unlimited)", EnvVars: envVar("tcp-notsent")},
		&cli.StringFlag{Name: "tcp-congestion", Value: streamlink.DefaultCongestion, Usage: "TCP congestion control of each connection (\"-\": the system's)", EnvVars: envVar("tcp-congestion")},
	}
}

func newLogger(c *cli.Context, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.String("log-level"))
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", c.String("log-format"))
}

// checkSizes validates the size flags both roles share.
func checkSizes(c *cli.Context) error {
	if v := c.Int("max-datagram"); v < 576 || v > 65533 {
		return fmt.Errorf("--max-datagram %d: want 576 to 65533 bytes", v)
	}
	if v := c.Int("conn-buffer"); v < 2048 || v > 16<<20 {
		return fmt.Errorf("--conn-buffer %d: want 2048 bytes to 16 MiB", v)
	}
	return nil
}

func positive(c *cli.Context, names ...string) error {
	for _, n := range names {
		switch v := c.Value(n).(type) {
		case int:
			if v <= 0 {
				return fmt.Errorf("--%s %d: must be positive", n, v)
			}
		case time.Duration:
			if v <= 0 {
				return fmt.Errorf("--%s %v: must be positive", n, v)
			}
		}
	}
	return nil
}

// serve runs one relay role with its control socket until ctx ends.
func serve(ctx context.Context, log *slog.Logger, controlPath string, needs []capNeed, status func() any, run func(context.Context) error) error {
	ctl, err := control.Listen(controlPath, status, log)
	if err != nil {
		return err
	}
	defer ctl.Close()
	dropCapabilities(log, needs) // everything is set up
	log.Info("control socket ready", "path", ctl.Path())
	err = run(ctx)
	log.Info("stopped")
	return err
}

// prepare checks the flags both roles share, and the named ones that must
// be positive, and returns the logger they ask for.
func prepare(c *cli.Context, mustBePositive ...string) (*slog.Logger, error) {
	log, err := newLogger(c, os.Stderr)
	if err != nil {
		return nil, err
	}
	if err := checkSizes(c); err != nil {
		return nil, err
	}
	return log, positive(c, append(mustBePositive, "write-timeout", "queue-bytes", "queue-delay")...)
}

// linkConfig is the configuration of RFC 9329 links from the flags both
// roles share.
func linkConfig(c *cli.Context, counters *relay.Counters, log *slog.Logger) streamlink.Config {
	return streamlink.Config{
		MaxDatagram:   c.Int("max-datagram"),
		BufferSize:    c.Int("conn-buffer"),
		WriteTimeout:  c.Duration("write-timeout"),
		PrefixTimeout: c.Duration("prefix-timeout"), // the server's; zero on a client
		QueueBytes:    c.Int("queue-bytes"),
		QueueDelay:    c.Duration("queue-delay"),
		NotSentLowat:  c.Int("tcp-notsent"),
		Congestion:    c.String("tcp-congestion"),
		Counters:      counters,
		Logger:        log,
	}
}

// resolveUDP turns host:port into an address, resolving a host name once.
func resolveUDP(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	ua, err := net.ResolveUDPAddr("udp", s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q: %w (want host:port, e.g. 127.0.0.1:4500 or [::1]:4500)", s, err)
	}
	ap := ua.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}
