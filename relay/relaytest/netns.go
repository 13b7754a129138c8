package relaytest

import (
	"testing"

	"github.com/iketcp/iketcp/nat/nattest"
)

// InPrivateNetns runs fn on a thread of its own inside a new, anonymous
// network namespace with lo up. Sockets, devices and routes fn creates
// live in that namespace; the rest of the process stays in its own, so
// the host's routing is never touched. Without root tb is skipped, or
// failed under CI=true.
func InPrivateNetns(tb testing.TB, fn func() error) {
	tb.Helper()
	nattest.SkipOrFail(tb, nattest.Missing(), "to build a network namespace with a TUN device")
	if err := nattest.New(tb).Do(fn); err != nil {
		tb.Fatal(err)
	}
}
