package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"
)

// Addresses of the lab topology. The Net constants are the prefixes the
// addresses belong to.
const (
	SiteOuter   = "100.64.0.2"   // site's address on s0, its "public" address behind the carrier NAT
	CarrierSite = "100.64.0.1"   // carrier's address toward the site (the site's next hop)
	CarrierHub  = "203.0.113.1"  // carrier's address toward the hub; site traffic is masqueraded to it
	HubOuter    = "203.0.113.2"  // hub's public address on h0
	SiteInner   = "198.51.100.1" // site's protected address (on lo)
	HubInner    = "192.0.2.1"    // hub's protected address (on lo)

	SiteOuterNet = "100.64.0.0/24"
	HubOuterNet  = "203.0.113.0/24"
	SiteInnerNet = "198.51.100.0/24"
	HubInnerNet  = "192.0.2.0/24"
)

// Interface names inside the namespaces. They are the same in every lab,
// which is fine because each lab has namespaces of its own.
const (
	SiteIface        = "s0"     // in site, toward the carrier
	CarrierSiteIface = "c-site" // in carrier, toward the site
	CarrierHubIface  = "c-hub"  // in carrier, toward the hub
	HubIface         = "h0"     // in hub, toward the carrier
)

// DefaultPrefix starts the name of every lab (and so of its namespaces)
// unless Options.Prefix says otherwise.
const DefaultPrefix = "iktc"

// runRoot holds one short directory per lab for its unix sockets (whose
// paths must stay under 108 bytes) and for the owner file that
// CleanupStale reads.
const runRoot = "/run/iketcp-lab"

var prefixPattern = regexp.MustCompile(`^[a-z][a-z0-9]{0,11}$`)

// Options configure New.
type Options struct {
	// Dir is the parent directory for the lab's configuration and log
	// files, which go into Dir/<lab name>/. Tests pass t.TempDir(). Empty
	// means a new directory under the system's temp directory.
	Dir string
	// Logf receives one line per setup step and per cleanup action. Nil
	// discards them.
	Logf func(format string, args ...any)
	// Prefix starts the lab's name ("iktc" if empty): the lab is named
	// Prefix-XXXX with a random XXXX, and its namespaces Prefix-XXXX-site,
	// -carrier and -hub. Lowercase letters and digits, at most 12.
	Prefix string
	// KeepFiles leaves the configuration and log files in place on Close
	// (namespaces and processes are removed all the same).
	KeepFiles bool
	// Pair builds two namespaces only, site and hub, joined by one veth
	// pair (s0 and h0, addresses as above) with nothing between them: the
	// shortest path between two namespaces, for measurements. The lab then
	// has no Carrier, and what needs one (BlockUDP, LimitRate, the
	// middlebox, the counters) returns an error.
	Pair bool
	// TwoCarriers adds a second carrier (namespace carrier2), a path of
	// its own between a second uplink of the site's (s1, SiteOuter2) and a
	// second address of the hub's (h1, HubOuter2), with the same NAT, for
	// aggregates (twocarriers.go). The first carrier's topology is
	// unchanged.
	TwoCarriers bool
}

// Lab is one carrier-NAT topology with the processes started in it.
// Its methods are safe for concurrent use.
type Lab struct {
	// Name is the lab's unique name, e.g. "iktc-3f2a".
	Name string
	// Dir holds the lab's configuration and log files.
	Dir string
	// Site, Carrier and Hub are the lab's namespaces.
	Site, Carrier, Hub *Namespace
	// Carrier2 is the second carrier of a TwoCarriers lab, else nil.
	Carrier2 *Namespace

	opts      Options
	runDir    string // runRoot/Name
	ipPath    string
	nftPath   string
	tcpdump   string
	swanctl   string
	pingPath  string
	createdNS []*Namespace

	mu       sync.Mutex
	procs    []*Process
	charons  []*Charon
	captures []*Capture
	mbox     *Middlebox     // the strict middlebox started last, or nil
	closers  []func() error // run by Close, newest first, before processes stop
	logSeq   int
	closed   bool
	closeErr error
}

