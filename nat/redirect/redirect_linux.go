package redirect

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
)

// Redirect is a running port redirect: the nftables table that sends new
// TCP connections to From on the host's own addresses to To, and the
// owner socket that tells other instances it runs. Close removes both.
type Redirect struct {
	// Set by Setup, read-only afterwards.
	cfg   Config
	log   *slog.Logger
	table *nftables.Table

	// mu guards what Setup installed, which teardown removes once. The
	// nftables socket and the owner socket belong to the network
	// namespace Setup ran in, so Close works from any thread; nft is nil
	// and owner -1 once torn down.
	mu      sync.Mutex
	nft     *nftables.Conn
	owner   int  // the owner socket's descriptor
	tableUp bool // the table is installed
}

// Setup redirects new TCP connections to cfg.From on the calling
// thread's network namespace's own addresses (the process's, unless the
// caller moved its thread) to cfg.To, IPv4 and IPv6. It takes the owner
// socket of the table (refusing with an error that matches ErrInUse if a
// running Redirect holds it), removes the table a crashed run of the same
// Name left, and installs, in one transaction, the table cfg.Table()
// (family inet):
//
//	prerouting (nat, dstnat):  meta nfproto ipv4 tcp dport FROM fib daddr type local dnat ip to :TO
//	                           meta nfproto ipv6 tcp dport FROM fib daddr type local dnat ip6 to :TO
//	output (nat, -100):        the same two rules
//
// On failure it undoes what it did. Without CAP_NET_ADMIN the error
// matches nat.ErrNeedsNetAdmin. One Name serves one running Redirect at a
// time in a network namespace; instances that redirect different ports
// need different Names.
func Setup(cfg Config) (*Redirect, error) {
	cfg, err := cfg.withDefaults(true)
	if err != nil {
		return nil, err
	}
	r := newRedirect(cfg)
	if err := modePortRedirect.Run(r.start); err != nil {
		return nil, err
	}
	r.log.Info("port redirect: new TCP connections to the host's own addresses at the redirected port go to iketcp's",
		"from", cfg.From, "to", cfg.To, "table", r.table.Name)
	return r, nil
}

func newRedirect(cfg Config) *Redirect {
	return &Redirect{
		cfg:   cfg,
		log:   cfg.Logger,
		table: &nftables.Table{Name: cfg.Table(), Family: nftables.TableFamilyINet},
		owner: -1,
	}
}

// start is Setup's work, on the thread whose namespace it sets up: take
// the owner socket, remove a stale table, install the new one; it undoes a
// setup that fails.
func (r *Redirect) start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	err := r.setupLocked()
	if err != nil {
		return setup.Undo(err, r.teardownLocked)
	}
	return nil
}

func (r *Redirect) setupLocked() error {
	owner, err := takeOwnerSocket(r.table.Name)
	if err != nil {
		return err
	}
	r.owner = owner
	if err := setup.Installed("owner socket " + ownerAddr(r.table.Name)); err != nil {
		return err
	}
	// Lasting: the socket, made now, stays in this namespace for Close.
	r.nft, err = nftables.New(nftables.AsLasting())
	if err != nil {
		return modePortRedirect.Failed("open an nftables netlink socket (is nf_tables available?)", err)
	}
	if err := removeStale(r.nft, r.table, r.log); err != nil {
		return err
	}
	if err := r.installTable(); err != nil {
		return err
	}
	return setup.Installed("nftables table " + r.table.Name)
}

// Table is the name of the nftables table (family inet).
func (r *Redirect) Table() string { return r.table.Name }

// Close removes the table, then lets go of the owner socket. New
// connections to From are refused again (unless something else listens
// there); those it redirected stop being translated unless another NAT
// chain of their family is left in the namespace (see the package
// documentation). It is idempotent, and works from any thread.
func (r *Redirect) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.nft == nil && r.owner < 0 {
		return nil
	}
	err := r.teardownLocked()
	if err != nil {
		r.log.Error("port redirect: clean-up incomplete (run the clean-up command to finish it)", "table", r.table.Name, "err", err)
	} else {
		r.log.Info("port redirect: removed its table", "table", r.table.Name)
	}
	return err
}

