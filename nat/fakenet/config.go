package fakenet

import (
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/iketcp/iketcp/nat"
	"github.com/iketcp/iketcp/nat/internal/setup"
	"github.com/iketcp/iketcp/nat/tun"
)

// Role says which end of a fake-TCP connection a Net serves.
type Role uint8

const (
	// Client: the endpoint opens connections, and the kernel masquerades
	// them as its own on the way out.
	Client Role = iota
	// Server: the kernel hands the endpoint the connections that arrive
	// for a TCP port of its own addresses.
	Server
)

func (r Role) String() string {
	switch r {
	case Client:
		return "client"
	case Server:
		return "server"
	}
	return fmt.Sprintf("Role(%d)", uint8(r))
}

// DefaultName is the default of Config.Name.
const DefaultName = "iketcpft0"

// defaultNet4 is the default IPv4 subnet of fake-TCP mode's TUN
// device: the last /30 of the shared address space of RFC 6598, which
// carriers use between their NAT and their customers, and which a host's
// own networks rarely reach to the end of. The kernel's side is
// 100.127.255.253, the endpoint 100.127.255.254.
var defaultNet4 = netip.MustParsePrefix("100.127.255.252/30")

// Config configures Setup. Zero values mean the defaults.
type Config struct {
	Role Role
	// Name is the TUN device's name (default "iketcpft0"); the nftables
	// table is "iketcp_faketcp_" followed by it. One Name serves one Net
	// at a time in a network namespace.
	Name string
	// Net4 is the TUN device's IPv4 subnet, a /30 that no other network of
	// the host uses: the kernel's side gets its first host address, the
	// userspace endpoint the second (default 100.127.255.252/30: kernel
	// .253, endpoint .254).
	Net4 netip.Prefix
	// Net6 is the TUN device's IPv6 subnet, a /126, used the same way; the
	// zero Prefix (the default) means IPv4 only.
	Net6 netip.Prefix
	// Port, for a server, is the TCP port whose incoming connections to
	// the host's own addresses go to the endpoint, at the same port. A
	// server needs one; a client has none (its TCP stack picks its source
	// ports), so a client's Port must be 0.
	Port uint16
	// Mark, if not 0, is the firewall mark that the kernel gives the
	// packets it forwards from the endpoint, before it routes them: policy
	// rules can route them by it (transparent mode's bypass rule, say).
	Mark uint32
	// Sources, for a client, give blocks of the endpoint's source ports an
	// address of the host's own to leave with, instead of the one the
	// masquerade picks (the outgoing device's): an aggregate member's
	// uplink address. The kernel still routes them by destination (see
	// Source). The blocks must not overlap; a port outside them is
	// masqueraded.
	Sources []Source
	// NoOffload keeps the TUN device from handing TCP segmentation and
	// checksums to the kernel (see the package documentation): each
	// segment then takes a system call and a walk through the kernel's
	// network stack of its own, as where the kernel refuses the offloads.
	NoOffload bool
	Logger    *slog.Logger
}

// Source is a block of a client endpoint's source ports, FirstPort to
// LastPort, whose connections leave with Addr as their source address:
// the table SNATs them to Addr where it would masquerade them. The kernel
// routes what the endpoint writes by its destination, before the SNAT,
// so a connection chooses its source address, not its uplink: it leaves
// by the device the route to its destination names, and policy rules
// that select by source address do not see Addr (unlike a socket bound to
// Addr, whose packets they route). Addr should be an address of the host
// (Setup warns otherwise: the replies would go elsewhere) on the device
// that reaches the destination, or the network beyond may drop what
// leaves with a source it does not expect there.
type Source struct {
	Addr                netip.Addr
	FirstPort, LastPort uint16
}

func (s Source) String() string {
	return fmt.Sprintf("%s ports %d-%d", s.Addr, s.FirstPort, s.LastPort)
}