// New builds a lab: namespaces, veth links, addresses, routes and the
// carrier's nftables table. Leftovers of crashed earlier runs with the same
// prefix are removed first (see CleanupStale). On error everything New
// created is removed again.
func New(ctx context.Context, opts Options) (l *Lab, err error) {
	if reason := MissingRequirements(); reason != "" {
		return nil, errors.New(reason)
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if !prefixPattern.MatchString(opts.Prefix) {
		return nil, fmt.Errorf("lab prefix %q: use 1-12 lowercase letters and digits, starting with a letter", opts.Prefix)
	}
	l = &Lab{
		opts:     opts,
		ipPath:   toolPath("ip"),
		nftPath:  toolPath("nft"),
		tcpdump:  toolPath("tcpdump"),
		swanctl:  toolPath("swanctl"),
		pingPath: toolPath("ping"),
	}
	start := time.Now()
	if removed, err := CleanupStale(ctx, opts.Prefix); err != nil {
		l.logf("lab: cleaning up stale labs: %v", err)
	} else if len(removed) > 0 {
		l.logf("lab: removed stale namespaces from earlier runs: %s", strings.Join(removed, ", "))
	}
	if err := l.claimName(); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			if cerr := l.Close(); cerr != nil {
				err = errors.Join(err, fmt.Errorf("cleaning up the partial lab: %w", cerr))
			}
			l = nil
		}
	}()
	if opts.Dir == "" {
		if l.Dir, err = os.MkdirTemp("", l.Name+"-"); err != nil {
			return l, fmt.Errorf("create lab directory: %w", err)
		}
	} else {
		l.Dir = filepath.Join(opts.Dir, l.Name)
		if err = os.MkdirAll(l.Dir, 0o755); err != nil {
			return l, fmt.Errorf("create lab directory: %w", err)
		}
	}
	if err = l.build(ctx); err != nil {
		return l, err
	}
	l.logf("lab %s: site, carrier and hub ready in %s (files in %s)", l.Name, time.Since(start).Round(time.Millisecond), l.Dir)
	return l, nil
}

// claimName picks a random lab name and claims it by creating its run
// directory, which also records the owning process for CleanupStale.
func (l *Lab) claimName() error {
	if err := os.MkdirAll(runRoot, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", runRoot, err)
	}
	owner, err := ownerStamp(os.Getpid())
	if err != nil {
		return err
	}
	for range 32 {
		var b [2]byte
		if _, err := rand.Read(b[:]); err != nil {
			return fmt.Errorf("random lab name: %w", err)
		}
		name := l.opts.Prefix + "-" + hex.EncodeToString(b[:])
		dir := filepath.Join(runRoot, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			if errors.Is(err, os.ErrExist) {
				continue
			}
			return fmt.Errorf("create %s: %w", dir, err)
		}
		if namespaceExists(name+"-site") || namespaceExists(name+"-carrier") || namespaceExists(name+"-hub") {
			os.Remove(dir)
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(owner), 0o644); err != nil {
			os.RemoveAll(dir)
			return fmt.Errorf("write lab owner: %w", err)
		}
		l.Name, l.runDir = name, dir
		return nil
	}
	return fmt.Errorf("no free lab name with prefix %s after 32 tries: remove old labs with CleanupStale", l.opts.Prefix)
}

func namespaceExists(name string) bool {
	_, err := os.Stat(filepath.Join("/run/netns", name))
	return err == nil
}

