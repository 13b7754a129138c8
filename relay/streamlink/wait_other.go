//go:build !linux

package streamlink

import "syscall"

// waiter returns at once where waiting without reading is not built: the
// link then keeps its buffer while it waits.
type waiter struct{}

func newWaiter(syscall.RawConn) *waiter { return &waiter{} }

func (w *waiter) wait() error { return nil }