// checkSources says what is wrong with a client's sources: each an
// address of a family the device carries, a block of ports from 1, no two
// blocks overlapping.
func (c Config) checkSources() error {
	if len(c.Sources) > 0 && c.Role != Client {
		return fmt.Errorf("fake-TCP mode: Sources are a client's; a server's connections keep the host's address they came to")
	}
	for i, s := range c.Sources {
		switch {
		case !s.Addr.IsValid() || s.Addr.IsUnspecified() || s.Addr.IsMulticast() || s.Addr.Zone() != "" || s.Addr.Is4In6():
			return fmt.Errorf("fake-TCP mode: source %v: want a unicast address of the host's (leave out a connection that the masquerade may send from the outgoing device's address)", s.Addr)
		case s.Addr.Is6() && !c.Net6.IsValid():
			return fmt.Errorf("fake-TCP mode: source %s is IPv6, but the device has no IPv6 subnet (Net6)", s.Addr)
		case s.FirstPort == 0 || s.FirstPort > s.LastPort:
			return fmt.Errorf("fake-TCP mode: source %s: ports %d-%d, want a block from 1 to 65535, first to last", s.Addr, s.FirstPort, s.LastPort)
		}
		for _, o := range c.Sources[:i] {
			if s.FirstPort <= o.LastPort && o.FirstPort <= s.LastPort {
				return fmt.Errorf("fake-TCP mode: sources %v and %v: their port blocks overlap", o, s)
			}
		}
	}
	return nil
}

// withDefaults returns c with defaults filled in, checked for a setup if
// forSetup; a clean-up needs only the Name.
func (c Config) withDefaults(forSetup bool) (Config, error) {
	if c.Name == "" {
		c.Name = DefaultName
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if err := tun.CheckName(c.Name); err != nil {
		return c, err
	}
	if !forSetup {
		return c, nil
	}
	switch c.Role {
	case Client:
		if c.Port != 0 {
			return c, fmt.Errorf("fake-TCP mode: a client has no listening port, but Port is %d: leave it 0, or set Role to Server", c.Port)
		}
	case Server:
		if c.Port == 0 {
			return c, fmt.Errorf("fake-TCP mode: a server needs the TCP port its connections arrive at (Port)")
		}
	default:
		return c, fmt.Errorf("fake-TCP mode: unknown role %d: want Client or Server", c.Role)
	}
	if !c.Net4.IsValid() {
		c.Net4 = defaultNet4
	}
	if err := checkSubnet(c.Net4, false); err != nil {
		return c, err
	}
	if c.Net6.IsValid() {
		if err := checkSubnet(c.Net6, true); err != nil {
			return c, err
		}
	}
	if err := c.checkSources(); err != nil {
		return c, err
	}
	return c, nil
}

// checkSubnet accepts an IPv4 /30 (v6 false) or an IPv6 /126 whose two
// host addresses can be routed.
func checkSubnet(p netip.Prefix, v6 bool) error {
	want, bits, field, example := "IPv4", 30, "Net4", defaultNet4.String()
	if v6 {
		want, bits, field, example = "IPv6", 126, "Net6", "2001:db8:ffff::/126 (from a prefix of the host's own)"
	}
	a := p.Addr()
	switch {
	case a.Is4In6() || a.Is6() != v6 || p.Bits() != bits:
		return fmt.Errorf("fake-TCP mode: %s %s: give an %s /%d, like %s", field, p, want, bits, example)
	case p.Masked() != p:
		return fmt.Errorf("fake-TCP mode: %s %s: host bits are set; the subnet is %s", field, p, p.Masked())
	case a.Zone() != "" || a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() || a.IsUnspecified():
		return fmt.Errorf("fake-TCP mode: %s %s: its addresses must be routable unicast (not loopback, link-local or multicast), like %s", field, p, example)
	}
	return nil
}

// Fake-TCP mode's errors for a missing CAP_NET_ADMIN and a missing Linux:
// their own text, and errors.Is matches nat's.
var (
	errNeedsNetAdmin = &modeError{"fake-TCP mode needs CAP_NET_ADMIN (run as root, or grant it: setcap cap_net_admin+ep iketcp)", nat.ErrNeedsNetAdmin}
	errNeedsLinux    = &modeError{"fake-TCP mode needs Linux (TUN device, IP forwarding and nftables NAT); on this system use the TCP transport", nat.ErrNeedsLinux}
)

// modeFakeTCP is fake-TCP mode, as its errors and log lines name it.
var modeFakeTCP = setup.Mode{Name: "fake-TCP mode", NeedsNetAdmin: errNeedsNetAdmin, NeedsLinux: errNeedsLinux}

// modeError is a sentinel error of fake-TCP mode: its own text, and
// errors.Is matches nat's shared sentinel.
type modeError struct {
	msg string
	is  error
}

func (e *modeError) Error() string        { return e.msg }
func (e *modeError) Is(target error) bool { return target == e.is }
