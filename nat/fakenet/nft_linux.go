package fakenet

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
	"github.com/iketcp/iketcp/nat/tun"
)

// Fake-TCP mode's nftables table, and the forwarding sysctls it records.
//
// Each fake-TCP table holds, in its chain "restore", one rule per sysctl
// value to put back when the last fake-TCP instance of the namespace goes,
// as the rule's comment ("net/ipv4/ip_forward=0"). The first instance to
// turn forwarding on records what it was; a later one copies the records
// of the tables it finds; one that closes while another instance's device
// still runs hands its records over to that one's table instead of
// restoring. The record lives in the kernel, so a clean-up after a crash
// restores forwarding too.

// recordChain is the chain of a fake-TCP table that holds its record.
const recordChain = "restore"

// sysctlValue is one sysctl's value: key is its path under /proc/sys.
type sysctlValue struct{ key, value string }

// Forwarding's global switches. Writing one sets the forwarding of every
// device (and of "default") of its family too.
const (
	forward4 = "net/ipv4/ip_forward"
	forward6 = "net/ipv6/conf/all/forwarding"
)

// planForwarding works out which forwarding switches setup turns on, and
// what the table is to record: the running instances' records (a crashed
// run's, which may be out of date, stay with its table), then,
// for each switch that no record names yet and that is off, its value and
// those of the devices whose forwarding differs from it (writing the
// switch changes them). It opens every sysctl file it may restore, so
// that Close can restore them from any thread.
func (n *Net) planForwarding(v6 bool) ([]string, error) {
	running, err := runningTables(n.nl, n.nft, n.cfg.Name)
	if err != nil {
		return nil, err
	}
	var record []sysctlValue
	for _, t := range running {
		r, err := readRecord(n.nft, t)
		if err != nil {
			n.log.Warn("fake-TCP mode: could not read another fake-TCP table's record of forwarding", "table", t.Name, "err", err)
			continue
		}
		record = mergeRecord(record, r)
	}
	var plan []string
	for _, fam := range []struct {
		key, dir string
		on       bool
	}{{forward4, "net/ipv4/conf", true}, {forward6, "net/ipv6/conf", v6}} {
		if !fam.on {
			continue
		}
		cur, err := n.sysctls.read(fam.key)
		if err != nil {
			return nil, sysctlError("read", sysctlName(fam.key), err)
		}
		if cur != "0" {
			continue // on already
		}
		plan = append(plan, fam.key)
		if hasKey(record, fam.key) {
			continue // an earlier instance recorded it; someone turned it off since
		}
		record = append(record, sysctlValue{fam.key, cur})
		devs, err := deviceForwarding(fam.dir, cur, n.cfg.Name)
		if err != nil {
			return nil, err
		}
		record = append(record, devs...)
	}
	// The switches always, for records handed over later; then the
	// devices the record names (one gone since is nothing to restore).
	for _, key := range []string{forward4, forward6} {
		if err := n.sysctls.hold(key); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, sysctlError("open", sysctlName(key), err)
		}
	}
	for _, v := range record {
		if err := n.sysctls.hold(v.key); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, sysctlError("open", sysctlName(v.key), err)
		}
	}
	n.record = record
	return plan, nil
}

// deviceForwarding lists the devices under dir (and "default") whose
// forwarding is not global, except skip's.
func deviceForwarding(dir, global, skip string) ([]sysctlValue, error) {
	entries, err := os.ReadDir("/proc/sys/" + dir)
	if err != nil {
		return nil, fmt.Errorf("fake-TCP mode: list /proc/sys/%s: %w", dir, err)
	}
	var devs []sysctlValue
	for _, e := range entries {
		if e.Name() == "all" || e.Name() == skip {
			continue
		}
		key := dir + "/" + e.Name() + "/forwarding"
		b, err := os.ReadFile("/proc/sys/" + key)
		if err != nil {
			continue // a device that just went
		}
		if v := strings.TrimSpace(string(b)); v != global {
			devs = append(devs, sysctlValue{key, v})
		}
	}
	return devs, nil
}

