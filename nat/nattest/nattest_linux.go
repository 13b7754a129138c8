// Package nattest builds what iketcp's tests of network plumbing need and
// must not take from the host: anonymous network namespaces, entered only
// on threads of their own, which vanish with their last descriptor,
// thread or socket even if the test binary dies; and what the tests do in
// them: the ip command, sysctls, addresses, hand-built packets with their
// checksums, sockets that expect a datagram, a thread without
// CAP_NET_ADMIN. The tests of nat's packages, of integration/antireplay
// and of relay share it; product code never imports it.
package nattest

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
	"github.com/iketcp/iketcp/nat/tun"
)

// Missing lists what the process lacks to build network namespaces: root,
// or its CAP_SYS_ADMIN and CAP_NET_ADMIN.
func Missing() []string {
	if os.Geteuid() != 0 {
		return []string{"root"}
	}
	var missing []string
	for _, c := range []struct {
		cap  int
		name string
	}{{unix.CAP_SYS_ADMIN, "CAP_SYS_ADMIN"}, {unix.CAP_NET_ADMIN, "CAP_NET_ADMIN"}} {
		if !HaveCap(c.cap) {
			missing = append(missing, c.name)
		}
	}
	return missing
}

// SkipOrFail skips tb when something is missing, saying what and what for,
// and fails it instead under CI=true, where tests must not skip.
func SkipOrFail(tb testing.TB, missing []string, purpose string) {
	tb.Helper()
	if len(missing) == 0 {
		return
	}
	msg := "needs " + strings.Join(missing, ", ") + " " + purpose
	if os.Getenv("CI") == "true" {
		tb.Fatal(msg + "; CI=true, so this is a failure, not a skip")
	}
	tb.Skip(msg)
}

// HaveCap reports whether the calling thread has capability c in effect.
func HaveCap(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[c/32].Effective&(1<<(c%32)) != 0
}

// NS is a network namespace held by a descriptor; tests enter it only
// through Do.
type NS struct{ fd int }

// New creates a namespace with lo up; it lives until the test's end and
// whatever sockets were made in it are closed.
func New(tb testing.TB) *NS {
	tb.Helper()
	ns := &NS{fd: -1}
	err := OnNewThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
		}
		fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		ns.fd = fd
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	if ns.fd >= 0 {
		tb.Cleanup(func() { unix.Close(ns.fd) })
	}
	if err != nil {
		tb.Fatal(err)
	}
	return ns
}

// Fd is the namespace's descriptor, for moving a link into it
// (netlink.NsFd).
func (ns *NS) Fd() int { return ns.fd }

// Do runs f on a fresh thread inside ns; the thread ends with f. Sockets
// and devices made in f stay in ns and can be used from any goroutine;
// programs f runs (os/exec forks from the locked thread) run in ns.
func (ns *NS) Do(f func() error) error {
	return OnNewThread(func() error {
		if err := unix.Setns(ns.fd, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("setns: %w", err)
		}
		return f()
	})
}

// OnNewThread runs f on a goroutine locked to its thread and lets the
// goroutine end locked, so that the thread, whatever f did to it, ends
// too and never returns to the scheduler.
func OnNewThread(f func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		done <- f()
	}()
	return <-done
}

// RequireTUN skips a test that needs root, TUN and iproute2 where they
// are missing, and fails it instead under CI=true.
func RequireTUN(tb testing.TB) {
	tb.Helper()
	missing := Missing()
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		missing = append(missing, "/dev/net/tun (modprobe tun)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		missing = append(missing, "the ip command (Debian package iproute2)")
	}
	SkipOrFail(tb, missing, "to build network namespaces with a TUN device")
}

// Enter moves the calling test goroutine, for the rest of its life, into
// a new network namespace with lo up, after RequireTUN. Its thread is
// never unlocked, so it ends with the test and never returns to the
// scheduler. Everything the test does afterwards (sockets, netlink,
// sysctls, exec of ip) happens inside the namespace. Call it from the
// test's own goroutine only, and use no subtests, which run on other
// goroutines.
func Enter(tb testing.TB) {
	tb.Helper()
	RequireTUN(tb)
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		tb.Fatalf("unshare(CLONE_NEWNET): %v", err)
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		tb.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		tb.Fatal(err)
	}
}

