package intercept

import (
	"net/netip"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConfigDefaults(t *testing.T) {
	mapped := netip.MustParseAddr("::ffff:203.0.113.2")
	cfg, err := Config{Peers: []netip.Addr{mapped, netip.MustParseAddr("203.0.113.2")}}.withDefaults(true)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Name != "iketcp0" || cfg.Table != 4500 || cfg.Mark != 0x4500 || cfg.Priority != 100 || cfg.Logger == nil {
		t.Errorf("defaults: %+v", cfg)
	}
	if len(cfg.Peers) != 1 || cfg.Peers[0] != netip.MustParseAddr("203.0.113.2") {
		t.Errorf("peers not unmapped and deduplicated: %v", cfg.Peers)
	}
}

func TestConfigErrors(t *testing.T) {
	peer := []netip.Addr{netip.MustParseAddr("203.0.113.2")}
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{}, "at least one IKE peer"},
		{Config{Peers: []netip.Addr{{}}}, "empty"},
		{Config{Peers: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}, "not a unicast address"},
		{Config{Peers: []netip.Addr{netip.MustParseAddr("fe80::1%eth0")}}, "scoped"},
		{Config{Peers: peer, Name: "a-name-too-long-for-linux"}, "1 to 15 characters"},
		{Config{Peers: peer, Name: "tun%d"}, "1 to 15 characters"},
		{Config{Peers: peer, Table: 254}, "main table"},
		{Config{Peers: peer, Table: 220}, "strongSwan"},
		{Config{Peers: peer, Table: -1}, "positive"},
		{Config{Peers: peer, Priority: 219}, "before strongSwan"},
		{Config{Peers: peer, Priority: -5}, "between 1 and 218"},
	} {
		_, err := c.cfg.withDefaults(true)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: got %v, want an error about %q", c.cfg, err, c.want)
		}
	}
	if _, err := (Config{}).withDefaults(false); err != nil {
		t.Errorf("clean-up needs no peers: %v", err)
	}
}