// installTable installs the table, its chains, rules and record, in one
// transaction.
func (n *Net) installTable() error {
	c, t, cfg := n.nft, n.table, &n.cfg
	c.AddTable(t)
	accept := nftables.ChainPolicyAccept
	chain := func(name string, typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) *nftables.Chain {
		return c.AddChain(&nftables.Chain{Name: name, Table: t, Type: typ, Hooknum: hook, Priority: prio, Policy: &accept})
	}
	rule := func(ch *nftables.Chain, exprs ...[]expr.Any) {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: slices.Concat(exprs...)})
	}
	eps := []netip.Addr{n.ep4}
	if n.ep6.IsValid() {
		eps = append(eps, n.ep6)
	}

	// Forward: the endpoint's traffic passes this table's filter. A packet
	// of the endpoint's that conntrack finds invalid (out of its TCP
	// window, say) would leave without its NAT, with the endpoint's
	// address: it is dropped instead.
	fwd := chain("forward", nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter)
	rule(fwd, ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, cfg.Name), ctStateInvalid(), verdict(expr.VerdictDrop))
	for _, ep := range eps {
		rule(fwd, ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, cfg.Name), addrIs(ep, true), verdict(expr.VerdictAccept))
		rule(fwd, ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, cfg.Name), addrIs(ep, false), verdict(expr.VerdictAccept))
	}

	switch cfg.Role {
	case Client:
		post := chain("postrouting", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource)
		// A source's block first: a NAT verdict ends the chain.
		for _, src := range cfg.Sources {
			ep := n.ep4
			if src.Addr.Is6() {
				ep = n.ep6
			}
			rule(post, addrIs(ep, true), ifname(expr.MetaKeyOIFNAME, expr.CmpOpNeq, cfg.Name), tcpSportIn(src.FirstPort, src.LastPort), snat(src.Addr))
		}
		for _, ep := range eps {
			rule(post, addrIs(ep, true), ifname(expr.MetaKeyOIFNAME, expr.CmpOpNeq, cfg.Name), []expr.Any{&expr.Masq{}})
		}
	case Server:
		pre := chain("prerouting", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest)
		for _, ep := range eps {
			rule(pre, nfproto(ep), ifname(expr.MetaKeyIIFNAME, expr.CmpOpNeq, cfg.Name), fibDaddrLocal(), tcpDport(cfg.Port), dnat(ep, cfg.Port))
		}
	}

	// Output: with an IPv6 address (and forwarding) the device joins
	// multicast groups, and the kernel reports them with MLD into it;
	// the endpoint has no use for them. ICMP errors, which tell it of
	// the path's MTU, still pass.
	if n.ep6.IsValid() {
		out := chain("output", nftables.ChainTypeFilter, nftables.ChainHookOutput, nftables.ChainPriorityFilter)
		rule(out, ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, cfg.Name), icmpv6Type(expr.CmpOpGte, 130), icmpv6Type(expr.CmpOpLte, 132), verdict(expr.VerdictDrop))
		rule(out, ifname(expr.MetaKeyOIFNAME, expr.CmpOpEq, cfg.Name), icmpv6Type(expr.CmpOpEq, 143), verdict(expr.VerdictDrop))
	}

	if cfg.Mark != 0 {
		mark := chain("mark", nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityMangle)
		rule(mark, ifname(expr.MetaKeyIIFNAME, expr.CmpOpEq, cfg.Name), []expr.Any{
			&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(cfg.Mark)},
			&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
		})
	}

	rec := c.AddChain(&nftables.Chain{Name: recordChain, Table: t})
	for _, v := range n.record {
		c.AddRule(recordRule(t, rec, v))
	}
	if err := c.Flush(); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
			err = fmt.Errorf("%w (does the kernel have nf_tables with nft_nat, nft_masq, nft_fib and nft_ct? modprobe them, or load nf_tables on the host of the container)", err)
		}
		return modeFakeTCP.Failed("install nftables table "+t.Name, err)
	}
	n.tableUp = true
	return nil
}

