package relay

import (
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// inPrivateNetns runs fn on a thread of its own inside a new, anonymous
// network namespace with lo up, and discards the thread afterwards (its
// goroutine ends while locked). Sockets, devices and routes fn creates
// live in that namespace; the namespace vanishes with the last of them.
// The rest of the process stays in its own namespace: the host's routing
// is never touched. It needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); tb
// is skipped without it, or failed under CI=true.
func inPrivateNetns(tb testing.TB, fn func() error) {
	tb.Helper()
	if os.Geteuid() != 0 {
		msg := "needs root to build a network namespace with a TUN device"
		if os.Getenv("CI") == "true" {
			tb.Fatal(msg + "; CI=true, so this is a failure, not a skip")
		}
		tb.Skip(msg)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with this goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
			return
		}
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			errc <- fmt.Errorf("bringing lo up: %w", err)
			return
		}
		errc <- fn()
	}()
	if err := <-errc; err != nil {
		tb.Fatal(err)
	}
}