// teardownLocked removes, once, what setup installed: the table, then the
// owner socket, so that no one takes the table for stale while it is
// still in use. The caller holds r.mu.
func (r *Redirect) teardownLocked() error {
	var err error
	if r.nft != nil {
		if r.tableUp {
			r.nft.DelTable(r.table)
			if ferr := r.nft.Flush(); ferr != nil && !setup.Gone(ferr) {
				err = modePortRedirect.Failed("remove nftables table "+r.table.Name, ferr)
			}
			r.tableUp = false
		}
		r.nft.CloseLasting()
		r.nft = nil
	}
	if r.owner >= 0 {
		unix.Close(r.owner)
		r.owner = -1
	}
	return err
}

// Cleanup removes the table that a crashed run left for cfg's Name in the
// calling thread's network namespace. It is the first step of Setup, on
// its own; only Name and Logger matter. It removes nothing while a
// Redirect of the Name runs (the error matches ErrInUse); without
// CAP_NET_ADMIN the error matches nat.ErrNeedsNetAdmin.
func Cleanup(cfg Config) error {
	cfg, err := cfg.withDefaults(false)
	if err != nil {
		return err
	}
	return modePortRedirect.Run(func() error {
		owner, err := takeOwnerSocket(cfg.Table())
		if err != nil {
			return err
		}
		defer unix.Close(owner)
		nft, err := nftables.New(nftables.AsLasting())
		if err != nil {
			return modePortRedirect.Failed("open an nftables netlink socket (is nf_tables available?)", err)
		}
		defer nft.CloseLasting()
		return removeStale(nft, &nftables.Table{Name: cfg.Table(), Family: nftables.TableFamilyINet}, cfg.Logger)
	})
}

// The owner socket.
//
// A running Redirect holds a unix socket bound to the abstract address
// ownerAddr(table): abstract addresses belong to the network namespace,
// and the kernel frees one when the last descriptor of its socket closes,
// a crashed process's included. So the table of a Name whose address is
// free has no running owner: it is stale. The socket is a stream socket
// that never listens, so no one can connect to it or queue anything on it.

// ownerAddr is the abstract unix address of table's owner socket, as ss(8)
// prints it.
func ownerAddr(table string) string { return "@iketcp/nftables/" + table }

// takeOwnerSocket binds the owner socket of table in the calling thread's
// namespace and returns its descriptor; if a running Redirect holds it,
// the error matches ErrInUse.
func takeOwnerSocket(table string) (int, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("port redirect: open a unix socket: %w", err)
	}
	addr := ownerAddr(table)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: addr}); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EADDRINUSE) {
			return -1, fmt.Errorf("%w %s in this network namespace (its process holds the unix socket %s, which ss -xap | grep %s shows): stop that one first, or give this one another Name",
				ErrInUse, table, addr, addr)
		}
		return -1, fmt.Errorf("port redirect: bind the owner socket %s: %w", addr, err)
	}
	return fd, nil
}

// removeStale removes the table t if it exists. The caller holds its owner
// socket, so no running Redirect uses it.
func removeStale(c *nftables.Conn, t *nftables.Table, log *slog.Logger) error {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return modePortRedirect.Failed("list the nftables tables", err)
	}
	for _, have := range tables {
		if have.Name != t.Name {
			continue
		}
		c.DelTable(t)
		if err := c.Flush(); err != nil && !setup.Gone(err) {
			return modePortRedirect.Failed("remove the nftables table "+t.Name+" that an earlier run left", err)
		}
		log.Warn("port redirect: removed an nftables table that an earlier run left", "table", t.Name)
	}
	return nil
}

