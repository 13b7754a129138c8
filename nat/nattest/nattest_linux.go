// Package nattest builds what iketcp's tests of network plumbing need and
// must not take from the host: anonymous network namespaces, entered only
// on threads of their own, which vanish with their last descriptor,
// thread or socket even if the test binary dies. The tests of nat's
// packages, of integration/antireplay and of relay share it.
package nattest

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
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
