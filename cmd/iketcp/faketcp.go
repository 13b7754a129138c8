package main

import (
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/nat/fakenet"
	"github.com/iketcp/iketcp/nat/faketcp"
)

// startFakeTCP sets up fake-TCP mode's device and NAT rules and a TCP
// stack on them. stop closes the stack (its conns send FIN), then the
// device, rules and routes, and waits for the stack's reader.
func startFakeTCP(c *cli.Context, log *slog.Logger, role fakenet.Role, port uint16) (*faketcp.Stack, func(), error) {
	seq, err := parseSeqMode(c.String("fake-tcp-seq"))
	if err != nil {
		return nil, nil, err
	}
	var net4 netip.Prefix // zero: nat's default
	if v := c.String("fake-tcp-net"); v != "" {
		if net4, err = netip.ParsePrefix(v); err != nil {
			return nil, nil, fmt.Errorf("--fake-tcp-net %q: %w (want a /30, e.g. 100.127.255.252/30)", v, err)
		}
	}
	fnet, err := fakenet.Setup(fakenet.Config{Role: role, Name: c.String("fake-tcp-name"), Net4: net4, Port: port,
		NoOffload: !c.Bool("fake-tcp-offload"), Logger: log})
	if err != nil {
		return nil, nil, err
	}
	stack, err := faketcp.NewStack(fnet, faketcp.Config{Local: fnet.Endpoint4(), Seq: seq, Logger: log})
	if err != nil {
		fnet.Close()
		return nil, nil, err
	}
	log.Info("fake-TCP ready", "device", fnet.Name(), "endpoint", fnet.Endpoint4().String(), "seq", seq.String(), "offload", stack.Offload())
	if seq == faketcp.SeqFrozen {
		log.Warn("fake-TCP sequence numbers are frozen (FortiOS's behaviour): strict anti-replay middleboxes drop such segments; use this for interoperability tests and demonstrations only")
	}
	stop := func() {
		stack.Close()
		if err := fnet.Close(); err != nil {
			log.Error("removing fake-TCP's device and rules", "err", err)
		}
		<-stack.Done()
	}
	return stack, stop, nil
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
