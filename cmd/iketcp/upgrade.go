package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/nat/realaddr"
	"github.com/iketcp/iketcp/nat/redirect"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/control"
	"github.com/iketcp/iketcp/relay/fakelink"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
	"github.com/iketcp/iketcp/relay/upgrade"
)

// A planned restart or upgrade of the server (SIGUSR2, or `iketcp
// upgrade`): the running server starts a fresh copy of its binary, hands
// it its listening sockets, sessions and live connections (package
// relay/upgrade carries them; relay/server's Handover and Adopt fill and
// empty them), and exits once the new one has taken over.

// upgradeWait bounds each wait on the new process: until it is ready,
// and until it has taken over.
const upgradeWait = 15 * time.Second

// upgradePayload is what the old server sends with the file descriptors:
// first the listening sockets (Listeners[i] is the spec of file i), then
// the host state's (Host[i] names file len(Listeners)+i), then what
// server.Handover indexes.
type upgradePayload struct {
	Listeners []string `json:"listeners"`
	Host      []string `json:"host,omitempty"`
	// RealAddress: the old server ran real-address mode, whose routing the
	// new one adopts; the sessions' backend sockets are its sockets.
	RealAddress bool `json:"real_address,omitempty"`
	// FakeTCP: the old server's fake-TCP stack, paused: its own state
	// (its conns' are in Server.Conns, Encap fakelink.Encap); its device
	// is the host file hostFakeTCPDevice.
	FakeTCP *faketcp.StackState `json:"fake_tcp,omitempty"`
	Server  *server.Handover    `json:"server"`
}

// The host state's files in a hand-over, as upgradePayload.Host names
// them.
const (
	hostRedirectOwner = "redirect-owner"  // the port redirect's owner socket (package nat/redirect)
	hostFakeTCPDevice = "fake-tcp-device" // fake-TCP's TUN device (package nat/fakenet)
)

// hostState is what a server owns on the host beside its sockets (tables,
// rules, routes), which an upgrade hands over: the new process adopts it
// as it runs, and the old one exits without removing it.
type hostState struct {
	redirect *redirect.Redirect // the --ike-tcp-port redirect, or nil
	realaddr *realaddr.Net      // --real-address, or nil
	fake     *fakeTCP           // a fake-tcp:// listener's, or nil
}

// files returns the descriptors that hand the host state over, named as
// upgradePayload.Host names them. The caller closes them.
func (h *hostState) files() (kinds []string, files []*os.File, err error) {
	if h.redirect != nil {
		f, err := h.redirect.OwnerFile()
		if err != nil {
			return nil, nil, err
		}
		kinds, files = append(kinds, hostRedirectOwner), append(files, f)
	}
	if h.fake != nil {
		f, err := h.fake.net.File()
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, nil, err
		}
		kinds, files = append(kinds, hostFakeTCPDevice), append(files, f)
	}
	return kinds, files, nil
}

// release lets go of the host state once the new process took it over:
// this process exits without removing it.
func (h *hostState) release() {
	if h.redirect != nil {
		h.redirect.Release()
	}
	if h.realaddr != nil {
		h.realaddr.Release()
	}
	if h.fake != nil {
		h.fake.kept.Store(true)
		h.fake.net.Release()
	}
}

// upgrader runs a server's upgrades.
type upgrader struct {
	log    *slog.Logger
	binary string // what to start: the executable as it was at start, or --upgrade-binary
	srv    *server.Server
	raw    map[string]net.Listener // the listening sockets, by spec
	host   *hostState              // what the server owns on the host, handed over too
	refuse string                  // why this configuration cannot be upgraded, or ""
	ctl    *control.Server
	stop   context.CancelFunc // ends Serve once the new process took over
	parent context.Context    // ends when the server is told to stop (SIGTERM)
	asked  chan struct{}      // an upgrade request, from the control socket
}

// request answers the control socket's "upgrade": the upgrade runs on
// its own (it closes the control socket), so this only says it started.
func (u *upgrader) request() any {
	if u.refuse != "" {
		return map[string]string{"error": u.refuse}
	}
	select {
	case u.asked <- struct{}{}:
	default:
	}
	return map[string]any{"upgrading": true, "pid": os.Getpid(), "binary": u.binary}
}

