package server_test

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
)

// TestObserve: the server answers `iketcp probe`'s Observe with the
// address and port the connection came from, once per connection; a
// second Observe on it is garbage; over the server-wide rate, askers get
// no answer and are counted; a victim session's traffic is untouched.
func TestObserve(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	v := relaytest.StartVictim(r)
	observe := func(nonce uint64) []byte {
		return framing.AppendControl(nil, framing.ControlObserve, binary.BigEndian.AppendUint64(nil, nonce))
	}

	c := r.RawConn(true)
	d := framing.NewDecoder(c, framing.MinBufferSize, false)
	relaytest.Frame(t, c, observe(42))
	var m framing.Message
	if err := m.Decode(relaytest.ReadFrame(t, c, d)); err != nil || m.Kind != framing.KindControl {
		t.Fatalf("answer: %v kind %v", err, m.Kind)
	}
	nonce, addr, port, ok := m.Control.ObservedAddr()
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	if !ok || nonce != 42 || netip.AddrPortFrom(netip.AddrFrom16(addr).Unmap(), port) != local {
		t.Fatalf("observed %v nonce %d %v:%d, want nonce 42 and %v", ok, nonce, netip.AddrFrom16(addr).Unmap(), port, local)
	}
	relaytest.Frame(t, c, observe(43))
	relaytest.ExpectNoFrame(t, c, "a second Observe on the same connection")

	// Spend the server-wide budget: every answer counts, including the
	// one above; beyond the burst (and what the rate refills meanwhile),
	// askers get nothing.
	answered, refused := 1, 0
	for i := range server.ObserveBurst + 10 {
		c := r.RawConn(true)
		d := framing.NewDecoder(c, framing.MinBufferSize, false)
		relaytest.Frame(t, c, observe(uint64(i)))
		c.SetReadDeadline(timeSoon())
		if _, err := d.Next(); err == nil {
			answered++
		} else {
			refused++
		}
		c.Close()
	}
	if refused == 0 {
		t.Fatalf("%d answers in a burst of %d, want at most %d and some refused", answered, server.ObserveBurst+11, server.ObserveBurst)
	}
	counters := r.Srv.Counters()
	if got := counters.ObservesAnswered.Load(); got != uint64(answered) {
		t.Errorf("observes_answered %d, want %d", got, answered)
	}
	if got := counters.ObservesRefused.Load(); got != uint64(refused) {
		t.Errorf("observes_refused %d, want %d", got, refused)
	}
	v.CheckReturnPath(t, 20)
	v.Finish(t)
}

// timeSoon is the deadline for an answer that comes at once or never.
func timeSoon() time.Time { return time.Now().Add(200 * time.Millisecond) }
