package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// nobody is the ordinary user the privilege tests run iketcp as.
const nobody = 65534

// capNetAdmin is CAP_NET_ADMIN's bit in /proc/PID/status.
const capNetAdmin = 1 << 12

// procCaps reads a process's user and capability sets from
// /proc/PID/status.
type procCaps struct {
	uid           int
	eff, prm, inh uint64
	amb           uint64
}

func readProcCaps(t *testing.T, pid int) procCaps {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	var c procCaps
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		hex := func() uint64 {
			n, err := strconv.ParseUint(f[0], 16, 64)
			if err != nil {
				t.Fatalf("/proc/%d/status: %s: %v", pid, line, err)
			}
			return n
		}
		switch k {
		case "Uid":
			c.uid, _ = strconv.Atoi(f[1]) // effective
		case "CapEff":
			c.eff = hex()
		case "CapPrm":
			c.prm = hex()
		case "CapInh":
			c.inh = hex()
		case "CapAmb":
			c.amb = hex()
		}
	}
	return c
}

// hostState is what a mode with CAP_NET_ADMIN may change in a namespace
// and must restore at exit: policy rules, routes, links, nftables, and
// forwarding.
func hostState(t *testing.T, ctx context.Context, ns *lab.Namespace) string {
	t.Helper()
	s, err := lab.RoutingSnapshot(ctx, ns)
	if err != nil {
		t.Fatal(err)
	}
	// charon's own routes for its child SAs (table 220) are not iketcp's.
	var kept []string
	for _, line := range strings.Split(s, "\n") {
		if !strings.Contains(line, "table 220") {
			kept = append(kept, line)
		}
	}
	s = strings.Join(kept, "\n")
	rs, err := ns.Run(ctx, "nft", "list", "ruleset")
	if err != nil {
		t.Fatal(err)
	}
	fwd, err := ns.Run(ctx, "sysctl", "-n", "net.ipv4.ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	return s + "# nft list ruleset\n" + string(rs) + "# ip_forward " + string(fwd)
}

// TestLeastPrivilege runs each mode under setpriv as an ordinary user
// (uid 65534) with only the capabilities it needs (and RFC 9329 mode as
// root with all of them, which it drops), brings a real
// strongSwan tunnel up through it and pings across, and reads from
// /proc/PID/status what each iketcp holds once set up: nothing, or
// CAP_NET_ADMIN alone where the mode still uses it (to mark new sockets,
// or to remove its rules and devices at exit, which each such mode then
// does: the namespace is as it was). Without the capability it needs,
// each mode refuses to start and says which.
func TestLeastPrivilege(t *testing.T) {
	requireFaultTools(t)
	plain := &lab.Privileges{UID: nobody}
	bind := &lab.Privileges{UID: nobody, Caps: []string{"net_bind_service"}}
	admin := &lab.Privileges{UID: nobody, Caps: []string{"net_admin"}}
	tunAdmin := lab.TUNPrivileges(nobody, "net_admin") // the modes that open /dev/net/tun
	cases := []struct {
		name   string
		opts   lab.TunnelOptions
		server uint64 // CapEff and CapPrm once set up
		client uint64
		// without: the same side with no capability at all fails to
		// start, saying this.
		withoutServer, withoutClient string
	}{
		{name: "rfc9329", opts: lab.TunnelOptions{ServerAs: plain, ClientAs: plain}},
		// As root with every capability: everything goes once set up.
		{name: "rfc9329-as-root", opts: lab.TunnelOptions{}},
		{name: "rfc9329-port-443",
			opts: lab.TunnelOptions{ServerAs: bind, ClientAs: plain,
				ServerListen: []string{net.JoinHostPort(lab.HubOuter, "443")}, Peer: net.JoinHostPort(lab.HubOuter, "443")},
			withoutServer: "CAP_NET_BIND_SERVICE"},
		{name: "ike-tcp-port-redirect",
			opts: lab.TunnelOptions{ServerAs: admin, ClientAs: plain,
				ServerListen: []string{}, ServerArgs: []string{"--ike-tcp-port", "443"}, Peer: net.JoinHostPort(lab.HubOuter, "443")},
			server: capNetAdmin, withoutServer: "CAP_NET_ADMIN"},
		{name: "transparent", opts: lab.TunnelOptions{ServerAs: plain, ClientAs: tunAdmin, Transparent: true},
			client: capNetAdmin, withoutClient: "CAP_NET_ADMIN"},
		{name: "fake-tcp", opts: lab.TunnelOptions{ServerAs: tunAdmin, ClientAs: tunAdmin, ServerArgs: hubFakeTCPArgs, ClientArgs: siteFakeTCPArgs},
			server: capNetAdmin, client: capNetAdmin, withoutServer: "CAP_NET_ADMIN", withoutClient: "CAP_NET_ADMIN"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			l := lab.NewForTest(t, lab.Options{})
			if err := l.BlockUDP(ctx); err != nil {
				t.Fatal(err)
			}
			var hubBefore, siteBefore string
			opts := c.opts
			opts.Binary = iketcpBinary
			opts.BeforeServer = func(ctx context.Context) error { hubBefore = hostState(t, ctx, l.Hub); return nil }
			opts.BeforeClient = func(ctx context.Context) error { siteBefore = hostState(t, ctx, l.Site); return nil }
			tun, err := l.StartTunnel(ctx, opts)
			if err != nil {
				t.Fatal(err)
			}
			initiateAndPing(t, ctx, tun, 3)
			for _, side := range []struct {
				name string
				inst *lab.Iketcp
				want uint64
			}{{"server", tun.ServerInst, c.server}, {"client", tun.ClientInst, c.client}} {
				got := readProcCaps(t, side.inst.PID())
				as, uid := "root, every capability", 0
				if side.inst.As != nil {
					as, uid = side.inst.As.String(), side.inst.As.UID
				}
				t.Logf("RELIABILITY | %s, %s | run as %s | set up, tunnel up, 3 pings | CapEff %016x CapPrm %016x | uid %d |",
					c.name, side.name, as, got.eff, got.prm, got.uid)
				if got.uid != uid || got.eff != side.want || got.prm != side.want || got.inh != 0 || got.amb != 0 {
					t.Errorf("%s: uid %d, CapEff %x CapPrm %x CapInh %x CapAmb %x; want uid %d and CapEff = CapPrm = %x, nothing inheritable",
						side.name, got.uid, got.eff, got.prm, got.inh, got.amb, uid, side.want)
				}
			}
			// What the modes set up is removed at exit, with the one
			// capability they kept for it.
			if err := tun.StopClient(); err != nil {
				t.Fatal(err)
			}
			if err := tun.StopServer(); err != nil {
				t.Fatal(err)
			}
			for _, p := range []*lab.Process{tun.Server, tun.Client} {
				if err := p.ExitErr(); err != nil {
					t.Errorf("%s exited with %v:\n%s", p.Name(), err, p.Log())
				}
			}
			if after := hostState(t, ctx, l.Hub); after != hubBefore {
				t.Errorf("the hub's state changed:\nbefore:\n%s\nafter:\n%s", hubBefore, after)
			}
			if after := hostState(t, ctx, l.Site); after != siteBefore {
				t.Errorf("the site's state changed:\nbefore:\n%s\nafter:\n%s", siteBefore, after)
			}

			// One capability fewer, and it does not start.
			for _, w := range []struct {
				side, want string
				as         *lab.Privileges
				ns         *lab.Namespace
				args       []string
			}{
				{"server", c.withoutServer, tun.Opts.ServerAs, l.Hub, append(append([]string{"server", "--backend", "127.0.0.1:4500"}, listenArgs(c.opts.ServerListen)...), c.opts.ServerArgs...)},
				{"client", c.withoutClient, tun.Opts.ClientAs, l.Site, append(clientArgs(c.opts), c.opts.ClientArgs...)},
			} {
				if w.want == "" {
					continue
				}
				none := &lab.Privileges{UID: w.as.UID} // the same user, no capabilities
				inst, err := l.StartIketcpAs(ctx, w.ns, iketcpBinary, "without-caps-"+w.side, none, w.args...)
				if err == nil {
					inst.Stop()
					t.Errorf("the %s started with no capabilities", w.side)
					continue
				}
				if !strings.Contains(err.Error(), w.want) {
					t.Errorf("the %s without capabilities: %v; want it to name %s", w.side, err, w.want)
				} else {
					t.Logf("the %s without %s refuses to start, and says: %s", w.side, w.want, firstLine(err.Error(), w.want))
				}
			}
		})
	}
}

// listenArgs are a server's --listen flags for listen, as StartTunnel
// gives them (nil: the hub's address at ServerPort).
func listenArgs(listen []string) []string {
	if listen == nil {
		listen = []string{net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort))}
	}
	var args []string
	for _, a := range listen {
		args = append(args, "--listen", a)
	}
	return args
}

// clientArgs are the client's arguments as StartTunnel gives them, but
// for ClientArgs.
func clientArgs(o lab.TunnelOptions) []string {
	if o.Transparent {
		return []string{"client", "--tun", "--peer", lab.HubOuter, "--tcp-port", strconv.Itoa(lab.ServerPort)}
	}
	peer := o.Peer
	if peer == "" {
		peer = net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort))
	}
	return []string{"client", "--listen", "127.0.0.1:" + strconv.Itoa(lab.ClientListenPort+1), "--peer", peer}
}
