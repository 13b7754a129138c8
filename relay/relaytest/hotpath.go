package relaytest

import (
	"net/netip"
	"runtime"
	"testing"
	"time"
)

// CheckHotPath relays 1400-byte ESP back and forth through r (the backend
// answering from), and fails tb if the whole process allocates more than
// 0.05 times per relayed datagram, beyond wireCopies allocations per
// round trip that the test's own wire makes. Run it without the race
// detector (RaceEnabled), which allocates on its own.
func CheckHotPath(tb testing.TB, r *Rig, from netip.AddrPort, wireCopies int) {
	tb.Helper()
	up, down := ESP(0xc9, 1, 1400), ESP(0xd9, 1, 1400)
	buf := make([]byte, 2048)
	roundTrip := func() {
		r.Site.Write(up)
		r.Backend.SetReadDeadline(time.Now().Add(time.Second))
		r.Backend.ReadFromUDPAddrPort(buf)
		r.Backend.WriteToUDPAddrPort(down, from)
		r.Site.SetReadDeadline(time.Now().Add(time.Second))
		r.Site.Read(buf)
	}
	for range 200 {
		roundTrip()
	}
	const n = 2000
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range n {
		roundTrip()
	}
	runtime.ReadMemStats(&after)
	perDatagram := (float64(after.Mallocs-before.Mallocs) - float64(wireCopies*n)) / (2 * n)
	tb.Logf("%.3f allocations per relayed datagram (whole process, beyond the wire's copies)", perDatagram)
	if perDatagram > 0.05 {
		tb.Fatalf("%.3f allocations per datagram: the hot path allocates", perDatagram)
	}
}