// IP runs the ip command in the calling thread's namespace (the child
// inherits it from the locked thread that forks it), and returns what it
// printed on stdout.
func IP(tb testing.TB, args ...string) string {
	tb.Helper()
	var stderr strings.Builder
	cmd := exec.Command("ip", args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		tb.Fatalf("ip %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.String())
	}
	// What it says on stderr while it succeeds is not state: "Peer netns
	// reference is invalid" while another test's namespace comes or goes.
	return string(out)
}

// WriteSysctl writes a sysctl of the calling thread's namespace; key uses
// slashes (net/ipv4/conf/all/rp_filter).
func WriteSysctl(key, value string) error {
	return os.WriteFile("/proc/sys/"+key, []byte(value), 0)
}

// SetSysctl is WriteSysctl that fails tb.
func SetSysctl(tb testing.TB, key, value string) {
	tb.Helper()
	if err := WriteSysctl(key, value); err != nil {
		tb.Fatal(err)
	}
}

// NoDAD turns off IPv6 duplicate address detection in the calling
// thread's namespace, for the devices there and those to come: IPv6
// addresses are usable at once, and no routes come later.
func NoDAD() error {
	return errors.Join(WriteSysctl("net/ipv6/conf/all/accept_dad", "0"), WriteSysctl("net/ipv6/conf/default/accept_dad", "0"))
}

// AddAddr gives link the address a/bits, without duplicate address
// detection.
func AddAddr(link netlink.Link, a netip.Addr, bits int) error {
	ipnet := &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
	return netlink.AddrAdd(link, &netlink.Addr{IPNet: ipnet, Flags: unix.IFA_F_NODAD})
}

// Prefix is the network of a with bits ones.
func Prefix(a netip.Addr, bits int) *net.IPNet {
	p := netip.PrefixFrom(a, bits).Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
}

// Settled calls snapshot until two snapshots in a row agree, so that the
// kernel's own delayed work (carrier, IPv6 link-local routes) is done, and
// returns the last one.
func Settled(tb testing.TB, snapshot func() string) string {
	tb.Helper()
	prev := snapshot()
	for range 100 {
		time.Sleep(50 * time.Millisecond)
		cur := snapshot()
		if cur == prev {
			return cur
		}
		prev = cur
	}
	tb.Fatalf("the namespace does not settle:\n%s", prev)
	return ""
}

// WithoutNetAdmin runs f on a thread of its own, in a new network
// namespace of its own, with CAP_NET_ADMIN dropped from the thread's
// effective set.
func WithoutNetAdmin(f func() error) error {
	return OnNewThread(func() error {
		// The namespace first, while the thread may still make one.
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return err
		}
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			return err
		}
		data[0].Effective &^= 1 << unix.CAP_NET_ADMIN
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			return err
		}
		return f()
	})
}

// CheckUndo checks that a setup undoes what it did when it fails after
// any of the things it installs. It runs setup once, recording each thing
// that the setup reports to setup.Installed, and closes what it returns;
// then once for each of them, failing it there, when the setup must fail
// with that failure and check must find the namespace as it was. It
// returns the things, in order.
func CheckUndo(tb testing.TB, run func() (io.Closer, error), check func(after string)) []string {
	tb.Helper()
	tb.Cleanup(func() { setup.TestHookInstalled = nil })
	var steps []string
	setup.TestHookInstalled = func(what string) error {
		steps = append(steps, what)
		return nil
	}
	c, err := run()
	if err != nil {
		tb.Fatal(err)
	}
	if err := c.Close(); err != nil {
		tb.Fatal(err)
	}
	tb.Logf("the setup installs %d things: %s", len(steps), strings.Join(steps, "; "))
	for fail := range steps {
		n := 0
		setup.TestHookInstalled = func(what string) error {
			if n++; n > fail {
				return fmt.Errorf("injected failure after %s", what)
			}
			return nil
		}
		if _, err := run(); err == nil || !strings.Contains(err.Error(), "injected failure") {
			tb.Fatalf("failing after %s: %v", steps[fail], err)
		}
		check(steps[fail])
	}
	return steps
}

// CreateTUN creates a TUN device named name for m in the calling thread's
// namespace and removes it at once; it returns what tun.Create returned,
// as a test of the kernel's own refusals wants it.
func CreateTUN(m setup.Mode, name string) error {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer h.Close()
	d, err := tun.Create(h, m, name, false, tun.Options{})
	if err == nil {
		d.Close()
	}
	return err
}
