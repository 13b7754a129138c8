package integration

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
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
)

// umlPrereqs holds what every interop test needs, made once per process:
// the kernel (built unless cached), libreswan unpacked, guestinit built.
var umlPrereqs struct {
	once      sync.Once
	kernel    *uml.Kernel
	libreswan *uml.Libreswan
	init      string
	dir       string
	err       error
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
		if p.dir, p.err = os.MkdirTemp("", "iketcp-uml-"); p.err != nil {
			return
		}
		p.init, p.err = uml.BuildInit(ctx, p.dir)
		t.Logf("uml: prerequisites ready in %s (libreswan %s)", time.Since(start).Round(time.Millisecond), p.libreswan.Version)
	})
	if p.err != nil {
		t.Fatalf("UML prerequisites: %v", p.err)
	}
	return p.kernel, p.libreswan, p.init
}

// bootGuest boots a guest whose TAP sits in the lab's carrier, with the
// given addresses on its lo and routes, and registers its shutdown (which
// the test checks to be clean) and a dump of its view on failure.
func bootGuest(t *testing.T, ctx context.Context, l *lab.Lab, loopback []string, routes [][]string) *uml.Guest {
	t.Helper()
	kernel, sw, init := requireUML(t)
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