// watch runs an upgrade on each SIGUSR2 or request, until ctx ends.
func (u *upgrader) watch(ctx context.Context, wg *sync.WaitGroup) {
	defer wg.Done()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR2)
	defer signal.Stop(sig)
	for {
		select {
		case <-ctx.Done():
			return
		case <-sig:
		case <-u.asked:
		}
		if ctx.Err() != nil {
			return
		}
		if err := u.upgrade(); err != nil {
			u.log.Error("upgrade failed, this server keeps running: "+err.Error(), "binary", u.binary)
		}
	}
}

// upgrade starts the new process and hands over to it. An error before
// the hand-over began leaves this server serving; after, this process
// runs itself again from the state file (a crash restart's recovery).
func (u *upgrader) upgrade() error {
	if u.refuse != "" {
		return errors.New(u.refuse)
	}
	u.log.Info("upgrading: starting the new server", "binary", u.binary)
	succ, err := upgrade.Start(u.binary, os.Args[1:], os.Stdout, os.Stderr)
	if err != nil {
		return err
	}
	if err := succ.WaitReady(upgradeWait); err != nil {
		succ.Kill()
		return err
	}
	var specs []string
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for spec, ln := range u.raw {
		fl, ok := ln.(interface{ File() (*os.File, error) })
		if !ok {
			succ.Kill()
			return fmt.Errorf("listener %s cannot be handed over", spec)
		}
		f, err := fl.File()
		if err != nil {
			succ.Kill()
			return fmt.Errorf("listener %s: %w", spec, err)
		}
		specs, files = append(specs, spec), append(files, f)
	}
	kinds, hfiles, err := u.host.files()
	if err != nil {
		succ.Kill()
		return err
	}
	files = append(files, hfiles...)
	started := time.Now()
	var fakeState *faketcp.StackState
	if u.host.fake != nil {
		// From here what the fake-TCP clients send waits in the device,
		// for the new server's stack; the links' state is final.
		st, err := u.host.fake.stack.Pause()
		if err != nil {
			succ.Kill()
			return err
		}
		fakeState = &st
	}
	u.ctl.Close() // the new server opens its own at the same path
	err = u.srv.Handover(func(h *server.Handover, sfiles []*os.File) error {
		payload, err := json.Marshal(upgradePayload{Listeners: specs, Host: kinds, RealAddress: u.host.realaddr != nil,
			FakeTCP: fakeState, Server: h})
		if err != nil {
			return err
		}
		if err := succ.Send(payload, append(append([]*os.File(nil), files...), sfiles...)); err != nil {
			return err
		}
		if err := succ.WaitTakenOver(upgradeWait); err != nil {
			return err
		}
		// Before Serve closes what is left here: the sessions' sockets
		// close without their elements being removed, and the tables stay.
		u.host.release()
		return nil
	})
	if errors.Is(err, server.ErrNotServing) { // stopping meanwhile: nothing was handed over
		succ.Kill()
		if u.host.fake != nil {
			u.host.fake.stack.Unpause()
		}
		return err
	}
	if err != nil && u.parent.Err() != nil { // told to stop meanwhile: stop, do not run again
		succ.Kill()
		return err
	}
	if err != nil {
		succ.Kill()
		u.log.Error("upgrade failed after the hand-over began: running this binary again; clients reconnect and claim their sessions from the state file, if --state is set",
			"err", err)
		self, xerr := os.Executable()
		if xerr == nil {
			xerr = syscall.Exec(self, os.Args, os.Environ())
		}
		return fmt.Errorf("%w; and running again failed: %v", err, xerr)
	}
	succ.Release()
	u.log.Info("upgrade done: the new server took over", "new_pid", succ.PID(), "took", time.Since(started).Round(time.Microsecond).String())
	u.stop()
	return nil
}

// upgradeRefusal says why a server of this configuration cannot hand
// over, or "". Every configuration can now: the port redirect, real-address
// mode and fake-TCP hand their host state over (hostState), and fake-TCP's
// connections go as their TCP state (package nat/faketcp's Pause, Detach
// and ResumeStack).
func upgradeRefusal([]listenSpec) string { return "" }

// inherited is a predecessor's hand-over.
type inherited struct {
	pred   *upgrade.Predecessor
	lns    map[string]net.Listener // the listening sockets, by spec
	host   map[string]*os.File     // the host state's files, by upgradePayload.Host's names
	realAd bool                    // the predecessor ran real-address mode
	fake   *faketcp.StackState     // the predecessor's fake-TCP stack, or nil
	server *server.Handover
	files  []*os.File // what server indexes
	// fakeConns are the fake-TCP conns resumed for server.Conns, by index
	// there (fakeListener fills it).
	fakeConns map[int]*faketcp.Conn
}