// recordRule is a rule of the record chain that records v: no
// expressions, v as its comment.
func recordRule(t *nftables.Table, ch *nftables.Chain, v sysctlValue) *nftables.Rule {
	return &nftables.Rule{Table: t, Chain: ch, UserData: userdata.AppendString(nil, userdata.TypeComment, v.key+"="+v.value)}
}

// listTables lists the namespace's fake-TCP tables.
func listTables(c *nftables.Conn) ([]*nftables.Table, error) {
	all, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, modeFakeTCP.Failed("list the nftables tables", err)
	}
	var tables []*nftables.Table
	for _, t := range all {
		if strings.HasPrefix(t.Name, tablePrefix) {
			tables = append(tables, t)
		}
	}
	return tables, nil
}

// readRecord reads a fake-TCP table's record. It accepts only forwarding
// sysctls, whatever else a comment may name.
func readRecord(c *nftables.Conn, t *nftables.Table) ([]sysctlValue, error) {
	rules, err := c.GetRules(t, &nftables.Chain{Name: recordChain, Table: t})
	if err != nil {
		return nil, fmt.Errorf("read chain %s of table %s: %w", recordChain, t.Name, err)
	}
	var record []sysctlValue
	for _, r := range rules {
		s, ok := userdata.GetString(r.UserData, userdata.TypeComment)
		if !ok {
			continue
		}
		key, value, ok := strings.Cut(s, "=")
		if !ok || !forwardingKey(key) || value == "" || strings.Trim(value, "0123456789") != "" {
			return nil, fmt.Errorf("table %s records %q, which is not a forwarding sysctl's value", t.Name, s)
		}
		record = mergeRecord(record, []sysctlValue{{key, value}})
	}
	return record, nil
}

// forwardingKey reports whether key is a forwarding sysctl: a global
// switch, or a device's (or default's) forwarding.
func forwardingKey(key string) bool {
	if key == forward4 || key == forward6 {
		return true
	}
	for _, dir := range []string{"net/ipv4/conf/", "net/ipv6/conf/"} {
		if dev, ok := strings.CutPrefix(key, dir); ok {
			dev, ok = strings.CutSuffix(dev, "/forwarding")
			return ok && dev != "" && tun.CheckName(dev) == nil
		}
	}
	return false
}

func hasKey(record []sysctlValue, key string) bool {
	return slices.ContainsFunc(record, func(v sysctlValue) bool { return v.key == key })
}

// mergeRecord adds to a what b records of sysctls that a does not.
func mergeRecord(a, b []sysctlValue) []sysctlValue {
	for _, v := range b {
		if !hasKey(a, v.key) {
			a = append(a, v)
		}
	}
	return a
}

// settleRecord acts on the record of a fake-TCP table that is gone (own's):
// if no other fake-TCP instance runs, it restores the recorded values;
// otherwise it hands them over to the running ones' tables. An instance
// runs while its TUN device exists: a crashed run's device went with its
// process, and its table, if left, neither needs forwarding nor blocks
// the restore.
func settleRecord(h *netlink.Handle, c *nftables.Conn, files *sysctlFiles, own string, record []sysctlValue, log *slog.Logger) error {
	if len(record) == 0 {
		return nil
	}
	running, err := runningTables(h, c, own)
	if err != nil {
		return err
	}
	if len(running) == 0 {
		return restoreSysctls(files, record, log)
	}
	for _, t := range running {
		if err := handOver(c, t, record); err != nil {
			log.Warn("fake-TCP mode: could not hand the record of forwarding over to a running instance's table; when the last instance closes, check forwarding by hand",
				"table", t.Name, "err", err)
			continue
		}
		log.Info("fake-TCP mode: left forwarding on for another running instance, which restores it when it closes", "table", t.Name)
	}
	return nil
}

