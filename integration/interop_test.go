package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/integration/uml"
)

// The interoperability tests meet a third-party RFC 9329 peer: libreswan's
// pluto with the Linux kernel's own ESP and espintcp, in a User-Mode Linux
// guest (package integration/uml) joined to the lab's carrier by a TAP
// device:
//
//	guest (UML)                  carrier netns
//	lo  198.51.100.1 or 192.0.2.1
//	vec0 100.64.1.2/24 ---- c-uml 100.64.1.1/24 | c-hub ... hub, c-site ... site
const (
	guestTap      = "c-uml"
	guestHostAddr = "100.64.1.1"
	guestAddr     = "100.64.1.2"
	guestNet      = "100.64.1.0/24"
	guestMAC      = "02:00:64:40:01:02"
	// interopServerPort is the iketcp server's TCP port that libreswan's
	// tcp-remoteport names (not 4500, so that the option is exercised).
	interopServerPort = 10500
)

// umlPrereqs holds what every interop test needs, made once per process:
// the kernel (built unless cached), libreswan unpacked, guestinit built.
var umlPrereqs struct {
	once      sync.Once
	kernel    *uml.Kernel
	libreswan *uml.Libreswan
	init      string
	err       error

	mu    sync.Mutex
	other map[string]*uml.Kernel // kernels of other series than the default, by series
}

// requireUML returns the guest's prerequisites, building the kernel if the
// cache has none (minutes). Outside CI a missing host tool skips; under
// CI=true it fails with what is missing.
func requireUML(t *testing.T) (*uml.Kernel, *uml.Libreswan, string) {
	t.Helper()
	lab.Require(t)
	if missing := uml.MissingHostTools(); len(missing) > 0 {
		msg := "the UML interop lab needs " + strings.Join(missing, ", ") + " (run make interop-deps)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	p := &umlPrereqs
	p.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
		defer cancel()
		start := time.Now()
		p.kernel, p.err = uml.EnsureKernel(ctx, uml.KernelOptions{Logf: t.Logf})
		if p.err != nil {
			return
		}
		if p.kernel.Built {
			t.Logf("uml: built kernel %s (%s) in %s", p.kernel.Path, p.kernel.Version, p.kernel.BuildTime.Round(time.Second))
		} else {
			t.Logf("uml: cached kernel %s (linux-source %s)", p.kernel.Path, p.kernel.Version)
		}
		if p.libreswan, p.err = uml.EnsureLibreswan(ctx, ""); p.err != nil {
			return
		}
		// Beside the iketcp binary, in the directory TestMain removes.
		p.init, p.err = uml.BuildInit(ctx, filepath.Dir(iketcpBinary))
		t.Logf("uml: prerequisites ready in %s (libreswan %s)", time.Since(start).Round(time.Millisecond), p.libreswan.Version)
	})
	if p.err != nil {
		t.Fatalf("UML prerequisites: %v", p.err)
	}
	return p.kernel, p.libreswan, p.init
}