// fakeState is the predecessor's fake-TCP stack with its conns, from the
// hand-over's connections of Encap fakelink.Encap; index[i] is the
// connection of Conns[i] in in.server.Conns.
func (in *inherited) fakeState() (st faketcp.StackState, index []int, err error) {
	st = *in.fake
	st.Conns = nil
	for i, hc := range in.server.Conns {
		if hc.Encap != fakelink.Encap {
			continue
		}
		var cs faketcp.ConnState
		if err := json.Unmarshal(hc.State, &cs); err != nil {
			return st, nil, fmt.Errorf("the fake-TCP connection from %s: %w", hc.Remote, err)
		}
		st.Conns, index = append(st.Conns, cs), append(index, i)
	}
	return st, index, nil
}

// closeHost closes the host state's files that no one took.
func (in *inherited) closeHost() {
	for k, f := range in.host {
		f.Close()
		delete(in.host, k)
	}
}

// inherit takes a predecessor's hand-over, if this process was started
// for one: it says it is ready, and returns the listening sockets and
// the rest. nil: a plain start.
func inherit(log *slog.Logger) (*inherited, error) {
	pred, err := upgrade.Inherited()
	if pred == nil || err != nil {
		return nil, err
	}
	fail := func(err error) (*inherited, error) {
		pred.Failed(err)
		return nil, fmt.Errorf("taking over from the old server: %w", err)
	}
	if err := pred.Ready(); err != nil {
		return fail(err)
	}
	raw, all, err := pred.Receive(upgradeWait)
	if err != nil {
		return fail(err)
	}
	closeAll := func() {
		for _, f := range all {
			f.Close()
		}
	}
	var p upgradePayload
	if err := json.Unmarshal(raw, &p); err != nil || p.Server == nil {
		closeAll()
		return fail(fmt.Errorf("the hand-over: %v", err))
	}
	want := len(p.Listeners) + len(p.Host) + len(p.Server.Table.Sessions) + p.Server.Files()
	if len(all) != want {
		closeAll()
		return fail(fmt.Errorf("the hand-over has %d files, want %d", len(all), want))
	}
	for _, hc := range p.Server.Conns {
		if hc.Encap != "" && (hc.Encap != fakelink.Encap || p.FakeTCP == nil) {
			closeAll()
			return fail(fmt.Errorf("the connection from %s is a %q link, and the hand-over has no such stack", hc.Remote, hc.Encap))
		}
	}
	in := &inherited{pred: pred, lns: make(map[string]net.Listener), host: make(map[string]*os.File),
		realAd: p.RealAddress, fake: p.FakeTCP, server: p.Server}
	for i, spec := range p.Listeners {
		ln, err := net.FileListener(all[i])
		all[i].Close()
		if err != nil {
			for _, f := range all[i+1:] {
				f.Close()
			}
			return fail(fmt.Errorf("listener %s: %w", spec, err))
		}
		in.lns[spec] = ln
	}
	for i, kind := range p.Host {
		in.host[kind] = all[len(p.Listeners)+i]
	}
	in.files = all[len(p.Listeners)+len(p.Host):]
	log.Info("taking over from the old server", "listeners", len(in.lns), "host_state", len(p.Host), "real_address", p.RealAddress,
		"fake_tcp", p.FakeTCP != nil, "sessions", len(p.Server.Table.Sessions), "conns", len(p.Server.Conns))
	return in, nil
}

