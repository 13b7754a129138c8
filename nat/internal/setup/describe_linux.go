package setup

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ListRules lists the policy rules of a family, retrying a dump that
// changes under it.
func ListRules(h *netlink.Handle, fam int) ([]netlink.Rule, error) {
	var err error
	for range 5 {
		var rules []netlink.Rule
		if rules, err = h.RuleList(fam); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return rules, err
		}
	}
	return nil, err
}

// ListRoutes lists the routes of a family in table, retrying a dump that
// changes under it.
func ListRoutes(h *netlink.Handle, fam, table int) ([]netlink.Route, error) {
	var err error
	for range 5 {
		var routes []netlink.Route
		routes, err = h.RouteListFiltered(fam, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return routes, err
		}
	}
	return nil, err
}

// DescribeRule says a rule the way `ip rule` would, for logs and errors.
func DescribeRule(r netlink.Rule) string {
	s := fmt.Sprintf("rule %d:", r.Priority)
	if r.Family == netlink.FAMILY_V6 {
		s = "IPv6 " + s
	}
	if r.Mark != 0 || r.Mask != nil {
		s += fmt.Sprintf(" fwmark %#x", r.Mark)
		if r.Mask != nil && *r.Mask != 0xffffffff {
			s += fmt.Sprintf("/%#x", *r.Mask)
		}
	}
	if r.Dst != nil {
		s += " to " + r.Dst.String()
	}
	switch r.IPProto {
	case 0:
	case unix.IPPROTO_UDP:
		s += " ipproto udp"
	case unix.IPPROTO_ESP:
		s += " ipproto esp"
	default:
		s += fmt.Sprintf(" ipproto %d", r.IPProto)
	}
	if r.Dport != nil {
		s += fmt.Sprintf(" dport %d", r.Dport.Start)
		if r.Dport.End != r.Dport.Start {
			s += fmt.Sprintf("-%d", r.Dport.End)
		}
	}
	switch r.Table {
	case unix.RT_TABLE_MAIN:
		return s + " lookup main"
	case unix.RT_TABLE_LOCAL:
		return s + " lookup local"
	}
	return s + fmt.Sprintf(" lookup %d", r.Table)
}

// DescribeRoute says a route the way `ip route` would, roughly; dev names
// its device, or is empty (then "lo" for the first device of a namespace,
// else its index).
func DescribeRoute(r netlink.Route, dev string) string {
	dst := "default"
	if r.Dst != nil {
		if ones, _ := r.Dst.Mask.Size(); ones != 0 {
			dst = r.Dst.String()
		}
	}
	fam := ""
	if r.Family == netlink.FAMILY_V6 || (r.Dst != nil && r.Dst.IP.To4() == nil) {
		fam = "IPv6 "
	}
	typ := ""
	if r.Type == unix.RTN_LOCAL {
		typ = "local "
	}
	switch {
	case dev != "":
	case r.LinkIndex == 1:
		dev = "lo"
	default:
		dev = fmt.Sprintf("#%d", r.LinkIndex)
	}
	return fmt.Sprintf("%sroute %s%s dev %s table %d", fam, typ, dst, dev, r.Table)
}
