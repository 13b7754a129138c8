package perf

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strconv"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// The paths the harness measures, in the order the report lists them.
const (
	PathDirect    = "direct UDP"
	PathRFC9329   = "iketcp rfc9329"
	PathFakeTCP   = "iketcp fake-tcp"
	PathUDPTunnel = "udptunnel"
)

// Ports and addresses of the paths in a Pair lab (site and hub joined by
// one veth pair). Each path has ports of its own, so that all of them can
// be up at once and the harness can take turns between them, step by
// step: a drift in the machine's speed then touches every path alike.
const (
	directPort = 6000 // the sink on the hub's veth address

	rfcServerPort, rfcBackendPort, rfcClientPort    = 4500, 4500, 14500
	fakeServerPort, fakeBackendPort, fakeClientPort = 4501, 4501, 14501

	// udptunnel relays RTP-style: each end binds the port on every
	// address, sends what it gets from the tunnel to addr:port, and takes
	// what arrives on the port into the tunnel. The blaster and the sink
	// bind the port on 127.0.0.2 (more specific, so they get what the
	// tunnel delivers) and send to 127.0.0.1:port (the tunnel).
	utTCPPort, utUDPPort = 7000, 6002
)

var (
	loopback  = netip.MustParseAddr("127.0.0.1")
	loopback2 = netip.MustParseAddr("127.0.0.2")
	siteOuter = netip.MustParseAddr(lab.SiteOuter)
	hubOuter  = netip.MustParseAddr(lab.HubOuter)
)

// Path is one way from the site's blaster to the hub's sink, with the
// relay processes that carry it.
type Path struct {
	Name    string
	Blaster *Blaster
	Sink    *Sink
	// Relays are the relay processes (client first), whose CPU the
	// harness measures; none for direct UDP.
	Relays []*lab.Process
}

// RelayPIDs returns the relay processes' PIDs.
func (p *Path) RelayPIDs() []int {
	pids := make([]int, len(p.Relays))
	for i, r := range p.Relays {
		pids[i] = r.PID()
	}
	return pids
}

// Close stops the relays (by PID) and closes the sockets.
func (p *Path) Close() error {
	var errs []error
	for _, r := range p.Relays {
		errs = append(errs, r.Stop())
	}
	if p.Blaster != nil {
		p.Blaster.Close()
	}
	if p.Sink != nil {
		p.Sink.Close()
	}
	return errors.Join(errs...)
}

// alive reports an error if a relay has exited.
func (p *Path) alive() error {
	for _, r := range p.Relays {
		if r.Exited() {
			return fmt.Errorf("%s: %s (pid %d) exited: %v\n%s", p.Name, r.Name(), r.PID(), r.ExitErr(), tailString(r.Log(), 1500))
		}
	}
	return nil
}

func tailString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}

