package realaddr

import (
	"fmt"
	"log/slog"

	"github.com/iketcp/iketcp/nat"
	"github.com/iketcp/iketcp/nat/internal/setup"
)

// Defaults of Config's zero fields.
const (
	DefaultMark     = 0x4501
	DefaultTable    = 4501
	DefaultPriority = 99
)

// tablePrefix is the name of the nftables table (family inet); a Name
// follows it after an underscore.
const tablePrefix = "iketcp_realaddr"

// strongSwanPriority is the priority of the rule strongSwan installs for
// its routing table 220.
const strongSwanPriority = 220

// Reserved routing tables that Table must not name: Setup and Cleanup
// empty Table of everything they did not put there.
var reservedTables = map[int]string{
	220: "strongSwan's",
	253: "the default table",
	254: "the main table",
	255: "the local table",
}

// Config configures Setup. Zero values mean the defaults above.
type Config struct {
	// Mark is the firewall mark that the nftables table gives the
	// daemon's datagrams to the sessions' sockets, and that the policy
	// rule sends to Table (default 0x4501). No other policy rule may
	// select it.
	Mark uint32
	// Table is the routing table that holds the local default routes
	// (default 4501). It belongs to iketcp: whatever else is in it, and
	// every rule that leads to it, is removed as stale.
	Table int
	// Priority is the policy rule's priority (default 99): from 1 to 219,
	// before strongSwan's rule (220), whose routes must not take the
	// daemon's datagrams to the sessions first.
	Priority int
	// Name, if set, ends the nftables table's name:
	// "iketcp_realaddr_"+Name; the default table is "iketcp_realaddr".
	// Letters, digits, '-' and '_', at most 32.
	Name   string
	Logger *slog.Logger
}

// withDefaults returns c with defaults filled in, or an error that says
// what to fix.
func (c Config) withDefaults() (Config, error) {
	if c.Mark == 0 {
		c.Mark = DefaultMark
	}
	if c.Table == 0 {
		c.Table = DefaultTable
	}
	if c.Priority == 0 {
		c.Priority = DefaultPriority
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Table < 0 {
		return c, fmt.Errorf("real-address mode: routing table %d: must be positive", c.Table)
	}
	if what, ok := reservedTables[c.Table]; ok {
		return c, fmt.Errorf("real-address mode: routing table %d is %s: pick a table of iketcp's own (default %d)", c.Table, what, DefaultTable)
	}
	if c.Priority < 1 || c.Priority >= strongSwanPriority {
		return c, fmt.Errorf("real-address mode: rule priority %d: must be between 1 and %d, so that the rule comes before strongSwan's (priority %d); default %d", c.Priority, strongSwanPriority-1, strongSwanPriority, DefaultPriority)
	}
	if err := checkName(c.Name); err != nil {
		return c, err
	}
	return c, nil
}

// checkName accepts an empty name, or up to 32 letters, digits, '-' and
// '_'.
func checkName(name string) error {
	ok := len(name) <= 32
	for _, r := range name {
		ok = ok && (r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_')
	}
	if !ok {
		return fmt.Errorf("real-address mode: name %q: use at most 32 letters, digits, '-' and '_'", name)
	}
	return nil
}

// tableName is the nftables table's name for cfg.
func (c Config) tableName() string {
	if c.Name == "" {
		return tablePrefix
	}
	return tablePrefix + "_" + c.Name
}

// Real-address mode's errors for a missing CAP_NET_ADMIN and a missing
// Linux: their own text, and errors.Is matches nat's.
var (
	errNeedsNetAdmin = &modeError{"real-address mode needs CAP_NET_ADMIN (run as root, or grant it: setcap cap_net_admin+ep iketcp)", nat.ErrNeedsNetAdmin}
	errNeedsLinux    = &modeError{"real-address mode needs Linux (transparent sockets, policy routing and nftables); on this system the backend sees the server's own address", nat.ErrNeedsLinux}
)

// modeRealAddr is real-address mode, as its errors and log lines name it.
var modeRealAddr = setup.Mode{Name: "real-address mode", NeedsNetAdmin: errNeedsNetAdmin, NeedsLinux: errNeedsLinux}

// modeError is a sentinel error of real-address mode: its own text, and
// errors.Is matches nat's shared sentinel.
type modeError struct {
	msg string
	is  error
}

func (e *modeError) Error() string        { return e.msg }
func (e *modeError) Is(target error) bool { return target == e.is }