// runningTables lists the tables of the fake-TCP instances that run
// in the namespace, except own's: those whose TUN device exists.
func runningTables(h *netlink.Handle, c *nftables.Conn, own string) ([]*nftables.Table, error) {
	tables, err := listTables(c)
	if err != nil {
		return nil, err
	}
	var running []*nftables.Table
	for _, t := range tables {
		dev := strings.TrimPrefix(t.Name, tablePrefix)
		if dev == own {
			continue
		}
		if link, err := h.LinkByName(dev); err == nil && link.Type() == "tuntap" {
			running = append(running, t)
		}
	}
	return running, nil
}

// handOver adds to t's record what record has and it has not.
func handOver(c *nftables.Conn, t *nftables.Table, record []sysctlValue) error {
	have, err := readRecord(c, t)
	if err != nil {
		return err
	}
	ch := &nftables.Chain{Name: recordChain, Table: t}
	added := false
	for _, v := range record {
		if !hasKey(have, v.key) {
			c.AddRule(recordRule(t, ch, v))
			added = true
		}
	}
	if !added {
		return nil
	}
	return c.Flush()
}

// restoreSysctls writes back the recorded values that differ now: the
// global switches first, which set every device's, then the devices'.
func restoreSysctls(files *sysctlFiles, record []sysctlValue, log *slog.Logger) error {
	var errs []error
	for _, global := range []bool{true, false} {
		for _, v := range record {
			if (v.key == forward4 || v.key == forward6) != global {
				continue
			}
			cur, err := files.read(v.key)
			if err != nil {
				if !errors.Is(err, os.ErrNotExist) && !setup.Gone(err) {
					errs = append(errs, sysctlError("read", sysctlName(v.key), err))
				}
				continue
			}
			if cur == v.value {
				continue
			}
			if err := files.write(v.key, v.value); err != nil {
				errs = append(errs, sysctlError(fmt.Sprintf("restore %s to %s", sysctlName(v.key), v.value), sysctlName(v.key), err))
				continue
			}
			log.Info("fake-TCP mode: restored a sysctl it had changed", "sysctl", sysctlName(v.key), "value", v.value)
		}
	}
	return errors.Join(errs...)
}

// sysctlFiles are the sysctl files of one network namespace, opened while
// a thread of the namespace was at hand: /proc/sys resolves paths in the
// namespace of the thread that opens them, and an open file stays with
// its own.
type sysctlFiles struct {
	ns   nsID
	held map[string]*os.File
}

// nsID identifies a network namespace.
type nsID struct{ dev, ino uint64 }

// threadNetns is the calling thread's network namespace, or the zero nsID
// if it cannot be told.
func threadNetns() nsID {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return nsID{}
	}
	return nsID{st.Dev, st.Ino}
}

// newSysctlFiles starts a set of files of the calling thread's namespace.
func newSysctlFiles() *sysctlFiles {
	return &sysctlFiles{ns: threadNetns(), held: make(map[string]*os.File)}
}

// hold opens the sysctl key, for reading and writing if it may, and keeps
// it open.
func (s *sysctlFiles) hold(key string) error {
	_, err := s.file(key)
	return err
}

// file returns the open file of key, opening it if the calling thread is
// in the files' namespace.
func (s *sysctlFiles) file(key string) (*os.File, error) {
	if f, ok := s.held[key]; ok {
		return f, nil
	}
	if cur := threadNetns(); cur == (nsID{}) || cur != s.ns {
		return nil, fmt.Errorf("this thread is in another network namespace than the one set up, whose %s was not opened then", sysctlName(key))
	}
	f, err := os.OpenFile("/proc/sys/"+key, os.O_RDWR, 0)
	if errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) {
		// Readable still; a write would tell.
		f, err = os.Open("/proc/sys/" + key)
	}
	if err != nil {
		return nil, err
	}
	s.held[key] = f
	return f, nil
}

func (s *sysctlFiles) read(key string) (string, error) {
	f, err := s.file(key)
	if err != nil {
		return "", err
	}
	var buf [32]byte
	m, err := f.ReadAt(buf[:], 0)
	if m == 0 && err != nil {
		return "", err
	}
	return strings.TrimSpace(string(buf[:m])), nil
}

