package setup

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

var errTestNetAdmin = errors.New("test mode needs CAP_NET_ADMIN")

var testMode = Mode{Name: "test mode", NeedsNetAdmin: errTestNetAdmin}

func TestFailed(t *testing.T) {
	err := testMode.Failed("add a rule", &os.SyscallError{Syscall: "sendmsg", Err: unix.EPERM})
	if !errors.Is(err, errTestNetAdmin) || err.Error() != "test mode needs CAP_NET_ADMIN: add a rule: sendmsg: operation not permitted" {
		t.Errorf("EPERM: %v", err)
	}
	err = testMode.Failed("add a rule", unix.EEXIST)
	if !errors.Is(err, unix.EEXIST) || errors.Is(err, errTestNetAdmin) || err.Error() != "test mode: add a rule: file exists" {
		t.Errorf("EEXIST: %v", err)
	}
}

func TestUndo(t *testing.T) {
	failed := errors.New("step failed")
	if err := Undo(failed, func() error { return nil }); err != failed {
		t.Errorf("clean undo: %v", err)
	}
	left := errors.New("a route stayed")
	err := Undo(failed, func() error { return left })
	if !errors.Is(err, failed) || !errors.Is(err, left) || err.Error() != "step failed\nundoing it: a route stayed" {
		t.Errorf("incomplete undo: %q", err)
	}
}

func TestInstalled(t *testing.T) {
	if err := Installed("device x"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { TestHookInstalled = nil })
	TestHookInstalled = func(what string) error { return fmt.Errorf("after %s", what) }
	if err := Installed("device x"); err == nil || err.Error() != "after device x" {
		t.Errorf("hook: %v", err)
	}
}

func TestGone(t *testing.T) {
	for _, c := range []struct {
		err  error
		gone bool
	}{
		{unix.ENOENT, true},
		{fmt.Errorf("delete: %w", unix.ESRCH), true},
		{unix.ENODEV, true},
		{netlink.LinkNotFoundError{}, true},
		{unix.EPERM, false},
		{errors.New("other"), false},
	} {
		if Gone(c.err) != c.gone {
			t.Errorf("Gone(%v) = %v", c.err, !c.gone)
		}
	}
}