// adopt gives srv the sessions and connections of a hand-over, the
// stream connections served by lns' RFC 9329 listener, the fake-TCP ones
// by the conns a resumed stack made of them (fakeConns, by index in
// h.Conns). With requireTLS (--tls-required, or --tls-client-ca, which
// implies it), a stream connection in clear is closed, as the front door
// would refuse it: its client reconnects and is refused there; one the
// predecessor relays from a TLS connection it kept is TLS.
func adopt(log *slog.Logger, srv *server.Server, lns []relay.Listener, h *server.Handover, files []*os.File, fakeConns map[int]*faketcp.Conn, requireTLS bool) error {
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	var sl *streamlink.Listener
	for _, ln := range lns {
		if l, ok := ln.(*streamlink.Listener); ok {
			sl = l
			break
		}
	}
	if sl == nil && h.Files() > 0 {
		return errors.New("connections handed over, and no RFC 9329 listener to serve them")
	}
	var backends []*net.UDPConn
	for i := range h.Table.Sessions {
		pc, err := net.FilePacketConn(files[i])
		if err != nil {
			return fmt.Errorf("session %d's backend socket: %w", h.Table.Sessions[i].ID, err)
		}
		uc, ok := pc.(*net.UDPConn)
		if !ok {
			pc.Close()
			return fmt.Errorf("session %d's backend socket is not UDP", h.Table.Sessions[i].ID)
		}
		backends = append(backends, uc)
	}
	var links []relay.Link
	kept := *h
	kept.Conns = nil
	var refused int
	next := len(h.Table.Sessions) // the next connection's socket
	for i, hc := range h.Conns {
		if hc.Encap == fakelink.Encap {
			conn := fakeConns[i]
			if conn == nil {
				return fmt.Errorf("fake-TCP connection from %s: no fake-TCP listener resumed it", hc.Remote)
			}
			links, kept.Conns = append(links, fakelink.Adopt(conn)), append(kept.Conns, hc)
			continue
		}
		nc, err := net.FileConn(files[next])
		next++
		if err != nil {
			return fmt.Errorf("connection from %s: %w", hc.Remote, err)
		}
		if requireTLS && !hc.TLS {
			nc.Close()
			refused++
			continue
		}
		link, err := sl.AdoptStream(nc, streamlink.Adopted{Pending: hc.Pending, PrefixPending: hc.PrefixPending,
			Remote: hc.Remote, Local: hc.Local, TLS: hc.TLS, Identity: hc.Identity})
		if err != nil {
			nc.Close()
			return fmt.Errorf("connection from %s: %w", hc.Remote, err)
		}
		links, kept.Conns = append(links, link), append(kept.Conns, hc)
	}
	if refused > 0 { // one line, however many
		log.Warn(fmt.Sprintf("%d connections in clear handed over and closed: TLS is required", refused))
	}
	return srv.Adopt(&kept, backends, links)
}

func upgradeCommand() *cli.Command {
	return &cli.Command{
		Name:  "upgrade",
		Usage: "replace a running iketcp server with a fresh copy of its binary, handing over its sessions and live connections (as SIGUSR2 does)",
		UsageText: "iketcp upgrade [--control PATH] [--timeout DURATION]\n\nExample:\n\n" +
			"   $ iketcp upgrade --control /run/iketcp/server.sock\n   upgraded: pid 29370 -> pid 29527 (/usr/local/bin/iketcp), 1 sessions",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "control", Value: control.DefaultPath("server"), Usage: "control socket of the server", EnvVars: envVar("control")},
			&cli.DurationFlag{Name: "timeout", Value: 30 * time.Second, Usage: "how long to wait for the new server to answer"},
		},
		Action: runUpgrade,
	}
}

// runUpgrade asks the server to upgrade, and waits until a server with
// another PID answers on the control socket.
func runUpgrade(c *cli.Context) error {
	path := c.String("control")
	raw, err := control.Ask(c.Context, path, "upgrade")
	if err != nil {
		return err
	}
	var reply struct {
		Error  string `json:"error"`
		PID    int    `json:"pid"`
		Binary string `json:"binary"`
	}
	if err := json.Unmarshal(raw, &reply); err != nil {
		return fmt.Errorf("the server's reply %q: %w", raw, err)
	}
	if reply.Error != "" {
		return errors.New(reply.Error)
	}
	deadline := time.Now().Add(c.Duration("timeout"))
	for time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		raw, err := control.Fetch(c.Context, path)
		if err != nil {
			continue // between the old server and the new
		}
		var st relay.Status
		if err := decodeStatus(raw, &st); err == nil && st.PID != reply.PID {
			fmt.Fprintf(c.App.Writer, "upgraded: pid %d -> pid %d (%s), %d sessions\n", reply.PID, st.PID, reply.Binary, len(st.Sessions))
			return nil
		}
	}
	return fmt.Errorf("pid %d still answers after %v: the upgrade did not happen (see the server's log)", reply.PID, c.Duration("timeout"))
}