// installTable installs the table, its chains and rules in one
// transaction, which the kernel applies whole or not at all.
func (r *Redirect) installTable() error {
	c, t := r.nft, r.table
	// Create, not add: a table of the name that appeared since
	// removeStale is someone else's, and stays as it is.
	c.CreateTable(t)
	r.addChainsAndRules(false)
	if err := c.Flush(); err != nil {
		switch {
		case errors.Is(err, unix.EEXIST):
			err = fmt.Errorf("%w (another program made a table of this name while iketcp set up; iketcp's table names begin with %s)", err, DefaultTable)
		case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP):
			err = fmt.Errorf("%w (does the kernel have nf_tables with nft_nat and nft_fib_inet? modprobe them, or load them on the host of the container; or use --redirect none and map the port on the platform)", err)
		}
		return modePortRedirect.Failed("install nftables table "+t.Name, err)
	}
	r.tableUp = true
	return nil
}

// comment is the comment of each of the table's rules.
func (r *Redirect) comment() string {
	return fmt.Sprintf("iketcp: ike-tcp-port %d to %d", r.cfg.From, r.cfg.To)
}

// addChainsAndRules queues the table's chains and rules on r.nft; flush
// first empties chains that exist already (adding a chain that exists,
// with the same hook, changes nothing).
func (r *Redirect) addChainsAndRules(flush bool) {
	c, t := r.nft, r.table
	accept := nftables.ChainPolicyAccept
	comment := userdata.AppendString(nil, userdata.TypeComment, r.comment())
	for _, hook := range []struct {
		name string
		num  *nftables.ChainHook
	}{
		// Connections from elsewhere, and the host's own to itself.
		{"prerouting", nftables.ChainHookPrerouting},
		{"output", nftables.ChainHookOutput},
	} {
		ch := c.AddChain(&nftables.Chain{Name: hook.name, Table: t, Type: nftables.ChainTypeNAT,
			Hooknum: hook.num, Priority: nftables.ChainPriorityNATDest, Policy: &accept})
		if flush {
			c.FlushChain(ch)
		}
		for _, fam := range []byte{unix.NFPROTO_IPV4, unix.NFPROTO_IPV6} {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: redirectExprs(fam, r.cfg.From, r.cfg.To), UserData: comment})
		}
	}
}

// redirectExprs are a rule's expressions: TCP to from, of family fam
// (NFPROTO_IPV4 or NFPROTO_IPV6), to one of the host's own addresses, gets
// the destination port to, and keeps its destination address. A DNAT of
// the port alone, unlike nft's redirect, leaves the address the client
// dialled (redirect would take the incoming device's first address, or
// the loopback address for the host's own connections), so a listener
// bound to that address receives it too.
func redirectExprs(fam byte, from, to uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{fam}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(from)},
		// The route lookup last, for the few packets that get this far.
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(to)},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(fam), RegProtoMin: 1, RegProtoMax: 1, Specified: true},
	}
}

// A planned restart or upgrade of the server hands the redirect to the
// process that replaces it, without a moment when the table is gone (a
// connection arriving then would be refused) or when its owner socket is
// free (another process would take the table for stale): the old process
// sends a duplicate of its owner socket (OwnerFile) to the new one, which
// takes the running table over (Adopt); once the new one has taken over,
// the old one lets go of its own descriptors and leaves the table
// (Release). The kernel keeps the socket, and so its address, bound for as
// long as either process holds it; if both crash, the address is free and
// the next Setup removes the table as stale, as always.

// OwnerFile returns a duplicate of the owner socket, for a process that
// takes the redirect over with Adopt. The caller closes it.
func (r *Redirect) OwnerFile() (*os.File, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.owner < 0 {
		return nil, errors.New("port redirect: closed")
	}
	fd, err := unix.FcntlInt(uintptr(r.owner), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", err)
	}
	return os.NewFile(uintptr(fd), ownerAddr(r.table.Name)), nil
}