// openDirect: the blaster on the site's veth address sends straight to the
// sink on the hub's.
func openDirect(l *lab.Lab, mode IOMode) (*Path, error) {
	p := &Path{Name: PathDirect}
	var err error
	if p.Sink, err = NewSink(l.Hub, SinkConfig{Local: netip.AddrPortFrom(hubOuter, directPort), Mode: mode}); err != nil {
		return nil, err
	}
	if p.Blaster, err = NewBlaster(l.Site, BlasterConfig{
		Local: netip.AddrPortFrom(siteOuter, 0), Dst: netip.AddrPortFrom(hubOuter, directPort), Mode: mode,
	}); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// openIketcp: iketcp server at the hub with the sink as its backend,
// iketcp client at the site with the blaster as its daemon, as the README
// tells users to run them (default flags but the addresses, plus the
// fake-TCP device's network). The blaster opens a session with an
// IKE_SA_INIT that the sink answers.
func openIketcp(ctx context.Context, l *lab.Lab, bin string, fake bool, mode IOMode) (p *Path, err error) {
	name, srvPort, backendPort, clientPort := PathRFC9329, rfcServerPort, rfcBackendPort, rfcClientPort
	var srvExtra, clExtra []string
	if fake {
		name, srvPort, backendPort, clientPort = PathFakeTCP, fakeServerPort, fakeBackendPort, fakeClientPort
		srvExtra = []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.251.0/30"}
		clExtra = []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.250.0/30"}
	}
	p = &Path{Name: name}
	defer func() {
		if err != nil {
			p.Close()
			p = nil
		}
	}()
	backend := netip.AddrPortFrom(loopback, uint16(backendPort))
	if p.Sink, err = NewSink(l.Hub, SinkConfig{Local: backend, Mode: mode, AnswerIKE: true}); err != nil {
		return p, err
	}
	srvControl := filepath.Join(l.Dir, "bench-server-"+strconv.Itoa(srvPort)+".sock")
	srv, err := startIketcp(ctx, l.Hub, bin, srvControl, append([]string{"server",
		"--listen", netip.AddrPortFrom(hubOuter, uint16(srvPort)).String(),
		"--backend", backend.String(),
	}, srvExtra...))
	if err != nil {
		return p, err
	}
	listen := netip.AddrPortFrom(loopback, uint16(clientPort))
	clControl := filepath.Join(l.Dir, "bench-client-"+strconv.Itoa(clientPort)+".sock")
	cl, err := startIketcp(ctx, l.Site, bin, clControl, append([]string{"client",
		"--listen", listen.String(),
		"--peer", netip.AddrPortFrom(hubOuter, uint16(srvPort)).String(),
	}, clExtra...))
	if cl != nil {
		p.Relays = append(p.Relays, cl)
	}
	p.Relays = append(p.Relays, srv)
	if err != nil {
		return p, err
	}
	if p.Blaster, err = NewBlaster(l.Site, BlasterConfig{Local: netip.AddrPortFrom(loopback, 0), Dst: listen, Mode: mode}); err != nil {
		return p, err
	}
	if err := p.Blaster.ExchangeIKE(0x1c0ffee0+uint64(clientPort), 10*time.Second); err != nil {
		return p, fmt.Errorf("%s: %w", name, err)
	}
	return p, nil
}

// startIketcp runs iketcp in ns and waits (at most 10 s) until it answers
// on its control socket.
func startIketcp(ctx context.Context, ns *lab.Namespace, bin, control string, args []string) (*lab.Process, error) {
	args = append(args, "--control", control)
	p, err := ns.Start(ctx, "", bin, args...)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for range 200 {
		out, err := ns.Run(ctx, bin, "status", "--json", "--control", control)
		if err == nil && json.Valid(out) {
			return p, nil
		}
		if p.Exited() {
			return p, fmt.Errorf("iketcp %s exited at start: %v\n%s", args[0], p.ExitErr(), p.Log())
		}
		select {
		case <-ctx.Done():
			return p, fmt.Errorf("iketcp %s (pid %d) did not answer on %s: %w\n%s", args[0], p.PID(), control, ctx.Err(), p.Log())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return p, fmt.Errorf("iketcp %s (pid %d) did not answer on %s", args[0], p.PID(), control)
}

// openUDPTunnel: Debian's udptunnel, server at the hub and client at the
// site, the same length framing over one TCP connection.
func openUDPTunnel(ctx context.Context, l *lab.Lab, bin string, mode IOMode) (p *Path, err error) {
	p = &Path{Name: PathUDPTunnel}
	defer func() {
		if err != nil {
			p.Close()
			p = nil
		}
	}()
	mine := netip.AddrPortFrom(loopback2, utUDPPort)
	tunnel := netip.AddrPortFrom(loopback, utUDPPort)
	if p.Sink, err = NewSink(l.Hub, SinkConfig{Local: mine, Mode: mode, EchoTo: tunnel, Reuse: true}); err != nil {
		return p, err
	}
	udpArg := loopback2.String() + "/" + strconv.Itoa(utUDPPort)
	srv, err := l.Hub.Start(ctx, "", bin, "-s", strconv.Itoa(utTCPPort), udpArg)
	if err != nil {
		return p, err
	}
	p.Relays = append(p.Relays, srv)
	// The client connects once and gives up if nobody listens: wait for
	// the server's listening socket (without connecting to it: the server
	// takes one connection only).
	if err := waitListening(ctx, l.Hub, utTCPPort, srv); err != nil {
		return p, err
	}
	cl, err := l.Site.Start(ctx, "", bin, "-c", lab.HubOuter+"/"+strconv.Itoa(utTCPPort), udpArg)
	if err != nil {
		return p, err
	}
	p.Relays = append([]*lab.Process{cl}, p.Relays...)
	if p.Blaster, err = NewBlaster(l.Site, BlasterConfig{Local: mine, Dst: tunnel, Mode: mode, Reuse: true}); err != nil {
		return p, err
	}
	// Ready when a datagram crosses.
	for range 100 {
		if p.Sink.Datagrams() > 0 {
			return p, p.alive()
		}
		if err := p.alive(); err != nil {
			return p, err
		}
		if err := p.Blaster.sendN(1); err != nil {
			return p, err
		}
		time.Sleep(50 * time.Millisecond)
	}
	return p, errors.New("udptunnel: no datagram crossed within 5 s")
}

// waitListening waits (at most 5 s) until a TCP socket listens on port in
// ns.
func waitListening(ctx context.Context, ns *lab.Namespace, port int, proc *lab.Process) error {
	for range 100 {
		out, err := ns.Run(ctx, "ss", "-Hltn", "sport", "=", ":"+strconv.Itoa(port))
		if err == nil && len(out) > 0 {
			return nil
		}
		if proc.Exited() {
			return fmt.Errorf("%s exited at start: %v\n%s", proc.Name(), proc.ExitErr(), proc.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("nothing listens on TCP port %d in %s after 5 s", port, ns.Name)
}

func netipLoopback(port uint16) netip.AddrPort { return netip.AddrPortFrom(loopback, port) }
