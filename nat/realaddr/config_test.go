package realaddr

import (
	"net/netip"
	"strings"
	"testing"
)

func TestConfigDefaults(t *testing.T) {
	cfg, err := Config{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Mark != 0x4501 || cfg.Table != 4501 || cfg.Priority != 99 || cfg.Logger == nil || cfg.tableName() != "iketcp_realaddr" {
		t.Errorf("defaults: %+v, table %s", cfg, cfg.tableName())
	}
	if name := (Config{Name: "hub-2"}).tableName(); name != "iketcp_realaddr_hub-2" {
		t.Errorf("table name %s", name)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Table: 254}, "main table"},
		{Config{Table: 255}, "local table"},
		{Config{Table: 220}, "strongSwan"},
		{Config{Table: -1}, "positive"},
		{Config{Priority: 220}, "before strongSwan's (priority 220)"},
		{Config{Priority: -5}, "between 1 and 219"},
		{Config{Name: "a b"}, "letters, digits"},
		{Config{Name: strings.Repeat("x", 33)}, "at most 32"},
	} {
		_, err := c.cfg.withDefaults()
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "real-address mode: ") {
			t.Errorf("%+v: got %v, want an error of real-address mode about %q", c.cfg, err, c.want)
		}
	}
}

func TestCheckAddrs(t *testing.T) {
	ap := netip.MustParseAddrPort
	a := netip.MustParseAddr
	client, backend, err := checkAddrs(a("::ffff:198.51.100.7"), ap("[::ffff:192.0.2.1]:4500"))
	if err != nil || client != a("198.51.100.7") || backend != ap("192.0.2.1:4500") {
		t.Errorf("mapped addresses: %v %v %v", client, backend, err)
	}
	if _, _, err := checkAddrs(a("2001:db8::7"), ap("[2001:db8::1]:4500")); err != nil {
		t.Errorf("IPv6: %v", err)
	}
	for _, c := range []struct {
		client  netip.Addr
		backend netip.AddrPort
		want    string
	}{
		{netip.Addr{}, ap("192.0.2.1:4500"), "no client address"},
		{a("fe80::1%eth0"), ap("[2001:db8::1]:4500"), "scoped"},
		{a("0.0.0.0"), ap("192.0.2.1:4500"), "not a unicast address"},
		{a("224.0.0.1"), ap("192.0.2.1:4500"), "not a unicast address"},
		{a("255.255.255.255"), ap("192.0.2.1:4500"), "not a unicast address"},
		{a("198.51.100.7"), netip.AddrPort{}, "give the IKE daemon's address and port"},
		{a("198.51.100.7"), ap("192.0.2.1:0"), "give the IKE daemon's address and port"},
		{a("198.51.100.7"), ap("0.0.0.0:4500"), "one of this host's own unicast addresses"},
		{a("198.51.100.7"), ap("127.0.0.1:4500"), "is a loopback address"},
		{a("2001:db8::7"), ap("[::1]:4500"), "is a loopback address"},
		{a("198.51.100.7"), ap("[2001:db8::1]:4500"), "different IP families"},
		{a("2001:db8::7"), ap("192.0.2.1:4500"), "different IP families"},
	} {
		_, _, err := checkAddrs(c.client, c.backend)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("client %v, backend %v: got %v, want an error about %q", c.client, c.backend, err, c.want)
		}
	}
}
