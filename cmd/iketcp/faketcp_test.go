package main

import (
	"net/netip"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/nat/fakenet"
	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/fakelink"
)

// TestFakeTCPMembers: each fake-TCP member gets a block of the stack's
// ephemeral ports of its own, the blocks apart, and a source for the
// kernel's NAT with its LOCAL address, but for an unspecified LOCAL,
// which keeps the masquerade.
func TestFakeTCPMembers(t *testing.T) {
	app := newApp()
	var cfg client.Config
	var dialers []*fakelink.Dialer
	var sources []fakenet.Source
	for _, cmd := range app.Commands {
		if cmd.Name == "client" {
			cmd.Action = func(c *cli.Context) error {
				var err error
				dialers, sources, err = fakeTCPMembers(c, &cfg)
				return err
			}
		}
	}
	if err := app.Run([]string{"iketcp", "client", "--encap", "fake-tcp", "--location-id", "1.1.1.1",
		"--member", "wan1=100.64.0.2->203.0.113.2:4500",
		"--member", "wan2=100.64.1.2->100.64.2.2:4500",
		"--member", "any=0.0.0.0->203.0.113.2:4500"}); err != nil {
		t.Fatal(err)
	}
	if len(cfg.Members) != 3 || len(dialers) != 3 || cfg.LocationID != [4]byte{1, 1, 1, 1} {
		t.Fatalf("members %+v, dialers %d", cfg.Members, len(dialers))
	}
	want := []fakenet.Source{
		{Addr: netip.MustParseAddr("100.64.0.2"), FirstPort: 32768, LastPort: 32768 + 9410 - 1},
		{Addr: netip.MustParseAddr("100.64.1.2"), FirstPort: 32768 + 9410, LastPort: 32768 + 2*9410 - 1},
	}
	if len(sources) != 2 || sources[0] != want[0] || sources[1] != want[1] {
		t.Fatalf("sources %v, want %v", sources, want)
	}
	for i, d := range dialers {
		if cfg.Members[i].Dialer != d || d.Stack != nil {
			t.Errorf("member %d: dialer %p, want %p without a stack yet", i, cfg.Members[i].Dialer, d)
		}
		if !d.Ports.Valid() || d.Ports.First < faketcp.EphemeralPorts.First || d.Ports.Last > faketcp.EphemeralPorts.Last {
			t.Errorf("member %d: ports %v, want a block of %v", i, d.Ports, faketcp.EphemeralPorts)
		}
		if i > 0 && d.Ports.First <= dialers[i-1].Ports.Last {
			t.Errorf("member %d: ports %v overlap %v", i, d.Ports, dialers[i-1].Ports)
		}
		if i < 2 && (d.Source != sources[i].Addr || d.Ports.First != sources[i].FirstPort || d.Ports.Last != sources[i].LastPort) {
			t.Errorf("member %d: source %v ports %v, want %v", i, d.Source, d.Ports, sources[i])
		}
	}
	if dialers[2].Source.IsValid() {
		t.Errorf("an unspecified LOCAL has the source %v: want the masquerade", dialers[2].Source)
	}
	// Whatever the count, the blocks stay inside the range, apart.
	for n := 1; n <= 16; n++ {
		last := memberPorts(n-1, n)
		if memberPorts(0, n).First != faketcp.EphemeralPorts.First || last.Last > faketcp.EphemeralPorts.Last || last.Len() != faketcp.EphemeralPorts.Len()/n {
			t.Errorf("%d members: first block %v, last %v", n, memberPorts(0, n), last)
		}
	}
}
