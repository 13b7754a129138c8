package intercept

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/iketcp/iketcp/nat"
	"github.com/iketcp/iketcp/nat/internal/setup"
	"github.com/iketcp/iketcp/nat/tun"
)

// modeTransparent is transparent mode, as its errors and log lines name
// it.
var modeTransparent = setup.Mode{Name: "transparent mode", NeedsNetAdmin: nat.ErrNeedsNetAdmin, NeedsLinux: nat.ErrNeedsLinux}

// Defaults of Config's zero fields.
const (
	DefaultName     = "iketcp0"
	DefaultTable    = 4500
	DefaultMark     = 0x4500
	DefaultPriority = 100
)

// Config configures Open. Zero values mean the defaults above.
type Config struct {
	// Peers are the IKE peers whose traffic is intercepted, IPv4 and/or
	// IPv6; at least one is required.
	Peers []netip.Addr
	// Name is the TUN device's name (default "iketcp0").
	Name string
	// Table is the routing table of intercepted traffic (default 4500). It
	// belongs to iketcp: whatever else is in it is removed as stale.
	Table int
	// Mark is the firewall mark that iketcp's own sockets carry (SetMark) to
	// bypass interception (default 0x4500).
	Mark uint32
	// Priority is the bypass rule's priority; the interception rules use
	// Priority+1 (default 100). Both must come before strongSwan's table 220
	// (priority 220), so at most 218.
	Priority int
	Logger   *slog.Logger
}

// strongSwanPriority is the priority of the rule strongSwan installs for its
// routing table 220.
const strongSwanPriority = 220

// Reserved routing tables that Table must not name: Open and Cleanup
// empty Table of everything they did not put there.
var reservedTables = map[int]string{
	220: "strongSwan's",
	253: "the default table",
	254: "the main table",
	255: "the local table",
}

// withDefaults returns c with defaults filled in and, if needPeers, its
// peers unmapped and deduplicated; or an error that says what to fix.
func (c Config) withDefaults(needPeers bool) (Config, error) {
	if c.Name == "" {
		c.Name = DefaultName
	}
	if c.Table == 0 {
		c.Table = DefaultTable
	}
	if c.Mark == 0 {
		c.Mark = DefaultMark
	}
	if c.Priority == 0 {
		c.Priority = DefaultPriority
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if err := tun.CheckName(c.Name); err != nil {
		return c, err
	}
	if c.Table < 0 {
		return c, fmt.Errorf("routing table %d: must be positive", c.Table)
	}
	if what, ok := reservedTables[c.Table]; ok {
		return c, fmt.Errorf("routing table %d is %s: pick a table of iketcp's own (default %d)", c.Table, what, DefaultTable)
	}
	// The interception rules use Priority+1, and must come before
	// strongSwan's rule (priority 220), or the daemon's own tunnel routes
	// could take the traffic first.
	if c.Priority < 1 || c.Priority+1 >= strongSwanPriority {
		return c, fmt.Errorf("rule priority %d: must be between 1 and %d, so that both rules come before strongSwan's (priority %d); default %d", c.Priority, strongSwanPriority-2, strongSwanPriority, DefaultPriority)
	}
	if !needPeers {
		return c, nil
	}
	if len(c.Peers) == 0 {
		return c, errors.New("transparent mode needs at least one IKE peer address to intercept")
	}
	peers := make([]netip.Addr, 0, len(c.Peers))
	seen := make(map[netip.Addr]bool, len(c.Peers))
	for _, p := range c.Peers {
		p = p.Unmap()
		switch {
		case !p.IsValid():
			return c, errors.New("peer address is empty")
		case p.Zone() != "":
			return c, fmt.Errorf("peer %s: a scoped (link-local) address cannot be routed by policy rules", p)
		case p.IsUnspecified() || p.IsLoopback() || p.IsMulticast():
			return c, fmt.Errorf("peer %s: not a unicast address of a remote host", p)
		}
		if !seen[p] {
			seen[p] = true
			peers = append(peers, p)
		}
	}
	c.Peers = peers
	return c, nil
}