// requireSeries returns the kernel of series, building it if the cache
// has none, beside what requireUML returns.
func requireSeries(t *testing.T, series string) (*uml.Kernel, *uml.Libreswan, string) {
	t.Helper()
	kernel, sw, init := requireUML(t)
	if series == "" || series == kernel.Series {
		return kernel, sw, init
	}
	p := &umlPrereqs
	p.mu.Lock()
	defer p.mu.Unlock()
	if k := p.other[series]; k != nil {
		return k, sw, init
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	k, err := uml.EnsureKernel(ctx, uml.KernelOptions{Series: series, Logf: t.Logf})
	if err != nil {
		t.Fatalf("UML kernel of linux-source-%s: %v", series, err)
	}
	if k.Built {
		t.Logf("uml: built kernel %s (%s) in %s", k.Path, k.Version, k.BuildTime.Round(time.Second))
	}
	if p.other == nil {
		p.other = map[string]*uml.Kernel{}
	}
	p.other[series] = k
	return k, sw, init
}

// bootGuest boots a guest whose TAP sits in the lab's carrier, with the
// given addresses on its lo and routes, and registers its shutdown (which
// the test checks to be clean) and a dump of its view on failure.
func bootGuest(t *testing.T, ctx context.Context, l *lab.Lab, loopback []string, routes [][]string) *uml.Guest {
	t.Helper()
	return bootGuestOn(t, ctx, l, "", loopback, routes)
}

// bootGuestOn is bootGuest with the kernel of series ("" for the
// default).
func bootGuestOn(t *testing.T, ctx context.Context, l *lab.Lab, series string, loopback []string, routes [][]string) *uml.Guest {
	t.Helper()
	kernel, sw, init := requireSeries(t, series)
	g, err := uml.Boot(ctx, uml.GuestOptions{
		Kernel: kernel, Init: init, Namespace: l.Carrier,
		Dir: filepath.Join(l.Dir, "guest"),
		Tap: guestTap, HostAddr: guestHostAddr + "/24", GuestAddr: guestAddr + "/24", MAC: guestMAC,
		Loopback: loopback, Routes: routes, Libreswan: sw, Logf: t.Logf,
	})
	if err != nil {
		t.Fatalf("boot the guest: %v", err)
	}
	t.Logf("guest: linux-source %s booted in %s", kernel.Version, g.BootTime.Round(time.Millisecond))
	t.Cleanup(func() {
		d, err := g.Shutdown()
		if err != nil {
			t.Errorf("guest shutdown: %v", err)
			return
		}
		t.Logf("guest: powered off in %s", d.Round(time.Millisecond))
	})
	return g
}

// guestView logs the guest's own view and returns it.
func guestView(t *testing.T, ctx context.Context, g *uml.Guest, p *uml.Pluto, when string) string {
	t.Helper()
	v := g.View(ctx, p)
	t.Logf("guest's view %s:\n%s", when, v)
	return v
}

// TestInteropGuest boots the UML guest, checks that its kernel has
// what the other tests rely on (ESP, espintcp, XFRM over netlink), runs
// pluto with listen-tcp and sees it listen on TCP 4500, and powers the
// guest off cleanly.
func TestInteropGuest(t *testing.T) {
	l := lab.NewForTest(t, lab.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g := bootGuest(t, ctx, l, []string{"192.0.2.1/32"}, nil)
	out, err := g.Run(ctx, "uname -r; cat /proc/net/xfrm_stat | head -3; grep -c . /proc/crypto")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest: %s", out)
	if !strings.Contains(out, "XfrmInError") {
		t.Errorf("guest kernel has no XFRM statistics:\n%s", out)
	}
	p, err := uml.StartPluto(ctx, g, uml.PlutoOptions{ListenTCP: true, Conns: []uml.PlutoConn{{
		Name: "lab", Left: guestAddr, LeftID: "@hub.iketcp.test", LeftSubnet: lab.HubInnerNet,
		Right: "%any", RightID: "@site.iketcp.test", RightSubnet: lab.SiteInnerNet,
		PSK: lab.TunnelPSK, EnableTCP: "yes",
	}}})
	if err != nil {
		t.Fatal(err)
	}
	ss, err := g.Run(ctx, "ss -tln")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`LISTEN .*:4500\b`).MatchString(ss) {
		t.Errorf("pluto does not listen on TCP 4500 in the guest:\n%s\npluto log:\n%s", ss, p.Log())
	}
	// A framed IKE_SA_INIT from the carrier: pluto answers in a frame.
	peer, err := l.Carrier.DialRFC9329(ctx, guestAddr+":4500")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	if err := peer.Send(lab.IKESAInitDatagram(0x1122334455667788)); err != nil {
		t.Fatal(err)
	}
	var n int
	var first []byte
	for range 50 {
		if n, first, err = peer.Received(); n > 0 || err != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	frames, err := lab.SplitRFC9329(append([]byte(lab.RFC9329Prefix), first...))
	if n == 0 || err != nil || len(frames) == 0 {
		t.Errorf("no framed answer from pluto to an IKE_SA_INIT over TCP (%d bytes, %v)\npluto log:\n%s", n, err, p.Log())
	} else {
		h, ok := frames[0].IKE()
		if !ok || !h.Response || h.Exchange != lab.ExchangeIKESAInit || h.InitiatorSPI != 0x1122334455667788 {
			t.Errorf("pluto's first frame is not an IKE_SA_INIT response to our SPI: %x", []byte(frames[0]))
		}
		t.Logf("pluto answered in a frame of %d bytes: IKE %+v", len(frames[0])+2, h)
	}
	guestView(t, ctx, g, p, "with pluto listening")
	if !strings.Contains(p.Log(), "listening for IKE messages") {
		t.Errorf("pluto's log does not say it listens:\n%s", p.Log())
	}
}

// guestPing pings dst from src inside the guest and returns the replies.
func guestPing(ctx context.Context, g *uml.Guest, src, dst string, count int) (int, string, error) {
	out, err := g.Run(ctx, fmt.Sprintf("ping -n -q -c %d -i 0.2 -W 2 -I %s %s || true", count, src, dst))
	if err != nil {
		return 0, out, err
	}
	m := regexp.MustCompile(`(\d+) received`).FindStringSubmatch(out)
	if m == nil {
		return 0, out, fmt.Errorf("no ping summary in %q", out)
	}
	n, _ := strconv.Atoi(m[1])
	return n, out, nil
}

// checkESPinTCP checks, in the guest's view, that the kernel does ESP in
// TCP: an XFRM state with espintcp encapsulation and a TCP socket with the
// espintcp ULP; and that the kernel counted no error: espintcp counts a
// frame it cannot take (a bad length, a runt) as XfrmInHdrError, and ESP
// it cannot match or decrypt in the other XfrmIn and XfrmOut counters.
// Counters named in expected are left out (what a test caused on purpose).
func checkESPinTCP(t *testing.T, view string, expected ...string) {
	t.Helper()
	if _, stats, ok := strings.Cut(view, "# /proc/net/xfrm_stat (non-zero)\n"); ok {
		stats, _, _ = strings.Cut(stats, "# ")
		var unexpected []string
		for _, line := range strings.Split(strings.TrimSpace(stats), "\n") {
			if f := strings.Fields(line); len(f) > 0 && !slices.Contains(expected, f[0]) {
				unexpected = append(unexpected, line)
			}
		}
		if len(unexpected) > 0 {
			t.Errorf("the guest's kernel counted XFRM errors:\n%s", strings.Join(unexpected, "\n"))
		} else if strings.TrimSpace(stats) != "" {
			t.Logf("the guest's kernel counted, as expected:\n%s", stats)
		}
	} else {
		t.Errorf("no XFRM statistics in the guest's view")
	}
	if !strings.Contains(view, "encap type espintcp") {
		t.Errorf("no XFRM state with espintcp encapsulation in the guest")
	}
	if !strings.Contains(view, "tcp-ulp-espintcp") {
		t.Errorf("no TCP socket with the espintcp ULP in the guest")
	}
}

// TestInteropLibreswanInitiator: libreswan is the site. pluto in the guest,
// behind the carrier that drops UDP, initiates with enable-tcp=yes and
// tcp-remoteport = the iketcp server's port; the kernel's espintcp carries
// its ESP. iketcp server relays to the hub's strongSwan over UDP. The IKE
// and CHILD SA come up between libreswan and strongSwan and pings cross
// both ways. Then the guest's TCP connection is killed (ss -K): libreswan
// 4.10 does not reconnect an established IKE SA (see below), so the test
// starts the connection over and checks that the server carries the new
// IKE SA on a new connection, with pings both ways again.
func TestInteropLibreswanInitiator(t *testing.T) {
	l := lab.NewForTest(t, lab.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	hub, err := l.StartCharon(ctx, l.Hub, lab.IKEConfig{
		Name: lab.TunnelName, RemoteAddrs: "%any",
		LocalID: "hub.iketcp.test", RemoteID: "site.iketcp.test", PSK: lab.TunnelPSK,
		LocalTS: lab.HubInnerNet, RemoteTS: lab.SiteInnerNet,
	})
	if err != nil {
		t.Fatal(err)
	}
	server, err := l.StartIketcp(ctx, l.Hub, iketcpBinary, "server", "server",
		"--listen", fmt.Sprintf("%s:%d", lab.HubOuter, interopServerPort), "--backend", "127.0.0.1:4500")
	if err != nil {
		t.Fatal(err)
	}
	// The route into the tunnel is the guest's own: libreswan's updown
	// adds none without a leftsourceip.
	g := bootGuest(t, ctx, l, []string{lab.SiteInner + "/32"}, [][]string{
		{lab.HubOuterNet, "via", guestHostAddr},
		{lab.HubInnerNet, "via", guestHostAddr, "src", lab.SiteInner},
	})
	p, err := uml.StartPluto(ctx, g, uml.PlutoOptions{Conns: []uml.PlutoConn{{
		Name: "lab", Left: guestAddr, LeftID: "@site.iketcp.test", LeftSubnet: lab.SiteInnerNet, LeftNextHop: guestHostAddr,
		Right: lab.HubOuter, RightID: "@hub.iketcp.test", RightSubnet: lab.HubInnerNet,
		PSK: lab.TunnelPSK, EnableTCP: "yes", TCPRemotePort: interopServerPort,
		RetransmitTimeout: 10 * time.Second, DPDDelay: 2 * time.Second,
	}}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := p.Initiate(ctx, "lab"); err != nil {
		t.Fatal(err)
	}
	sa, err := hub.WaitEstablished(ctx)
	if err != nil {
		t.Fatalf("hub: %v\npluto log:\n%s", err, p.Log())
	}
	child, err := p.WaitChild(ctx, "lab", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("IKE SA %s_i %s_r up in %s; hub sees %s; libreswan: %s", sa.InitiatorSPI, sa.ResponderSPI,
		time.Since(start).Round(time.Millisecond), sa.RemoteHost, child.Line)
	if !sa.HasInstalledChild() {
		t.Fatalf("hub's IKE SA has no installed CHILD SA: %+v", sa)
	}
	pingBoth := func(when string) {
		t.Helper()
		n, out, err := guestPing(ctx, g, lab.SiteInner, lab.HubInner, 5)
		if err != nil || n == 0 {
			t.Errorf("%s: guest %s -> hub %s: %d of 5 replies (%v)\n%s", when, lab.SiteInner, lab.HubInner, n, err, out)
		}
		m, err := l.Ping(ctx, l.Hub, lab.HubInner, lab.SiteInner, 5, 200*time.Millisecond)
		if err != nil || m == 0 {
			t.Errorf("%s: hub %s -> guest %s: %d of 5 replies (%v)", when, lab.HubInner, lab.SiteInner, m, err)
		}
		t.Logf("%s: pings guest->hub %d/5, hub->guest %d/5", when, n, m)
	}
	pingBoth("after the SA came up")
	view := guestView(t, ctx, g, p, "after the SA came up")
	checkESPinTCP(t, view)
	if dropped, err := l.UDPDropped(ctx); err == nil {
		t.Logf("carrier dropped %d UDP packets", dropped)
	}

	// Kill the guest's TCP connection to the server, as a middlebox would.
	killed := time.Now()
	out, err := g.Run(ctx, fmt.Sprintf("ss -K -tn dst %s dport = :%d", lab.HubOuter, interopServerPort))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ss -K in the guest:\n%s", out)
	if !strings.Contains(out, strconv.Itoa(interopServerPort)) {
		t.Fatalf("ss -K found no connection to the server to kill:\n%s", out)
	}
	// libreswan (4.10) never reopens the stream of an established IKE SA:
	// it opens TCP only when it starts an IKE SA, and over TCP it leaves
	// retransmission to TCP, so its requests on the dead stream never
	// time out ("TCP: retransmit skipped because TCP is handling
	// retransmits") and DPD never declares the peer dead. The SA cannot
	// survive from this side; what iketcp can do is keep the session for a
	// reconnect that never comes, and carry the new IKE SA when the
	// connection is started over (whack --terminate, --initiate).
	time.Sleep(3 * time.Second) // a liveness probe or two into the dead stream
	if n, _, err := guestPing(ctx, g, lab.SiteInner, lab.HubInner, 2); err == nil && n > 0 {
		t.Logf("pings crossed after the kill: libreswan reconnected by itself")
	} else {
		t.Logf("no ping crossed 3 s after the kill: libreswan keeps its IKE SA on the dead stream")
	}
	if out, err := p.Terminate(ctx, "lab"); err != nil {
		t.Logf("whack --terminate: %v\n%s", err, out)
	}
	if err := p.Initiate(ctx, "lab"); err != nil {
		t.Fatal(err)
	}
	revived, err := waitNewIKESA(ctx, hub, sa, 60*time.Second)
	if err != nil {
		t.Fatalf("%v\npluto log:\n%s", err, tail(p.Log(), 4000))
	}
	t.Logf("libreswan started again: IKE SA %s_i %s_r, %s after the kill", revived.InitiatorSPI, revived.ResponderSPI, time.Since(killed).Round(time.Millisecond))
	if _, err := p.WaitChild(ctx, "lab", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	pingBoth("after the new IKE SA")
	view = guestView(t, ctx, g, p, "after the new IKE SA")
	// The pings sent while the stream was dead found no espintcp socket.
	checkESPinTCP(t, view, "XfrmOutStateProtoError")
	st, err := server.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := counter(t, st, "conns_accepted"); got < 2 {
		t.Errorf("iketcp server accepted %d connections, want the first and libreswan's new one", got)
	}
	t.Logf("iketcp server: %d connections accepted, %d sessions created", counter(t, st, "conns_accepted"), counter(t, st, "sessions_created"))
}

// TestInteropLibreswanResponder: libreswan is the hub. pluto in the guest
// listens on TCP 4500 (listen-tcp=yes); the site's strongSwan talks UDP to
// `iketcp client --plain-rfc9329`, which opens RFC 9329 TCP to pluto
// through the carrier that drops UDP. The SA comes up, pings cross both
// ways, and an IKE rekey and a CHILD rekey (from strongSwan) succeed, with
// pings after each.
func TestInteropLibreswanResponder(t *testing.T) {
	for _, v := range []struct {
		name     string
		args     []string
		expected []string // XFRM counters the variant moves on purpose
	}{
		// Told that the responder is not iketcp: RFC 9329 frames only.
		{"plain-rfc9329", []string{"--plain-rfc9329"}, nil},
		// Not told: the first connection's hello goes unanswered (the
		// kernel counts it as ESP without a state, once), and the client
		// reconnects with RFC 9329 frames only before any IKE crossed.
		{"unannounced", nil, []string{"XfrmInNoStates"}},
	} {
		t.Run(v.name, func(t *testing.T) {
			l := lab.NewForTest(t, lab.Options{})
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
			defer cancel()
			if err := l.BlockUDP(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := l.Site.Run(ctx, "ip", "route", "add", guestNet, "via", lab.CarrierSite); err != nil {
				t.Fatal(err)
			}
			g := bootGuest(t, ctx, l, []string{lab.HubInner + "/32"}, [][]string{
				{lab.SiteOuterNet, "via", guestHostAddr},
				{lab.SiteInnerNet, "via", guestHostAddr, "src", lab.HubInner},
			})
			p, err := uml.StartPluto(ctx, g, uml.PlutoOptions{ListenTCP: true, Conns: []uml.PlutoConn{{
				Name: "lab", Left: guestAddr, LeftID: "@hub.iketcp.test", LeftSubnet: lab.HubInnerNet, LeftNextHop: guestHostAddr,
				Right: "%any", RightID: "@site.iketcp.test", RightSubnet: lab.SiteInnerNet,
				PSK: lab.TunnelPSK, EnableTCP: "yes",
			}}})
			if err != nil {
				t.Fatal(err)
			}
			site, err := l.StartCharon(ctx, l.Site, lab.IKEConfig{
				Name: lab.TunnelName, LocalAddrs: "127.0.0.1", LocalPort: 4500,
				RemoteAddrs: "127.0.0.1", RemotePort: lab.ClientListenPort,
				LocalID: "site.iketcp.test", RemoteID: "hub.iketcp.test", PSK: lab.TunnelPSK,
				LocalTS: lab.SiteInnerNet, RemoteTS: lab.HubInnerNet,
			})
			if err != nil {
				t.Fatal(err)
			}
			args := append([]string{"client", "--listen", fmt.Sprintf("127.0.0.1:%d", lab.ClientListenPort),
				"--peer", guestAddr + ":4500"}, v.args...)
			client, err := l.StartIketcp(ctx, l.Site, iketcpBinary, "client", args...)
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if err := site.Initiate(ctx); err != nil {
				t.Fatalf("%v\npluto log:\n%s", err, p.Log())
			}
			sa, err := site.WaitEstablished(ctx)
			if err != nil {
				t.Fatalf("%v\npluto log:\n%s", err, p.Log())
			}
			child, err := p.WaitChild(ctx, "lab", 30*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("IKE SA %s_i %s_r up in %s; libreswan: %s", sa.InitiatorSPI, sa.ResponderSPI, time.Since(start).Round(time.Millisecond), child.Line)
			pingBoth := func(when string) {
				t.Helper()
				m, err := l.Ping(ctx, l.Site, lab.SiteInner, lab.HubInner, 5, 200*time.Millisecond)
				if err != nil || m == 0 {
					t.Errorf("%s: site %s -> guest %s: %d of 5 replies (%v)", when, lab.SiteInner, lab.HubInner, m, err)
				}
				n, out, err := guestPing(ctx, g, lab.HubInner, lab.SiteInner, 5)
				if err != nil || n == 0 {
					t.Errorf("%s: guest %s -> site %s: %d of 5 replies (%v)\n%s", when, lab.HubInner, lab.SiteInner, n, err, out)
				}
				t.Logf("%s: pings site->guest %d/5, guest->site %d/5", when, m, n)
			}
			pingBoth("after the SA came up")
			checkESPinTCP(t, guestView(t, ctx, g, p, "after the SA came up"), v.expected...)

			rekeyed, err := site.RekeyIKE(ctx, lab.TunnelName)
			if err != nil {
				t.Fatalf("IKE rekey: %v\npluto log:\n%s", err, tail(p.Log(), 4000))
			}
			t.Logf("IKE rekey: %s_i %s_r -> %s_i %s_r", sa.InitiatorSPI, sa.ResponderSPI, rekeyed.InitiatorSPI, rekeyed.ResponderSPI)
			pingBoth("after the IKE rekey")
			before := rekeyed.Children[0]
			rekeyed, err = site.RekeyChild(ctx, lab.TunnelName)
			if err != nil {
				t.Fatalf("CHILD rekey: %v\npluto log:\n%s", err, tail(p.Log(), 4000))
			}
			t.Logf("CHILD rekey: SPIs in/out %s/%s -> %s/%s", before.SPIIn, before.SPIOut, rekeyed.Children[0].SPIIn, rekeyed.Children[0].SPIOut)
			pingBoth("after the CHILD rekey")
			view := guestView(t, ctx, g, p, "after both rekeys")
			checkESPinTCP(t, view, v.expected...)
			if !strings.Contains(view, "0x"+strings.TrimLeft(rekeyed.Children[0].SPIOut, "0")) && !strings.Contains(view, rekeyed.Children[0].SPIOut) {
				t.Errorf("the guest has no XFRM state for the rekeyed CHILD SA's SPI %s", rekeyed.Children[0].SPIOut)
			}
			st, err := client.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("iketcp client: %+v", st)
		})
	}
}

// waitNewIKESA waits (at most d) until the charon has an established IKE
// SA with a CHILD SA installed whose SPIs differ from old's.
func waitNewIKESA(ctx context.Context, c *lab.Charon, old lab.IKESA, d time.Duration) (lab.IKESA, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for range int(d / (250 * time.Millisecond)) {
		sas, err := c.ListSAs(ctx)
		if err == nil {
			for _, sa := range sas {
				if sa.State == "ESTABLISHED" && sa.HasInstalledChild() && sa.InitiatorSPI != old.InitiatorSPI {
					return sa, nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return lab.IKESA{}, fmt.Errorf("no new IKE SA in %s within %s", c.Namespace.Role, d)
		case <-time.After(250 * time.Millisecond):
		}
	}
	return lab.IKESA{}, fmt.Errorf("no new IKE SA in %s within %s", c.Namespace.Role, d)
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// TestInteropTransparentKernelESP runs the site's strongSwan in the guest
// with the kernel's own IPsec (kernel-netlink, no libipsec), unchanged (the
// hub's address, ports 500 and 4500), with `iketcp client --tun` beside it
// in the guest. The kernel's XFRM encrypts the ESP; the policy rules must
// route it into iketcp's TUN device, which needs the kernel's route lookup
// for XFRM to carry the outer protocol and ports (Linux 6.12, and stable
// kernels that took "xfrm: respect ip protocols rules criteria when
// performing dst lookups"; Debian's 6.1.192 did). The test checks that the
// guest's XFRM state encapsulates in UDP (the kernel encrypts), that pings
// cross both ways, that iketcp saw the ESP, and that none of it reached
// the carrier as UDP. It runs on each series of uml.Series: Debian 12's
// 6.1 and bookworm-security's 6.12.
func TestInteropTransparentKernelESP(t *testing.T) {
	for _, series := range uml.Series {
		t.Run(series, func(t *testing.T) { transparentKernelESP(t, series) })
	}
}

func transparentKernelESP(t *testing.T, series string) {
	l := lab.NewForTest(t, lab.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	hub, err := l.StartCharon(ctx, l.Hub, lab.IKEConfig{
		Name: lab.TunnelName, RemoteAddrs: "%any",
		LocalID: "hub.iketcp.test", RemoteID: "site.iketcp.test", PSK: lab.TunnelPSK,
		LocalTS: lab.HubInnerNet, RemoteTS: lab.SiteInnerNet,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.StartIketcp(ctx, l.Hub, iketcpBinary, "server", "server",
		"--listen", fmt.Sprintf("%s:%d", lab.HubOuter, interopServerPort), "--backend", "127.0.0.1:4500"); err != nil {
		t.Fatal(err)
	}
	g := bootGuestOn(t, ctx, l, series, []string{lab.SiteInner + "/32"}, [][]string{
		{lab.HubOuterNet, "via", guestHostAddr},
	})
	dir := g.Opts.Dir
	conf := fmt.Sprintf(`charon {
    load_modular = no
    load = random nonce drbg aes sha1 sha2 hmac gmp kdf kernel-netlink socket-default vici counters
    retransmit_timeout = 1.0
    retransmit_base = 1.4
    retransmit_tries = 4
    filelog { main { path = %s/charon.log  append = no  flush_line = yes  default = 1  ike = 2  net = 2 } }
    plugins { vici { socket = unix:///run/charon.vici } }
}
charon-systemd { journal { default = -1 } }
swanctl { socket = unix:///run/charon.vici }
`, dir)
	swanctl := fmt.Sprintf(`connections {
    lab {
        version = 2
        remote_addrs = %s
        proposals = %s
        encap = yes
        local { auth = psk
            id = site.iketcp.test }
        remote { auth = psk
            id = hub.iketcp.test }
        children { lab {
            local_ts = %s
            remote_ts = %s
            esp_proposals = %s
        } }
    }
}
secrets { ike-lab { id-local = site.iketcp.test
    id-remote = hub.iketcp.test
    secret = "%s" } }
`, lab.HubOuter, lab.IKEProposal, lab.SiteInnerNet, lab.HubInnerNet, lab.ESPProposal, lab.TunnelPSK)
	if err := os.WriteFile(filepath.Join(dir, "strongswan.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "swanctl.conf"), []byte(swanctl), 0o644); err != nil {
		t.Fatal(err)
	}
	env := "STRONGSWAN_CONF=" + filepath.Join(dir, "strongswan.conf")
	if _, err := g.Run(ctx, fmt.Sprintf("%s %s >%s/charon.out 2>&1 </dev/null &\n"+
		"for i in $(seq 100); do %s swanctl --stats >/dev/null 2>&1 && break; sleep 0.1; done\n"+
		"%s swanctl --load-all --noprompt --file %s/swanctl.conf",
		env, lab.CharonPath, dir, env, env, dir)); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Run(ctx, fmt.Sprintf("%s client --tun --peer %s --tcp-port %d --control /run/iketcp.sock --log-level debug >%s/iketcp.log 2>&1 </dev/null &\n"+
		"for i in $(seq 100); do %s status --control /run/iketcp.sock >/dev/null 2>&1 && break; sleep 0.1; done\n"+
		"%s status --control /run/iketcp.sock",
		iketcpBinary, lab.HubOuter, interopServerPort, dir, iketcpBinary, iketcpBinary)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	out, err := g.Run(ctx, fmt.Sprintf("%s timeout 30 swanctl --initiate --child lab", env))
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	sa, err := hub.WaitEstablished(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("IKE SA %s_i %s_r up in %s, hub sees %s", sa.InitiatorSPI, sa.ResponderSPI, time.Since(start).Round(time.Millisecond), sa.RemoteHost)
	n, pout, err := guestPing(ctx, g, lab.SiteInner, lab.HubInner, 5)
	m, herr := l.Ping(ctx, l.Hub, lab.HubInner, lab.SiteInner, 5, 200*time.Millisecond)
	rules, _ := g.Run(ctx, "ip rule; ip -s xfrm state | grep -e '^src' -e encap -e 'bytes),'; "+iketcpBinary+" status --control /run/iketcp.sock")
	t.Logf("guest: pings guest->hub %d/5 (%v), hub->guest %d/5 (%v)\n%s\nguest's rules, XFRM states and iketcp status:\n%s", n, err, m, herr, pout, rules)
	t.Logf("guest's view:\n%s", g.View(ctx, nil))
	if !strings.Contains(rules, "encap type espinudp sport 4500 dport 4500") {
		t.Errorf("the guest's kernel holds no ESP-in-UDP state: the ESP was not the kernel's")
	}
	if !strings.Contains(rules, "ESP in UDP 4500->4500") {
		t.Errorf("iketcp client did not intercept the kernel's ESP in UDP")
	}
	if dropped, err := l.UDPDropped(ctx); err != nil || dropped != 0 {
		t.Errorf("the carrier dropped %d UDP packets (%v): kernel ESP left by the main table", dropped, err)
	}
	if n == 0 || m == 0 {
		log, _ := os.ReadFile(filepath.Join(dir, "iketcp.log"))
		t.Errorf("kernel-encrypted ESP did not cross through transparent mode\niketcp log:\n%s", tail(string(log), 3000))
	}
}
