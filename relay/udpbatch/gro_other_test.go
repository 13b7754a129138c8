//go:build !linux

package udpbatch

import "testing"

// skipWithoutGRO skips: receive offload is Linux's.
func skipWithoutGRO(t testing.TB) {
	t.Helper()
	t.Skip("UDP_GRO is Linux's")
}
