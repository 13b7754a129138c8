package lab

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/iketcp/iketcp/relay"
)

// The tunnel scenario's fixed choices.
const (
	// TunnelPSK is the pre-shared key of the lab's IKE SA.
	TunnelPSK = "iketcp-lab-not-a-secret"
	// ClientListenPort is where `iketcp client` waits for the site daemon.
	ClientListenPort = 14500
	// ServerPort is the TCP port `iketcp server` listens on at the hub.
	ServerPort = 4500
	// TunnelName names the swanctl connection and child on both ends.
	TunnelName = "lab"
)

// TunnelOptions configures StartTunnel.
type TunnelOptions struct {
	// Binary is the iketcp executable to run.
	Binary string
	// Transparent runs `iketcp client --tun`: the site's charon keeps its
	// normal configuration (the hub's real address, ports 500 and 4500)
	// and iketcp intercepts its traffic. Otherwise the site's charon talks
	// to `iketcp client` on 127.0.0.1 (explicit mode).
	Transparent bool
	// BeforeServer, if set, runs after the hub's charon has started and
	// before `iketcp server` does: the moment to take a snapshot of what
	// the server may change at the hub.
	BeforeServer func(context.Context) error
	// BeforeClient, if set, runs after both charons and the server have
	// started and before `iketcp client` does: the moment to take a
	// snapshot of the site's routing.
	BeforeClient func(context.Context) error
	// Mobike sets the IKE SA's MOBIKE; nil keeps strongSwan's default (on).
	Mobike *bool
	// ServerArgs and ClientArgs are appended to the iketcp command lines.
	ServerArgs, ClientArgs []string
	// ServerListen are the server's --listen addresses. Nil means
	// HubOuter:ServerPort; an empty, non-nil slice gives no --listen at
	// all, for the server's own choice (its default, or what ServerArgs
	// such as --ike-tcp-port ask for).
	ServerListen []string
	// Backend is the server's --backend; empty means 127.0.0.1:4500, the
	// hub's charon on loopback.
	Backend string
	// Peer is the explicit-mode client's --peer; empty means
	// HubOuter:ServerPort.
	Peer string
	// Members, if set, replace --peer with these --member values (an
	// aggregate; ClientArgs add --location-id and the rest).
	Members []string
	// ExternalServer: StartTunnel starts no iketcp server; the caller
	// runs one at the hub (a container image, say) where the client's
	// Peer reaches it, and Server stays nil.
	ExternalServer bool
	// Connections, if 2 or more, gives each charon that many connections
	// instead of one, each its own IKE SA when initiated (see TunnelConn);
	// at most MaxTunnelConns.
	Connections int
	// RekeyTime and ChildRekeyTime are the site's IKE and child SA
	// rekey_time, and RekeyOver how long each may live past it
	// (IKEConfig); 0 keeps strongSwan's defaults (4 h and 1 h, 10%).
	RekeyTime, ChildRekeyTime, RekeyOver time.Duration
	// ServerAs and ClientAs, if set, run that side's iketcp as an
	// ordinary user with only the capabilities named (Privileges).
	ServerAs, ClientAs *Privileges
	// Direct leaves iketcp out: the site's charon talks to the hub's
	// own address and ports over UDP through the carrier, which must let
	// UDP through. The baseline of what iketcp is compared with.
	Direct bool
}

// MaxTunnelConns bounds TunnelOptions.Connections.
const MaxTunnelConns = 8

// TunnelConn is one connection of a tunnel: a swanctl connection of the
// same name in both charons, whose child SA joins SiteInner and HubInner.
//
// A tunnel of one connection has the connection TunnelName between
// SiteInnerNet and HubInnerNet. A tunnel of n connections has "lab1" to
// "labn": connection i joins 198.51.100.i/32 and 192.0.2.i/32 (the lab
// adds the addresses beyond .1 to lo), with identities site-i.iketcp.test
// and hub-i.iketcp.test and a PSK of its own, so that charon keeps each
// in an IKE SA of its own and each can be pinged on its own.
type TunnelConn struct {
	Name                string
	SiteInner, HubInner string
}

