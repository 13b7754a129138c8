package client

import (
	"testing"

	"github.com/iketcp/iketcp/framing"
)

func TestDaemonPortsDefaults(t *testing.T) {
	var p daemonPorts
	if got := p.load(); got != (portSet{ikeDaemon: 4500, ikePeer: 4500, espDaemon: 4500, espPeer: 4500}) {
		t.Fatalf("nothing seen: %+v", got)
	}
	p.note(framing.KindIKE, false, 500, 500)
	if got := p.load(); got.ikePeer != 500 || got.espPeer != 4500 || got.espDaemon != 4500 {
		t.Fatalf("IKE on 500: %+v", got)
	}
	p.note(framing.KindIKE, false, 4501, 4500) // a daemon whose NAT-T port is not 4500
	if got := p.load(); got.ikeDaemon != 4501 || got.espDaemon != 4501 || got.espPeer != 4500 {
		t.Fatalf("IKE on 4501->4500, no ESP yet: %+v", got)
	}
	p.note(framing.KindESP, false, 4502, 4500)
	if got := p.load(); got.espDaemon != 4502 || got.ikeDaemon != 4501 {
		t.Fatalf("ESP seen: %+v", got)
	}
	var q daemonPorts
	q.note(framing.KindESP, false, 4500, 4500) // flow first seen through ESP
	if got := q.load(); got.ikeDaemon != 4500 || got.ikePeer != 4500 {
		t.Fatalf("IKE ports after ESP only: %+v", got)
	}
}
