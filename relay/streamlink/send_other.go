//go:build !linux

package streamlink

import (
	"errors"
	"syscall"
)

// newDirect returns nil where writing without blocking is not built:
// every frame then goes through the queue and the writer.
func newDirect(syscall.RawConn) directWriter { return nil }

// setSocketOptions sets nothing where the options are not built.
func setSocketOptions(syscall.RawConn, int, string) error { return nil }

// deliveryRate is not known where TCP_INFO is not built.
func deliveryRate(syscall.RawConn) (uint64, error) { return 0, errors.ErrUnsupported }

// kernelBacklog is not known where TCP_INFO is not built.
type kernelBacklog struct{}

func newKernelBacklog(syscall.RawConn) *kernelBacklog { return nil }

func (*kernelBacklog) get(int64, uint64) (int, uint64) { return 0, 0 }