// tunnelConns returns the tunnel's connections and each one's charon
// configurations, without the addresses and ports StartTunnel adds.
func tunnelConns(n int, mobike *bool) (conns []TunnelConn, site, hub []IKEConfig) {
	if n <= 1 {
		conns = []TunnelConn{{Name: TunnelName, SiteInner: SiteInner, HubInner: HubInner}}
		site = []IKEConfig{{
			Name:    TunnelName,
			LocalID: "site.iketcp.test", RemoteID: "hub.iketcp.test", PSK: TunnelPSK,
			LocalTS: SiteInnerNet, RemoteTS: HubInnerNet, Mobike: mobike,
		}}
		hub = []IKEConfig{{
			Name: TunnelName, RemoteAddrs: "%any",
			LocalID: "hub.iketcp.test", RemoteID: "site.iketcp.test", PSK: TunnelPSK,
			LocalTS: HubInnerNet, RemoteTS: SiteInnerNet, Mobike: mobike,
		}}
		return conns, site, hub
	}
	for i := 1; i <= n; i++ {
		c := TunnelConn{
			Name:      TunnelName + strconv.Itoa(i),
			SiteInner: "198.51.100." + strconv.Itoa(i),
			HubInner:  "192.0.2." + strconv.Itoa(i),
		}
		siteID, hubID := fmt.Sprintf("site-%d.iketcp.test", i), fmt.Sprintf("hub-%d.iketcp.test", i)
		psk := fmt.Sprintf("%s-%d", TunnelPSK, i)
		conns = append(conns, c)
		site = append(site, IKEConfig{
			Name: c.Name, LocalID: siteID, RemoteID: hubID, PSK: psk,
			LocalTS: c.SiteInner + "/32", RemoteTS: c.HubInner + "/32", Mobike: mobike,
		})
		hub = append(hub, IKEConfig{
			Name: c.Name, RemoteAddrs: "%any", LocalID: hubID, RemoteID: siteID, PSK: psk,
			LocalTS: c.HubInner + "/32", RemoteTS: c.SiteInner + "/32", Mobike: mobike,
		})
	}
	return conns, site, hub
}

// Tunnel is an IKEv2 tunnel between the site's and the hub's charon,
// carried over TCP by `iketcp client` (site) and `iketcp server` (hub).
// In explicit mode:
//
//	site charon 127.0.0.1:4500 -UDP-> iketcp client 127.0.0.1:14500
//	  =TCP 203.0.113.2:4500 through the carrier=> iketcp server -UDP-> hub charon 127.0.0.1:4500
//
// the site's charon is configured with remote_addrs = 127.0.0.1,
// remote_port = 14500 and local_port = 4500. In transparent mode:
//
//	site charon 100.64.0.2:500/4500 -UDP to 203.0.113.2:500/4500-> TUN -> iketcp client --tun
//	  =TCP 203.0.113.2:4500 through the carrier=> iketcp server -UDP-> hub charon 127.0.0.1:4500
//
// the site's charon has remote_addrs = 203.0.113.2 and default ports.
// Neither charon knows about TCP; the hub's accepts any peer.
type Tunnel struct {
	Lab            *Lab
	Opts           TunnelOptions
	Hub, Site      *Charon
	Server, Client *Process
	// ServerInst and ClientInst are the same, as iketcp instances.
	ServerInst, ClientInst *Iketcp
	// Conns are the tunnel's connections: one, or Opts.Connections.
	Conns []TunnelConn
	// ServerControl and ClientControl are the instances' control sockets.
	ServerControl, ClientControl string
}

