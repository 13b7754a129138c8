package lab

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"time"
)

// Addresses of the second carrier (Options.TwoCarriers): a path of its
// own between a second uplink of the site's and a second address of the
// hub's, for aggregates.
const (
	SiteOuter2   = "100.64.1.2" // site's second uplink address, on s1
	Carrier2Site = "100.64.1.1" // second carrier toward the site
	Carrier2Hub  = "100.64.2.1" // second carrier toward the hub; masqueraded to it
	HubOuter2    = "100.64.2.2" // hub's address on h1, reached through the second carrier

	SiteOuter2Net = "100.64.1.0/24"
	HubOuter2Net  = "100.64.2.0/24"

	SiteIface2 = "s1" // in site, toward the second carrier
	HubIface2  = "h1" // in hub, toward the second carrier
)

// cutTable is an nftables table of each carrier's own, apart from
// CarrierTable, that drops every forwarded packet both ways while its set
// holds the carrier's interfaces: a path that fails without a word.
const cutTable = "iketcp_lab_cut"

const cutRuleset = `table inet iketcp_lab_cut {
	counter cut_dropped {}
	set cut {
		type ifname
	}
	chain forward {
		type filter hook forward priority filter - 10; policy accept;
		iifname @cut counter name cut_dropped drop
	}
}
`

// buildSecondCarrier adds the second carrier namespace and its links:
// site s1 -- carrier2 c-site | c-hub -- hub h1, with the same NAT and
// counters as the first (CarrierTable), and the cut table on both.
func (l *Lab) buildSecondCarrier(ctx context.Context, ip func(ns *Namespace, args ...string) error) error {
	ns := &Namespace{Name: l.Name + "-carrier2", Role: "carrier2", lab: l}
	l.createdNS = append(l.createdNS, ns)
	if _, err := l.run(ctx, l.ipPath, "netns", "add", ns.Name); err != nil {
		return fmt.Errorf("create namespace: %w", err)
	}
	l.Carrier2 = ns
	if _, err := ns.Run(ctx, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 && echo 1 > /proc/sys/net/ipv4/ip_forward"); err != nil {
		return fmt.Errorf("set up %s: %w", ns.Name, err)
	}
	steps := []struct {
		ns   *Namespace
		args []string
	}{
		{ns, []string{"link", "add", CarrierSiteIface, "type", "veth", "peer", "name", SiteIface2, "netns", l.Site.Name}},
		{ns, []string{"link", "add", CarrierHubIface, "type", "veth", "peer", "name", HubIface2, "netns", l.Hub.Name}},
		{l.Site, []string{"addr", "add", SiteOuter2 + "/24", "dev", SiteIface2}},
		{ns, []string{"addr", "add", Carrier2Site + "/24", "dev", CarrierSiteIface}},
		{ns, []string{"addr", "add", Carrier2Hub + "/24", "dev", CarrierHubIface}},
		{l.Hub, []string{"addr", "add", HubOuter2 + "/24", "dev", HubIface2}},
		{l.Site, []string{"link", "set", SiteIface2, "up"}},
		{ns, []string{"link", "set", "lo", "up"}},
		{ns, []string{"link", "set", CarrierSiteIface, "up"}},
		{ns, []string{"link", "set", CarrierHubIface, "up"}},
		{l.Hub, []string{"link", "set", HubIface2, "up"}},
		{l.Site, []string{"route", "add", HubOuter2Net, "via", Carrier2Site, "dev", SiteIface2}},
	}
	for _, s := range steps {
		if err := ip(s.ns, s.args...); err != nil {
			return err
		}
	}
	for _, c := range []*Namespace{l.Carrier, ns} {
		if err := l.loadRuleset(ctx, c, "cut-nftables", cutRuleset); err != nil {
			return err
		}
	}
	return l.loadRuleset(ctx, ns, "carrier2-nftables", carrierRuleset)
}

// loadRuleset loads an nftables ruleset into ns.
func (l *Lab) loadRuleset(ctx context.Context, ns *Namespace, base, ruleset string) error {
	path := l.filePath(base, ".nft")
	if err := os.WriteFile(path, []byte(ruleset), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", base, err)
	}
	if _, err := ns.Run(ctx, l.nftPath, "-f", path); err != nil {
		return fmt.Errorf("load %s in %s: %w", base, ns.Name, err)
	}
	return nil
}

// Carriers returns the lab's carriers: the first, and the second in a
// TwoCarriers lab.
func (l *Lab) Carriers() []*Namespace {
	if l.Carrier2 != nil {
		return []*Namespace{l.Carrier, l.Carrier2}
	}
	return []*Namespace{l.Carrier}
}

// CutCarrier makes carrier (one of Carriers) drop everything it forwards,
// both ways, without a word: no RST, no ICMP. HealCarrier undoes it.
func (l *Lab) CutCarrier(ctx context.Context, carrier *Namespace) error {
	if _, err := carrier.Run(ctx, l.nftPath, "add", "element", "inet", cutTable, "cut", "{ "+CarrierSiteIface+", "+CarrierHubIface+" }"); err != nil {
		return fmt.Errorf("cut %s: %w", carrier.Name, err)
	}
	l.logf("lab %s: %s drops everything", l.Name, carrier.Role)
	return nil
}

// HealCarrier lets carrier forward again.
func (l *Lab) HealCarrier(ctx context.Context, carrier *Namespace) error {
	if _, err := carrier.Run(ctx, l.nftPath, "flush", "set", "inet", cutTable, "cut"); err != nil {
		return fmt.Errorf("heal %s: %w", carrier.Name, err)
	}
	l.logf("lab %s: %s forwards again", l.Name, carrier.Role)
	return nil
}

// LimitCarrierRate is LimitRate on carrier (one of Carriers): a token
// bucket on its hub side.
func (l *Lab) LimitCarrierRate(ctx context.Context, carrier *Namespace, rateBits int, latency time.Duration) error {
	if rateBits <= 0 || latency <= 0 {
		return fmt.Errorf("LimitCarrierRate: rate %d and latency %v must be positive", rateBits, latency)
	}
	burst := max(rateBits/8/1000, 3000)
	out, err := carrier.Run(ctx, "tc", "qdisc", "replace", "dev", CarrierHubIface, "root", "tbf",
		"rate", strconv.Itoa(rateBits)+"bit", "burst", strconv.Itoa(burst),
		"latency", strconv.FormatInt(latency.Milliseconds(), 10)+"ms")
	if err != nil {
		return fmt.Errorf("limiting %s's rate: %w: %s", carrier.Name, err, out)
	}
	return nil
}
