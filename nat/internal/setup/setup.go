// Package setup owns the conventions that every setup of iketcp's network
// plumbing follows (transparent mode's in nat/intercept, fake-TCP mode's
// in nat/fakenet, and the TUN device of nat/tun that both create): how a
// mode names itself in its errors and turns a refused step into its
// CAP_NET_ADMIN error, the up-front capability check, undoing a setup
// that failed halfway, the hook through which tests fail a setup after
// each thing it installs, and listing and describing the policy rules and
// routes a mode installs (as `ip rule` and `ip route` would say them).
package setup

import (
	"errors"
	"fmt"
)

// Mode is a mode that sets up network plumbing, as its errors and log
// lines name it.
type Mode struct {
	// Name is the mode as a sentence starts: "transparent mode".
	Name string
	// NeedsNetAdmin is the error for a missing CAP_NET_ADMIN; it matches
	// nat.ErrNeedsNetAdmin (errors.Is).
	NeedsNetAdmin error
	// NeedsLinux is the error on other systems; it matches
	// nat.ErrNeedsLinux.
	NeedsLinux error
}

// TestHookInstalled, if set, runs after each thing a setup installs; an
// error from it fails the setup there. Tests use it to check the undoing.
var TestHookInstalled func(what string) error

// Installed reports a thing that a setup installed to TestHookInstalled.
func Installed(what string) error {
	if TestHookInstalled == nil {
		return nil
	}
	return TestHookInstalled(what)
}

// Undo runs undo after a setup failed with err, and returns err, joined
// with what undo could not undo.
func Undo(err error, undo func() error) error {
	if uerr := undo(); uerr != nil {
		return errors.Join(err, fmt.Errorf("undoing it: %w", uerr))
	}
	return err
}