// build creates the namespaces and everything inside them.
func (l *Lab) build(ctx context.Context) error {
	roles := []string{"site", "carrier", "hub"}
	if l.opts.Pair {
		roles = []string{"site", "hub"}
	}
	for _, role := range roles {
		ns := &Namespace{Name: l.Name + "-" + role, Role: role, lab: l}
		// Registered first: a cancelled `ip netns add` may still have
		// created the namespace, and Close must find it.
		l.createdNS = append(l.createdNS, ns)
		if _, err := l.run(ctx, l.ipPath, "netns", "add", ns.Name); err != nil {
			return fmt.Errorf("create namespace: %w", err)
		}
		switch role {
		case "site":
			l.Site = ns
		case "carrier":
			l.Carrier = ns
		case "hub":
			l.Hub = ns
		}
		// No IPv6: keeps router solicitations and MLD out of captures.
		if _, err := ns.Run(ctx, "sh", "-c",
			"echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"); err != nil {
			return fmt.Errorf("disable IPv6 in %s: %w", ns.Name, err)
		}
	}
	ip := func(ns *Namespace, args ...string) error {
		_, err := l.run(ctx, l.ipPath, append([]string{"-n", ns.Name}, args...)...)
		return err
	}
	if l.opts.Pair {
		return l.buildPair(ip)
	}
	if _, err := l.Carrier.Run(ctx, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"); err != nil {
		return fmt.Errorf("enable forwarding in %s: %w", l.Carrier.Name, err)
	}
	steps := []struct {
		ns   *Namespace
		args []string
	}{
		{l.Carrier, []string{"link", "add", CarrierSiteIface, "type", "veth", "peer", "name", SiteIface, "netns", l.Site.Name}},
		{l.Carrier, []string{"link", "add", CarrierHubIface, "type", "veth", "peer", "name", HubIface, "netns", l.Hub.Name}},
		{l.Site, []string{"addr", "add", SiteInner + "/32", "dev", "lo"}},
		{l.Site, []string{"addr", "add", SiteOuter + "/24", "dev", SiteIface}},
		{l.Carrier, []string{"addr", "add", CarrierSite + "/24", "dev", CarrierSiteIface}},
		{l.Carrier, []string{"addr", "add", CarrierHub + "/24", "dev", CarrierHubIface}},
		{l.Hub, []string{"addr", "add", HubInner + "/32", "dev", "lo"}},
		{l.Hub, []string{"addr", "add", HubOuter + "/24", "dev", HubIface}},
		{l.Site, []string{"link", "set", "lo", "up"}},
		{l.Site, []string{"link", "set", SiteIface, "up"}},
		{l.Carrier, []string{"link", "set", "lo", "up"}},
		{l.Carrier, []string{"link", "set", CarrierSiteIface, "up"}},
		{l.Carrier, []string{"link", "set", CarrierHubIface, "up"}},
		{l.Hub, []string{"link", "set", "lo", "up"}},
		{l.Hub, []string{"link", "set", HubIface, "up"}},
		{l.Site, []string{"route", "add", HubOuterNet, "via", CarrierSite, "dev", SiteIface}},
	}
	for _, s := range steps {
		if err := ip(s.ns, s.args...); err != nil {
			return err
		}
	}
	if err := l.setupCarrierFirewall(ctx); err != nil {
		return err
	}
	if l.opts.TwoCarriers {
		return l.buildSecondCarrier(ctx, ip)
	}
	return nil
}

// buildPair joins site and hub with one veth pair: each routes the other's
// /24 straight onto the link.
func (l *Lab) buildPair(ip func(ns *Namespace, args ...string) error) error {
	steps := []struct {
		ns   *Namespace
		args []string
	}{
		{l.Site, []string{"link", "add", SiteIface, "type", "veth", "peer", "name", HubIface, "netns", l.Hub.Name}},
		{l.Site, []string{"addr", "add", SiteInner + "/32", "dev", "lo"}},
		{l.Site, []string{"addr", "add", SiteOuter + "/24", "dev", SiteIface}},
		{l.Hub, []string{"addr", "add", HubInner + "/32", "dev", "lo"}},
		{l.Hub, []string{"addr", "add", HubOuter + "/24", "dev", HubIface}},
		{l.Site, []string{"link", "set", "lo", "up"}},
		{l.Site, []string{"link", "set", SiteIface, "up"}},
		{l.Hub, []string{"link", "set", "lo", "up"}},
		{l.Hub, []string{"link", "set", HubIface, "up"}},
		{l.Site, []string{"route", "add", HubOuterNet, "dev", SiteIface}},
		{l.Hub, []string{"route", "add", SiteOuterNet, "dev", HubIface}},
	}
	for _, s := range steps {
		if err := ip(s.ns, s.args...); err != nil {
			return err
		}
	}
	return nil
}

