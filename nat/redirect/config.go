package redirect

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/iketcp/iketcp/nat"
	"github.com/iketcp/iketcp/nat/internal/setup"
)

// DefaultTable is the nftables table of a Config whose Name is empty.
const DefaultTable = "iketcp_redirect"

// maxName bounds Config.Name.
const maxName = 32

// Config configures Setup. Zero values mean the defaults, except for the
// ports, which a setup needs.
type Config struct {
	// From is the TCP port that clients connect to (FortiOS's
	// ike-tcp-port), 443 say.
	From uint16
	// To is the TCP port that iketcp listens on and that connections to
	// From go to, 11443 for FortiOS's clients.
	To uint16
	// Name tells instances apart: the table is "iketcp_redirect_" followed
	// by it, or "iketcp_redirect" without it. Letters, digits, '_' and '-',
	// up to 32 of them. One Name serves one running Redirect at a time in
	// a network namespace.
	Name   string
	Logger *slog.Logger
}

// Table is the name of cfg's nftables table (family inet).
func (c Config) Table() string {
	if c.Name == "" {
		return DefaultTable
	}
	return DefaultTable + "_" + c.Name
}

// withDefaults returns c with defaults filled in, checked for a setup if
// forSetup; a clean-up needs only the Name.
func (c Config) withDefaults(forSetup bool) (Config, error) {
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if err := checkName(c.Name); err != nil {
		return c, err
	}
	if !forSetup {
		return c, nil
	}
	switch {
	case c.From == 0:
		return c, errors.New("port redirect: From is 0: give the TCP port that clients connect to (the ike-tcp-port), like 443")
	case c.To == 0:
		return c, errors.New("port redirect: To is 0: give the TCP port that iketcp listens on, like 11443")
	case c.From == c.To:
		return c, fmt.Errorf("port redirect: From and To are both %d: a port needs no redirect to itself; leave the redirect off (--redirect none)", c.From)
	}
	return c, nil
}

// checkName accepts a Name that makes a table name nft prints as it is.
func checkName(name string) error {
	if len(name) > maxName {
		return fmt.Errorf("port redirect: Name %q is longer than %d characters", name, maxName)
	}
	for _, r := range name {
		if !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || r == '_' || r == '-') {
			return fmt.Errorf("port redirect: Name %q: use only letters, digits, '_' and '-'", name)
		}
	}
	return nil
}

// ErrInUse: a Redirect of the same Name runs in the network namespace, in
// this process or another; Setup and Cleanup leave its table alone.
var ErrInUse = errors.New("port redirect: a running iketcp owns the table")

// The port redirect's errors for a missing CAP_NET_ADMIN and a missing
// Linux: their own text, and errors.Is matches nat's.
var (
	errNeedsNetAdmin = &modeError{"port redirect needs CAP_NET_ADMIN to install its nftables table (run as root, or grant it: setcap cap_net_admin+ep iketcp; or use --redirect none and map the port to iketcp's on the platform)", nat.ErrNeedsNetAdmin}
	errNeedsLinux    = &modeError{"port redirect needs Linux (nftables); on this system use --redirect none and map the port to iketcp's on the platform", nat.ErrNeedsLinux}
)

// modePortRedirect is the port redirect, as its errors and log lines name
// it.
var modePortRedirect = setup.Mode{Name: "port redirect", NeedsNetAdmin: errNeedsNetAdmin, NeedsLinux: errNeedsLinux}

// modeError is a sentinel error of the port redirect: its own text, and
// errors.Is matches nat's shared sentinel.
type modeError struct {
	msg string
	is  error
}

func (e *modeError) Error() string        { return e.msg }
func (e *modeError) Is(target error) bool { return target == e.is }