// StartTunnel starts the hub's charon, `iketcp server`, `iketcp client`
// and the site's charon, each ready when it returns. It does not initiate.
func (l *Lab) StartTunnel(ctx context.Context, opts TunnelOptions) (*Tunnel, error) {
	if opts.Binary == "" && !opts.Direct {
		return nil, fmt.Errorf("StartTunnel: no iketcp binary given")
	}
	if opts.Connections < 0 || opts.Connections > MaxTunnelConns {
		return nil, fmt.Errorf("StartTunnel: %d connections, want 0 to %d", opts.Connections, MaxTunnelConns)
	}
	t := &Tunnel{
		Lab:           l,
		Opts:          opts,
		ServerControl: filepath.Join(l.Dir, "hub-iketcp.sock"),
		ClientControl: filepath.Join(l.Dir, "site-iketcp.sock"),
	}
	var site, hub []IKEConfig
	t.Conns, site, hub = tunnelConns(opts.Connections, opts.Mobike)
	for i := range site {
		site[i].RekeyTime, site[i].ChildRekeyTime, site[i].RekeyOver = opts.RekeyTime, opts.ChildRekeyTime, opts.RekeyOver
	}
	for _, c := range t.Conns {
		if err := l.addInnerAddrs(ctx, c); err != nil {
			return nil, err
		}
	}
	var err error
	if t.Hub, err = l.StartCharon(ctx, l.Hub, hub[0], hub[1:]...); err != nil {
		return nil, err
	}
	if opts.BeforeServer != nil {
		if err := opts.BeforeServer(ctx); err != nil {
			return nil, err
		}
	}
	if !opts.ExternalServer && !opts.Direct {
		if err := t.StartServer(ctx); err != nil {
			return nil, err
		}
	}
	for i := range site {
		if opts.Transparent || opts.Direct {
			site[i].RemoteAddrs = HubOuter // and default ports: nothing changed
		} else {
			site[i].LocalAddrs, site[i].LocalPort = "127.0.0.1", 4500
			site[i].RemoteAddrs, site[i].RemotePort = "127.0.0.1", ClientListenPort
		}
	}
	if t.Site, err = l.StartCharon(ctx, l.Site, site[0], site[1:]...); err != nil {
		return nil, err
	}
	if opts.BeforeClient != nil {
		if err := opts.BeforeClient(ctx); err != nil {
			return nil, err
		}
	}
	if opts.Direct {
		return t, nil
	}
	if err := t.StartClient(ctx); err != nil {
		return nil, err
	}
	return t, nil
}

// addInnerAddrs puts c's inner addresses on lo in the site and the hub,
// unless New put them there already.
func (l *Lab) addInnerAddrs(ctx context.Context, c TunnelConn) error {
	for _, a := range []struct {
		ns       *Namespace
		addr, as string
	}{{l.Site, c.SiteInner, SiteInner}, {l.Hub, c.HubInner, HubInner}} {
		if a.addr == a.as {
			continue
		}
		if _, err := l.run(ctx, l.ipPath, "-n", a.ns.Name, "addr", "add", a.addr+"/32", "dev", "lo"); err != nil {
			return fmt.Errorf("inner address of %s: %w", c.Name, err)
		}
	}
	return nil
}

// StartServer starts `iketcp server` at the hub (again, after StopServer
// or KillServer).
func (t *Tunnel) StartServer(ctx context.Context) (err error) {
	listen := t.Opts.ServerListen
	if listen == nil {
		listen = []string{net.JoinHostPort(HubOuter, strconv.Itoa(ServerPort))}
	}
	backend := t.Opts.Backend
	if backend == "" {
		backend = "127.0.0.1:4500"
	}
	args := []string{"server"}
	for _, a := range listen {
		args = append(args, "--listen", a)
	}
	args = append(args, "--backend", backend)
	t.ServerInst, err = t.startIketcp(ctx, t.Lab.Hub, t.ServerControl, t.Opts.ServerAs, append(args, t.Opts.ServerArgs...))
	if err != nil {
		return err
	}
	t.Server, t.ServerControl = t.ServerInst.Process, t.ServerInst.Control
	return nil
}

// StopServer stops `iketcp server` (SIGTERM, by PID): a plain exit, after
// which it has removed whatever it installed.
func (t *Tunnel) StopServer() error { return t.Server.Stop() }

// KillServer kills `iketcp server` with SIGKILL, as a crash would: it
// leaves behind whatever it installed.
func (t *Tunnel) KillServer() error { return t.Server.Kill() }

// StartClient starts `iketcp client` at the site (again, after StopClient).
func (t *Tunnel) StartClient(ctx context.Context) (err error) {
	peer := t.Opts.Peer
	if peer == "" {
		peer = net.JoinHostPort(HubOuter, strconv.Itoa(ServerPort))
	}
	args := []string{"client",
		"--listen", "127.0.0.1:" + strconv.Itoa(ClientListenPort),
		"--peer", peer,
	}
	if len(t.Opts.Members) > 0 {
		args = args[:3]
		for _, m := range t.Opts.Members {
			args = append(args, "--member", m)
		}
	}
	if t.Opts.Transparent {
		args = []string{"client", "--tun", "--peer", HubOuter, "--tcp-port", strconv.Itoa(ServerPort)}
	}
	t.ClientInst, err = t.startIketcp(ctx, t.Lab.Site, t.ClientControl, t.Opts.ClientAs, append(args, t.Opts.ClientArgs...))
	if err != nil {
		return err
	}
	t.Client, t.ClientControl = t.ClientInst.Process, t.ClientInst.Control
	return nil
}