// Release lets go of the redirect without removing its table: another
// process, which holds the owner socket (OwnerFile) and adopted the table,
// owns it now. This Redirect's descriptors close, and Close does nothing
// more. It works from any thread.
func (r *Redirect) Release() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.nft == nil && r.owner < 0 {
		return
	}
	r.tableUp = false // not ours to remove any more
	r.teardownLocked()
	r.log.Info("port redirect: left its table to the process that took over", "table", r.table.Name)
}

// Adopt takes over the redirect of cfg's Name that another process runs
// and hands over: owner is that process's owner socket (its OwnerFile),
// which Adopt keeps a duplicate of (the caller closes owner). It leaves
// the running table as it is when its rules are the ones Setup would
// install for cfg; otherwise it replaces the rules, in one transaction
// that keeps the chains (and so their hooks) in place; a table that is
// gone it installs again. No new connection to From is refused on the
// way. Close then removes the table, as after Setup. Without
// CAP_NET_ADMIN the error matches nat.ErrNeedsNetAdmin.
func Adopt(cfg Config, owner *os.File) (*Redirect, error) {
	cfg, err := cfg.withDefaults(true)
	if err != nil {
		return nil, err
	}
	r := newRedirect(cfg)
	err = modePortRedirect.Run(func() error {
		r.mu.Lock()
		defer r.mu.Unlock()
		if err := r.adoptLocked(owner); err != nil {
			// The owner socket and the table stay the other process's.
			r.tableUp = false
			r.teardownLocked()
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	r.log.Info("port redirect: took over the running table", "from", cfg.From, "to", cfg.To, "table", r.table.Name)
	return r, nil
}

// adoptLocked is Adopt's work, on the thread whose namespace it runs in.
// The caller holds r.mu.
func (r *Redirect) adoptLocked(owner *os.File) error {
	fd, err := unix.FcntlInt(owner.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return os.NewSyscallError("port redirect: duplicate the owner socket: fcntl F_DUPFD_CLOEXEC", err)
	}
	r.owner = fd
	sa, err := unix.Getsockname(fd)
	if su, ok := sa.(*unix.SockaddrUnix); err != nil || !ok || su.Name != ownerAddr(r.table.Name) {
		return fmt.Errorf("port redirect: the socket handed over is not the owner socket %s of table %s (%v)", ownerAddr(r.table.Name), r.table.Name, err)
	}
	r.nft, err = nftables.New(nftables.AsLasting())
	if err != nil {
		return modePortRedirect.Failed("open an nftables netlink socket (is nf_tables available?)", err)
	}
	tables, err := r.nft.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return modePortRedirect.Failed("list the nftables tables", err)
	}
	found := false
	for _, have := range tables {
		found = found || have.Name == r.table.Name
	}
	if !found {
		r.log.Warn("port redirect: the table handed over is gone; installing it again", "table", r.table.Name)
		return r.installTable()
	}
	r.tableUp = true // ours from here: Close removes it
	if r.rulesCurrent() {
		return nil
	}
	r.log.Info("port redirect: the running table's rules differ from this version's; replacing them in one transaction", "table", r.table.Name)
	r.addChainsAndRules(true)
	if err := r.nft.Flush(); err != nil {
		return modePortRedirect.Failed("replace the rules of nftables table "+r.table.Name, err)
	}
	return nil
}

// rulesCurrent reports whether both chains of the running table hold
// exactly the rules installTable would put there, as their comments say.
func (r *Redirect) rulesCurrent() bool {
	want := r.comment()
	for _, name := range []string{"prerouting", "output"} {
		rules, err := r.nft.GetRules(r.table, &nftables.Chain{Name: name, Table: r.table})
		if err != nil || len(rules) != 2 {
			return false
		}
		for _, rule := range rules {
			if c, ok := userdata.GetString(rule.UserData, userdata.TypeComment); !ok || c != want {
				return false
			}
		}
	}
	return true
}
