package fakenet

import (
	"net/netip"
	"strings"
	"testing"
)

func TestConfigDefaults(t *testing.T) {
	cfg, err := Config{}.withDefaults(true)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Name != "iketcpft0" || cfg.Net4 != netip.MustParsePrefix("100.127.255.252/30") || cfg.Net6.IsValid() || cfg.Logger == nil {
		t.Errorf("defaults: %+v", cfg)
	}
	if Client.String() != "client" || Server.String() != "server" || Role(7).String() != "Role(7)" {
		t.Errorf("role names: %s %s %s", Client, Server, Role(7))
	}
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Role: Server}, "needs the TCP port"},
		{Config{Port: 4500}, "a client has no listening port, but Port is 4500"},
		{Config{Role: 2}, "unknown role 2"},
		{Config{Name: "a-name-too-long-for-linux"}, "1 to 15 characters"},
		{Config{Net4: netip.MustParsePrefix("100.64.0.0/29")}, "give an IPv4 /30"},
		{Config{Net4: netip.MustParsePrefix("2001:db8::/126")}, "give an IPv4 /30"},
		{Config{Net4: netip.MustParsePrefix("::ffff:100.64.0.0/126")}, "give an IPv4 /30"},
		{Config{Net4: netip.MustParsePrefix("100.64.0.1/30")}, "host bits are set; the subnet is 100.64.0.0/30"},
		{Config{Net4: netip.MustParsePrefix("127.0.0.0/30")}, "routable unicast"},
		{Config{Net4: netip.MustParsePrefix("169.254.0.0/30")}, "routable unicast"},
		{Config{Net6: netip.MustParsePrefix("2001:db8::/64")}, "give an IPv6 /126"},
		{Config{Net6: netip.MustParsePrefix("100.64.0.0/30")}, "give an IPv6 /126"},
		{Config{Net6: netip.MustParsePrefix("fe80::/126")}, "routable unicast"},
		{Config{Net6: netip.MustParsePrefix("2001:db8::1/126")}, "host bits are set"},
		{Config{Role: Server, Port: 4500, Sources: []Source{{netip.MustParseAddr("192.0.2.1"), 1, 2}}}, "Sources are a client's"},
		{Config{Sources: []Source{{netip.IPv4Unspecified(), 1, 2}}}, "want a unicast address"},
		{Config{Sources: []Source{{netip.Addr{}, 1, 2}}}, "want a unicast address"},
		{Config{Sources: []Source{{netip.MustParseAddr("2001:db8::1"), 1, 2}}}, "no IPv6 subnet"},
		{Config{Sources: []Source{{netip.MustParseAddr("192.0.2.1"), 0, 2}}}, "ports 0-2"},
		{Config{Sources: []Source{{netip.MustParseAddr("192.0.2.1"), 9, 8}}}, "ports 9-8"},
		{Config{Sources: []Source{{netip.MustParseAddr("192.0.2.1"), 100, 199}, {netip.MustParseAddr("192.0.2.2"), 199, 300}}}, "overlap"},
	} {
		_, err := c.cfg.withDefaults(true)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "fake-TCP mode") && !strings.Contains(c.want, "15 characters") {
			t.Errorf("%+v: got %v, want an error about %q", c.cfg, err, c.want)
		}
	}
	ok := Config{Net6: netip.MustParsePrefix("2001:db8:1::/126"), Sources: []Source{
		{netip.MustParseAddr("192.0.2.1"), 100, 199}, {netip.MustParseAddr("192.0.2.2"), 200, 200}, {netip.MustParseAddr("2001:db8::1"), 201, 300}}}
	if _, err := ok.withDefaults(true); err != nil {
		t.Errorf("sources: %v", err)
	}
	// A clean-up needs only the name.
	if _, err := (Config{Role: Server}).withDefaults(false); err != nil {
		t.Errorf("clean-up: %v", err)
	}
}
