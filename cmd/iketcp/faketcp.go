package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync/atomic"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/nat/fakenet"
	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/fakelink"
)

// fakeTCP is fake-TCP mode running: its device, NAT rules and TCP stack.
type fakeTCP struct {
	stack *faketcp.Stack
	net   *fakenet.Net
	log   *slog.Logger
	// kept: the device, table and forwarding belong to another process
	// (handed over to a successor, or adopted from a predecessor this
	// process has not yet taken over from): stop leaves them.
	kept atomic.Bool
}

// stop closes the stack (its conns send FIN), then removes the device and
// rules, and waits for the stack's reader. With kept, the device's
// descriptor here closes first, so nothing goes out, and all of it stays.
func (f *fakeTCP) stop() {
	if f.kept.Load() {
		f.net.Release()
		f.stack.Close()
		<-f.stack.Done()
		return
	}
	f.stack.Close()
	if err := f.net.Close(); err != nil {
		f.log.Error("removing fake-TCP's device and rules", "err", err)
	}
	<-f.stack.Done()
}

// fakeTCPConfig is what the flags ask of fake-TCP mode.
func fakeTCPConfig(c *cli.Context, log *slog.Logger, role fakenet.Role, port uint16, sources []fakenet.Source) (fakenet.Config, faketcp.SeqMode, error) {
	seq, err := parseSeqMode(c.String("fake-tcp-seq"))
	if err != nil {
		return fakenet.Config{}, 0, err
	}
	var net4 netip.Prefix // zero: nat's default
	if v := c.String("fake-tcp-net"); v != "" {
		if net4, err = netip.ParsePrefix(v); err != nil {
			return fakenet.Config{}, 0, fmt.Errorf("--fake-tcp-net %q: %w (want a /30, e.g. 100.127.255.252/30)", v, err)
		}
	}
	return fakenet.Config{Role: role, Name: c.String("fake-tcp-name"), Net4: net4, Port: port, Sources: sources,
		NoOffload: !c.Bool("fake-tcp-offload"), Logger: log}, seq, nil
}

// startFakeTCP sets up fake-TCP mode's device and NAT rules and a TCP
// stack on them; its stop undoes it.
func startFakeTCP(c *cli.Context, log *slog.Logger, role fakenet.Role, port uint16, sources []fakenet.Source) (*fakeTCP, error) {
	cfg, seq, err := fakeTCPConfig(c, log, role, port, sources)
	if err != nil {
		return nil, err
	}
	fnet, err := fakenet.Setup(cfg)
	if err != nil {
		return nil, err
	}
	stack, err := faketcp.NewStack(fnet, faketcp.Config{Local: fnet.Endpoint4(), Seq: seq, Logger: log})
	if err != nil {
		fnet.Close()
		return nil, err
	}
	fakeTCPReady(log, fnet, stack, seq)
	return &fakeTCP{stack: stack, net: fnet, log: log}, nil
}

// resumeFakeTCP takes over a predecessor's fake-TCP mode: its device (dev,
// handed over), table and forwarding, and a stack that goes on from its
// stack's state st, with its listeners (in st.Listeners' order) and conns
// (in st.Conns'). What it adopted is kept (fakeTCP.kept) until the caller
// has taken over.
func resumeFakeTCP(c *cli.Context, log *slog.Logger, port uint16, dev *os.File, st faketcp.StackState) (*fakeTCP, []*faketcp.Listener, []*faketcp.Conn, error) {
	cfg, seq, err := fakeTCPConfig(c, log, fakenet.Server, port, nil)
	if err != nil {
		return nil, nil, nil, err
	}
	fnet, err := fakenet.Adopt(cfg, dev)
	if err != nil {
		return nil, nil, nil, err
	}
	stack, lns, conns, err := faketcp.ResumeStack(fnet, faketcp.Config{Local: fnet.Endpoint4(), Seq: seq, Logger: log}, st)
	if err != nil {
		fnet.Release()
		return nil, nil, nil, err
	}
	fakeTCPReady(log, fnet, stack, seq)
	f := &fakeTCP{stack: stack, net: fnet, log: log}
	f.kept.Store(true)
	return f, lns, conns, nil
}

func fakeTCPReady(log *slog.Logger, fnet *fakenet.Net, stack *faketcp.Stack, seq faketcp.SeqMode) {
	log.Info("fake-TCP ready", "device", fnet.Name(), "endpoint", fnet.Endpoint4().String(), "seq", seq.String(), "offload", stack.Offload())
	if seq == faketcp.SeqFrozen {
		log.Warn("fake-TCP sequence numbers are frozen (FortiOS's behaviour): strict anti-replay middleboxes drop such segments; use this for interoperability tests and demonstrations only")
	}
}

// fakeTCPMembers fills cfg's aggregate (aggregateConfig) for fake-TCP.
// Each member dials from a block of the stack's ephemeral ports of its
// own, which the kernel's NAT gives the member's LOCAL address (a
// source); a member whose LOCAL is unspecified (0.0.0.0) keeps the
// masquerade, the outgoing device's address. It returns the members'
// dialers, whose Stack the caller sets once the stack runs, and the
// sources for fakenet.Setup.
func fakeTCPMembers(c *cli.Context, cfg *client.Config) ([]*fakelink.Dialer, []fakenet.Source, error) {
	n := len(c.StringSlice("member"))
	var dialers []*fakelink.Dialer
	var sources []fakenet.Source
	err := aggregateConfig(c, cfg, func(local netip.Addr) (relay.Dialer, error) {
		if local.Is6() {
			return nil, fmt.Errorf("--member from %s: fake-TCP's client carries IPv4 only; use --encap rfc9329 for an IPv6 member", local)
		}
		ports := memberPorts(len(dialers), n)
		d := &fakelink.Dialer{Ports: ports}
		if !local.IsUnspecified() {
			d.Source = local
			sources = append(sources, fakenet.Source{Addr: local, FirstPort: ports.First, LastPort: ports.Last})
		}
		dialers = append(dialers, d)
		return d, nil
	})
	if err != nil {
		return nil, nil, err
	}
	return dialers, sources, nil
}

// memberPorts is member i's block of n equal ones cut out of the stack's
// ephemeral ports.
func memberPorts(i, n int) faketcp.PortRange {
	eph := faketcp.EphemeralPorts
	size := eph.Len() / n
	first := int(eph.First) + i*size
	return faketcp.PortRange{First: uint16(first), Last: uint16(first + size - 1)}
}

// orMasquerade names a member's source address for the log: its own, or
// the masquerade's choice.
func orMasquerade(a netip.Addr) string {
	if a.IsValid() {
		return a.String()
	}
	return "masquerade (the outgoing device's address)"
}

func parseSeqMode(s string) (faketcp.SeqMode, error) {
	switch s {
	case "live":
		return faketcp.SeqLive, nil
	case "frozen":
		return faketcp.SeqFrozen, nil
	}
	return 0, fmt.Errorf("--fake-tcp-seq %q: want live or frozen", s)
}
