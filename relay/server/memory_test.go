package server_test

import (
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
)

// inUse is the memory the process holds for Go: heap in use and goroutine
// stacks, after garbage collection (twice, which also empties sync.Pools).
func inUse() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// idleLimit is what an idle connection and an idle session may cost the
// server, at most.
const idleLimit = 16 << 10

// TestIdleMemory measures what an idle connection and an idle session
// cost: 1,200 connections that sent the prefix and nothing else, and
// 1,200 confirmed sessions that carried traffic once and then went quiet.
// The figures include the test's own client sockets.
func TestIdleMemory(t *testing.T) {
	if relaytest.RaceEnabled {
		t.Skip("the race detector's shadow memory makes the figures meaningless; make test runs this without -race")
	}
	const n = 1200
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{
		MaxConns: 2 * n, MaxUnconfirmedPerSource: 2 * n, MaxSessions: 2 * n, MaxSessionsPerSource: 2 * n,
		MaxHalfOpen: 2 * n, MaxHalfOpenPerSource: 2 * n,
	}})
	base := inUse()
	conns := make([]net.Conn, 0, n)
	for range n {
		conns = append(conns, r.RawConn(true))
	}
	relaytest.Eventually(t, "every connection accepted", func() bool {
		return relaytest.Counter(r.Srv.Counters(), "conns_accepted") == n
	})
	time.Sleep(200 * time.Millisecond) // every link past its prefix, waiting
	withConns := inUse()
	perConn := float64(withConns-base) / n
	t.Logf("idle connection: %.0f bytes (%d connections)", perConn, n)

	// Sessions, all on one connection, each confirmed by the backend and
	// carrying one round trip of ESP.
	c := r.RawConn(true)
	d := framing.NewDecoder(c, 0, false)
	before := inUse()
	for i := range uint64(n) {
		from := r.OpenSession(c, d, 0x1000+i)
		relaytest.Frame(t, c, relaytest.ESP(0xc1000000+uint32(i), 1, 1400))
		relaytest.Recv(t, r.Backend)
		r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd1000000+uint32(i), 1, 1400), from)
		relaytest.ReadFrame(t, c, d)
	}
	time.Sleep(200 * time.Millisecond) // every backend reader back to waiting
	perSession := float64(inUse()-before) / n
	t.Logf("idle session: %.0f bytes (%d sessions)", perSession, n)
	if perConn > idleLimit || perSession > idleLimit {
		t.Fatalf("idle connection %.0f bytes, idle session %.0f bytes: want each under %d", perConn, perSession, idleLimit)
	}
	for _, c := range conns {
		c.Close()
	}
}
