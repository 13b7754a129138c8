//go:build !linux

package streamlink

import "syscall"

// newDirect returns nil where writing without blocking is not built:
// every frame then goes through the queue and the writer.
func newDirect(syscall.RawConn) directWriter { return nil }

// setSocketOptions sets nothing where the options are not built.
func setSocketOptions(syscall.RawConn, int, string) error { return nil }