func (s *sysctlFiles) write(key, value string) error {
	f, err := s.file(key)
	if err != nil {
		return err
	}
	_, err = f.WriteAt([]byte(value+"\n"), 0)
	return err
}

func (s *sysctlFiles) close() {
	for k, f := range s.held {
		f.Close()
		delete(s.held, k)
	}
}

// sysctlName is key as sysctl(8) names it: dots between the levels, a
// device name's dots as slashes.
func sysctlName(key string) string {
	parts := strings.Split(key, "/")
	for k, p := range parts {
		parts[k] = strings.ReplaceAll(p, ".", "/")
	}
	return strings.Join(parts, ".")
}

// sysctlError explains a failure to do what with the sysctl name.
func sysctlError(what, name string, err error) error {
	switch {
	case errors.Is(err, unix.EROFS) || errors.Is(err, unix.EBADF):
		return fmt.Errorf("fake-TCP mode: %s: /proc/sys is read-only here (as in most containers): set %s=1 from outside, e.g. docker run --sysctl %s=1: %w", what, name, name, err)
	case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
		return fmt.Errorf("%w: %s (%s): %v", errNeedsNetAdmin, what, name, err)
	}
	return fmt.Errorf("fake-TCP mode: %s (%s): %w", what, name, err)
}

// Expressions of the table's rules.

// nfproto matches a's family.
func nfproto(a netip.Addr) []expr.Any {
	p := byte(unix.NFPROTO_IPV4)
	if a.Is6() {
		p = unix.NFPROTO_IPV6
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

// addrIs matches a's family and a as the source (src) or destination.
func addrIs(a netip.Addr, src bool) []expr.Any {
	off := uint32(16)
	if src {
		off = 12
	}
	if a.Is6() {
		off = 24
		if src {
			off = 8
		}
	}
	return append(nfproto(a),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(a.BitLen() / 8)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a.AsSlice()},
	)
}

// ifname compares the input or output device's name with name.
func ifname(key expr.MetaKey, op expr.CmpOp, name string) []expr.Any {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: b},
	}
}

// tcpDport matches TCP to port.
func tcpDport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

// tcpSportIn matches TCP from a port of first to last.
func tcpSportIn(first, last uint16) []expr.Any {
	ports := expr.Any(&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: binaryutil.BigEndian.PutUint16(first), ToData: binaryutil.BigEndian.PutUint16(last)})
	if first == last {
		ports = &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(first)}
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		ports,
	}
}

// icmpv6Type compares an ICMPv6 message's type with typ (MLD: 130 to 132,
// and 143).
func icmpv6Type(op expr.CmpOp, typ byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Cmp{Op: op, Register: 1, Data: []byte{typ}},
	}
}

// fibDaddrLocal matches packets to one of the host's own addresses, so
// that the server's DNAT never takes connections that the host forwards
// for others.
func fibDaddrLocal() []expr.Any {
	return []expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
	}
}

// ctStateInvalid matches packets that conntrack does not track as part of
// a connection.
func ctStateInvalid() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitINVALID), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// dnat sends the connection to ep at port.
func dnat(ep netip.Addr, port uint16) []expr.Any {
	fam := uint32(unix.NFPROTO_IPV4)
	if ep.Is6() {
		fam = unix.NFPROTO_IPV6
	}
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: ep.AsSlice()},
		&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: fam, RegAddrMin: 1, RegAddrMax: 1, RegProtoMin: 2, RegProtoMax: 2, Specified: true},
	}
}

// snat gives the connection the source address to, its port kept unless
// it collides.
func snat(to netip.Addr) []expr.Any {
	fam := uint32(unix.NFPROTO_IPV4)
	if to.Is6() {
		fam = unix.NFPROTO_IPV6
	}
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: to.AsSlice()},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: fam, RegAddrMin: 1, RegAddrMax: 1},
	}
}

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }
