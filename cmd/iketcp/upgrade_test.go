package main

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/relay/fakelink"
	"github.com/iketcp/iketcp/relay/server"
)

// TestHandoverFormat: stream connections keep their files in order, and
// fake-TCP ones go as state, with none; a hand-over's fake-TCP state
// becomes the stack's, in order, and one that does not decode fails the
// take-over rather than resuming something else.
func TestHandoverFormat(t *testing.T) {
	cs := faketcp.ConnState{Remote: netip.MustParseAddrPort("192.0.2.9:40000"), LocalPort: 4500, PeerMSS: 1460,
		Opened: time.Now(), LastHeard: time.Now()}
	raw, err := json.Marshal(cs)
	if err != nil {
		t.Fatal(err)
	}
	h := &server.Handover{Conns: []server.HandoverConn{
		{Remote: "198.51.100.1:1"},
		{Remote: "192.0.2.9:40000", Encap: fakelink.Encap, State: raw},
		{Remote: "198.51.100.1:2"},
	}}
	if n := h.Files(); n != 2 {
		t.Fatalf("Files: %d, want 2", n)
	}
	payload, err := json.Marshal(upgradePayload{Server: h, FakeTCP: &faketcp.StackState{CookieKey: make([]byte, 32), Listeners: []uint16{4500}}})
	if err != nil {
		t.Fatal(err)
	}
	var p upgradePayload
	if err := json.Unmarshal(payload, &p); err != nil {
		t.Fatal(err)
	}
	in := &inherited{fake: p.FakeTCP, server: p.Server}
	st, index, err := in.fakeState()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Conns) != 1 || len(index) != 1 || index[0] != 1 || st.Conns[0].Remote != cs.Remote || st.Listeners[0] != 4500 {
		t.Fatalf("fake state %+v, index %v", st, index)
	}
	p.Server.Conns[1].State = json.RawMessage(`{"remote": 7}`)
	if _, _, err := in.fakeState(); err == nil || !strings.Contains(err.Error(), "192.0.2.9:40000") {
		t.Fatalf("a corrupt conn state: %v", err)
	}
}
