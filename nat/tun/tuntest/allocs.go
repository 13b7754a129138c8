package tuntest

import (
	"testing"

	"github.com/iketcp/iketcp/nat/tun"
)

// CheckNoAllocs checks that dev's Read of one packet, into a buffer of
// bufSize bytes, and Write of reply allocate nothing in steady state.
// send puts one packet on its way into dev; CheckNoAllocs calls it once
// for each Read it measures, up front. Allocation counts need a build
// without the race detector.
func CheckNoAllocs(tb testing.TB, dev tun.Device, bufSize int, send func(), reply []byte) {
	tb.Helper()
	const runs = 100
	for range runs + 1 { // AllocsPerRun runs once more to warm up
		send()
	}
	bufs := [][]byte{make([]byte, bufSize)}
	sizes := []int{0}
	if a := testing.AllocsPerRun(runs, func() {
		if n, err := dev.Read(bufs, sizes, 0); n != 1 || err != nil {
			tb.Fatalf("Read: %d, %v", n, err)
		}
	}); a != 0 {
		tb.Errorf("Read: %v allocations per call", a)
	}
	replies := [][]byte{reply}
	if a := testing.AllocsPerRun(runs, func() {
		if n, err := dev.Write(replies, 0); n != 1 || err != nil {
			tb.Fatalf("Write: %d, %v", n, err)
		}
	}); a != 0 {
		tb.Errorf("Write: %v allocations per call", a)
	}
}