// KillClient kills `iketcp client` with SIGKILL, as a crash would: it
// leaves behind whatever it installed.
func (t *Tunnel) KillClient() error { return t.Client.Kill() }

// RoutingSnapshot returns what transparent mode may change in ns and must
// restore: policy rules, routes in every table, and links, IPv4 and IPv6.
func RoutingSnapshot(ctx context.Context, ns *Namespace) (string, error) {
	var b strings.Builder
	for _, args := range [][]string{
		{"-4", "rule"}, {"-6", "rule"},
		{"-4", "route", "show", "table", "all"}, {"-6", "route", "show", "table", "all"},
		{"-o", "link"},
	} {
		out, err := ns.Run(ctx, "ip", args...)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&b, "# ip %s\n%s", strings.Join(args, " "), out)
	}
	return b.String(), nil
}

// startIketcp runs iketcp with args in ns, logging at debug level to a
// file named after the namespace, and waits until it answers on control.
func (t *Tunnel) startIketcp(ctx context.Context, ns *Namespace, control string, as *Privileges, args []string) (*Iketcp, error) {
	logPath := filepath.Join(t.Lab.Dir, ns.Role+"-iketcp.log")
	if as == nil {
		return t.Lab.startIketcp(ctx, ns, t.Opts.Binary, control, logPath, args)
	}
	dir, bin, err := t.Lab.home(as, ns.Role+"-iketcp", t.Opts.Binary)
	if err != nil {
		return nil, err
	}
	return t.Lab.startIketcpAs(ctx, ns, bin, filepath.Join(dir, "control.sock"), logPath, args, as)
}

// StopClient stops `iketcp client` (SIGTERM, by PID).
func (t *Tunnel) StopClient() error { return t.Client.Stop() }

// ServerStatus runs `iketcp status --json` against the server.
func (t *Tunnel) ServerStatus(ctx context.Context) (*relay.Status, error) {
	return t.ServerInst.Status(ctx)
}

// ClientStatus runs `iketcp status --json` against the client.
func (t *Tunnel) ClientStatus(ctx context.Context) (*relay.Status, error) {
	return t.ClientInst.Status(ctx)
}

// StatusText runs `iketcp status` (the human form) in ns against control.
func (t *Tunnel) StatusText(ctx context.Context, ns *Namespace, control string) (string, error) {
	out, err := ns.Run(ctx, t.Opts.Binary, "status", "--control", control)
	return string(out), err
}

// Initiate brings the tunnel up from the site and returns the site's view
// of the established IKE SA.
func (t *Tunnel) Initiate(ctx context.Context) (IKESA, error) {
	if err := t.Site.Initiate(ctx); err != nil {
		return IKESA{}, err
	}
	return t.Site.WaitEstablished(ctx)
}

// PingThrough pings the hub's inner address from the site's, across the
// tunnel, and returns how many replies came back.
func (t *Tunnel) PingThrough(ctx context.Context, count int, interval time.Duration) (int, error) {
	return t.Lab.Ping(ctx, t.Lab.Site, SiteInner, HubInner, count, interval)
}

// InitiateConn brings the connection c up from the site and returns the
// site's view of its established IKE SA.
func (t *Tunnel) InitiateConn(ctx context.Context, c TunnelConn) (IKESA, error) {
	if err := t.Site.InitiateConn(ctx, c.Name); err != nil {
		return IKESA{}, err
	}
	return t.Site.WaitEstablishedConn(ctx, c.Name)
}

// PingConn pings across the child SA of c, from its site address to its
// hub address, and returns how many replies came back.
func (t *Tunnel) PingConn(ctx context.Context, c TunnelConn, count int, interval time.Duration) (int, error) {
	return t.Lab.Ping(ctx, t.Lab.Site, c.SiteInner, c.HubInner, count, interval)
}