// errNoCarrier is what the carrier's methods return in a Pair lab.
var errNoCarrier = errors.New("this lab has no carrier (Options.Pair)")

// Close stops every process and capture the lab started (by PID), kills any
// other process still inside the lab's namespaces, deletes the namespaces
// and removes the lab's files (unless Options.KeepFiles). It is safe to call
// more than once and on a partially built lab; later calls return the first
// call's result.
func (l *Lab) Close() error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return l.closeErr
	}
	l.closed = true
	procs, closers := l.procs, l.closers
	l.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var errs []error
	for i := len(closers) - 1; i >= 0; i-- {
		if err := closers[i](); err != nil {
			errs = append(errs, err)
		}
	}
	// Newest first: captures and clients go before the daemons they watch.
	for i := len(procs) - 1; i >= 0; i-- {
		if err := procs[i].Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	for i := len(l.createdNS) - 1; i >= 0; i-- {
		ns := l.createdNS[i]
		if !namespaceExists(ns.Name) {
			continue
		}
		if killed, err := killNamespacePIDs(ctx, l.ipPath, ns.Name); err != nil {
			errs = append(errs, err)
		} else if len(killed) > 0 {
			l.logf("lab %s: killed processes the lab did not start, left in %s: %v", l.Name, ns.Name, killed)
		}
		if _, err := l.run(ctx, l.ipPath, "netns", "del", ns.Name); err != nil {
			errs = append(errs, err)
		}
	}
	if l.runDir != "" {
		if err := os.RemoveAll(l.runDir); err != nil {
			errs = append(errs, err)
		}
	}
	if l.Dir != "" && !l.opts.KeepFiles {
		if err := os.RemoveAll(l.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	err := errors.Join(errs...)
	l.mu.Lock()
	l.closeErr = err
	l.mu.Unlock()
	if err != nil {
		l.logf("lab %s: closed with errors: %v", l.Name, err)
	} else if l.Name != "" {
		l.logf("lab %s: closed", l.Name)
	}
	return err
}

// Namespaces returns the lab's namespaces: site, carrier, hub (site and
// hub in a Pair lab).
func (l *Lab) Namespaces() []*Namespace {
	if l.Carrier == nil {
		return []*Namespace{l.Site, l.Hub}
	}
	if l.Carrier2 != nil {
		return []*Namespace{l.Site, l.Carrier, l.Carrier2, l.Hub}
	}
	return []*Namespace{l.Site, l.Carrier, l.Hub}
}

// Processes returns the processes the lab has started, oldest first,
// including charons and captures.
func (l *Lab) Processes() []*Process {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Process(nil), l.procs...)
}

// Charons returns the charon daemons started with StartCharon, oldest first.
func (l *Lab) Charons() []*Charon {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Charon(nil), l.charons...)
}

// track registers a started process so that Close stops it. If the lab is
// already closed the process is stopped at once and an error returned.
func (l *Lab) track(p *Process) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		p.Stop()
		return fmt.Errorf("lab %s is closed", l.Name)
	}
	l.procs = append(l.procs, p)
	l.mu.Unlock()
	return nil
}

// filePath returns a fresh path in the lab directory, base-N.ext.
func (l *Lab) filePath(base, ext string) string {
	l.mu.Lock()
	l.logSeq++
	n := l.logSeq
	l.mu.Unlock()
	return filepath.Join(l.Dir, fmt.Sprintf("%s-%d%s", base, n, ext))
}

func (l *Lab) logf(format string, args ...any) {
	if l.opts.Logf != nil {
		l.opts.Logf(format, args...)
	}
}
