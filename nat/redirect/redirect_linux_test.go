package redirect

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat"
	"github.com/iketcp/iketcp/nat/nattest"
)

// The ports of the tests: FortiOS's clients dial 443, iketcp listens on
// 11443.
const (
	from = 443
	to   = 11443
)

// The lab: the test's own namespace is the host's, joined by a veth pair
// to a client's namespace.
var (
	hostV4   = netip.MustParseAddr("198.51.100.1")
	clientV4 = netip.MustParseAddr("198.51.100.2")
	hostV6   = netip.MustParseAddr("2001:db8:1::1")
	clientV6 = netip.MustParseAddr("2001:db8:1::2")
	loV4     = netip.MustParseAddr("127.0.0.1")
	loV6     = netip.IPv6Loopback()
)

// The veth pair's ends.
const (
	hostVeth   = "rdh0"
	clientVeth = "rdc0"
)

// enter moves the calling test goroutine, for the rest of its life, into
// a new network namespace with lo up (as nattest.Enter does, without the
// TUN device that this package has no use for). Its thread is never
// unlocked, so it ends with the test. Use no subtests after it.
func enter(t *testing.T) {
	t.Helper()
	nattest.SkipOrFail(t, nattest.Missing(), "to build network namespaces with nftables tables")
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Fatalf("unshare(CLONE_NEWNET): %v", err)
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
}

// newLab enters a host namespace and wires it to a client namespace,
// which it returns.
func newLab(t *testing.T) *nattest.NS {
	t.Helper()
	enter(t)
	if err := nattest.NoDAD(); err != nil {
		t.Fatal(err)
	}
	client := nattest.New(t)
	if err := client.Do(nattest.NoDAD); err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hostVeth},
		PeerName:      clientVeth,
		PeerNamespace: netlink.NsFd(client.Fd()),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	up := func(name string, v4, v6 netip.Addr) error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return errors.Join(netlink.LinkSetUp(link), nattest.AddAddr(link, v4, 24), nattest.AddAddr(link, v6, 64))
	}
	if err := up(hostVeth, hostV4, hostV6); err != nil {
		t.Fatal(err)
	}
	if err := client.Do(func() error { return up(clientVeth, clientV4, clientV6) }); err != nil {
		t.Fatal(err)
	}
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		link, err := netlink.LinkByName(hostVeth)
		if err != nil {
			t.Fatal(err)
		}
		if link.Attrs().OperState == netlink.OperUp {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatalf("%s stays %s", hostVeth, link.Attrs().OperState)
		}
	}
	return client
}

// start runs Setup in the calling thread's namespace and closes the
// Redirect at the test's end.
func start(t *testing.T, cfg Config) *Redirect {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = nattest.Logger(t)
	}
	r, err := Setup(cfg)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

// listen listens on a:port in the calling thread's namespace until the
// test's end.
func listen(t *testing.T, a netip.Addr, port uint16) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, port)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// dialer dials in a namespace: the test's own (nil) or another.
type dialer struct {
	name string
	ns   *nattest.NS
}

func (d dialer) dial(to netip.AddrPort) (net.Conn, error) {
	if d.ns == nil {
		return nattest.DialTCP(to)
	}
	var c net.Conn
	err := d.ns.Do(func() (err error) {
		c, err = nattest.DialTCP(to)
		return err
	})
	return c, err
}

// A target is a connection the tests make: from a namespace to an address
// at from, and the listener at to that the redirect is to take it to.
type target struct {
	by   dialer
	addr netip.Addr
	ln   *net.TCPListener
}

func (g target) String() string {
	return g.by.name + " to " + netip.AddrPortFrom(g.addr, from).String()
}

// expectRedirected dials g and checks that g's listener accepts the
// connection, at the dialled address and port to, from the client's own
// address and port, and that bytes pass both ways.
func expectRedirected(t *testing.T, g target) {
	t.Helper()
	c, err := g.by.dial(netip.AddrPortFrom(g.addr, from))
	if err != nil {
		t.Fatalf("%s: %v", g, err)
	}
	t.Cleanup(func() { c.Close() })
	g.ln.SetDeadline(time.Now().Add(5 * time.Second))
	s, err := g.ln.Accept()
	if err != nil {
		t.Fatalf("%s: the listener at %s accepts nothing: %v", g, g.ln.Addr(), err)
	}
	t.Cleanup(func() { s.Close() })
	if got, want := s.RemoteAddr().String(), c.LocalAddr().String(); got != want {
		t.Errorf("%s: iketcp sees the client as %s, want its own address %s", g, got, want)
	}
	if got, want := s.LocalAddr().String(), netip.AddrPortFrom(g.addr, to).String(); got != want {
		t.Errorf("%s: accepted at %s, want %s", g, got, want)
	}
	if got, want := c.RemoteAddr().String(), netip.AddrPortFrom(g.addr, from).String(); got != want {
		t.Errorf("%s: the client sees the server as %s, want %s", g, got, want)
	}
	exchange(t, g.String(), c, s)
}

// exchange sends a line each way between a and b.
func exchange(t *testing.T, what string, a, b net.Conn) {
	t.Helper()
	for _, p := range []struct{ from, to net.Conn }{{a, b}, {b, a}} {
		if _, err := p.from.Write([]byte("ping\n")); err != nil {
			t.Fatalf("%s: write: %v", what, err)
		}
		p.to.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(p.to).ReadString('\n')
		if err != nil || line != "ping\n" {
			t.Fatalf("%s: read %q, %v", what, line, err)
		}
	}
}

// expectRefused dials g's address at from and wants a refusal.
func expectRefused(t *testing.T, g target) {
	t.Helper()
	c, err := g.by.dial(netip.AddrPortFrom(g.addr, from))
	if err == nil {
		c.Close()
		t.Fatalf("%s: connected, want connection refused", g)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("%s: %v, want connection refused", g, err)
	}
}

// iketcpTables lists the iketcp tables of the calling thread's namespace,
// as the kernel reports them to the nftables library.
func iketcpTables(t *testing.T) []string {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tables, err := c.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tb := range tables {
		if strings.HasPrefix(tb.Name, "iketcp") {
			names = append(names, tb.Name)
		}
	}
	return names
}

// expectTables fails the test unless the namespace's iketcp tables are
// want.
func expectTables(t *testing.T, what string, want ...string) {
	t.Helper()
	got := iketcpTables(t)
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("%s: iketcp tables %q, want %q", what, got, want)
	}
}

// expectOwnerFree fails the test if the owner socket of table is held in
// the calling thread's namespace.
func expectOwnerFree(t *testing.T, what, table string) {
	t.Helper()
	fd, err := takeOwnerSocket(table)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	unix.Close(fd)
}

// TestRedirect checks both paths of the redirect, IPv4 and IPv6: the
// host's own connections to itself (output) and a client's over a veth
// pair (prerouting); that it keeps the dialled address and the client's;
// that it leaves other destinations alone; and that Close takes it back.
func TestRedirect(t *testing.T) {
	client := newLab(t)
	host := dialer{name: "the host", ns: nil}
	remote := dialer{name: "a client", ns: client}
	at4, at6 := listen(t, hostV4, to), listen(t, hostV6, to)
	targets := []target{
		{host, loV4, listen(t, loV4, to)},
		{host, loV6, listen(t, loV6, to)},
		{host, hostV4, at4},
		{host, hostV6, at6},
		{remote, hostV4, at4},
		{remote, hostV6, at6},
	}
	// Another host's port: a listener at its to must not get what the
	// host dials to its from.
	var elsewhere []target
	for _, a := range []netip.Addr{clientV4, clientV6} {
		var ln *net.TCPListener
		err := client.Do(func() (err error) {
			ln, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, to)))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		elsewhere = append(elsewhere, target{host, a, ln})
	}
	for _, g := range append(targets, elsewhere...) {
		expectRefused(t, g)
	}

	r := start(t, Config{From: from, To: to, Logger: nattest.Logger(t)})
	if r.Table() != DefaultTable {
		t.Errorf("Table() = %s", r.Table())
	}
	expectTables(t, "after Setup", DefaultTable)
	for _, g := range targets {
		expectRedirected(t, g)
	}
	for _, g := range elsewhere {
		expectRefused(t, g)
	}

	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	expectTables(t, "after Close")
	expectOwnerFree(t, "after Close", DefaultTable)
	for _, g := range targets {
		expectRefused(t, g)
	}
	if err := r.Close(); err != nil {
		t.Errorf("a second Close: %v", err)
	}
}

// requireNft skips (or under CI=true fails) a test that prints the table
// with nft, where it is missing.
func requireNft(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		nattest.SkipOrFail(t, []string{"the nft command (Debian package nftables)"}, "to print the table")
	}
}

// TestRedirectRules checks the table as nft prints it.
func TestRedirectRules(t *testing.T) {
	requireNft(t)
	enter(t)
	r := start(t, Config{From: from, To: to, Name: "rules"})
	out, err := exec.Command("nft", "list", "table", "inet", r.Table()).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list table: %v\n%s", err, out)
	}
	t.Logf("nft list table inet %s:\n%s", r.Table(), out)
	got := string(out)
	for _, want := range []string{
		"table inet iketcp_redirect_rules {",
		"chain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n" +
			"\t\tmeta nfproto ipv4 tcp dport 443 fib daddr type local dnat ip to :11443 comment \"iketcp: ike-tcp-port 443 to 11443\"\n" +
			"\t\tmeta nfproto ipv6 tcp dport 443 fib daddr type local dnat ip6 to :11443 comment \"iketcp: ike-tcp-port 443 to 11443\"\n\t}",
		"chain output {\n\t\ttype nat hook output priority -100; policy accept;\n" +
			"\t\tmeta nfproto ipv4 tcp dport 443 fib daddr type local dnat ip to :11443 comment \"iketcp: ike-tcp-port 443 to 11443\"\n" +
			"\t\tmeta nfproto ipv6 tcp dport 443 fib daddr type local dnat ip6 to :11443 comment \"iketcp: ike-tcp-port 443 to 11443\"\n\t}",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("missing:\n%s", want)
		}
	}
}

// crash starts a child process that sets up the redirect of name in the
// calling thread's namespace (os/exec forks from the locked thread), and
// returns a function that kills it with SIGKILL, as a crash would, and
// waits for it.
func crash(t *testing.T, name string) (kill func()) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=443 11443 "+name)
	cmd.Stderr = logWriter{t}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	kill = func() {
		once.Do(func() {
			cmd.Process.Kill()
			cmd.Wait()
			stdin.Close()
		})
	}
	t.Cleanup(kill)
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if line != "ready\n" {
		t.Fatalf("the child did not set up: %q, %v", line, err)
	}
	return kill
}

// logWriter writes a child's output to the test's log.
type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log("child: " + strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// TestRedirectStaleTable leaves behind what a crashed run leaves, its
// table, and checks that Setup and Cleanup remove it; while that run
// lives, both refuse to touch its table.
func TestRedirectStaleTable(t *testing.T) {
	enter(t)
	ln := listen(t, loV4, to)
	lo := target{dialer{name: "the host"}, loV4, ln}
	const table = DefaultTable + "_stale"
	cfg := Config{From: from, To: to, Name: "stale", Logger: nattest.Logger(t)}

	kill := crash(t, "stale")
	expectTables(t, "the child's Setup", table)
	expectRedirected(t, lo)
	// Alive, it owns its table: neither Setup nor Cleanup touch it.
	if _, err := Setup(cfg); !errors.Is(err, ErrInUse) {
		t.Fatalf("Setup while another process runs the redirect: %v, want ErrInUse", err)
	} else {
		t.Logf("Setup while another process runs the redirect: %v", err)
	}
	if err := Cleanup(cfg); !errors.Is(err, ErrInUse) {
		t.Fatalf("Cleanup while another process runs the redirect: %v, want ErrInUse", err)
	}
	expectTables(t, "refusals", table)
	expectRedirected(t, lo)

	// Killed, it leaves its table, which still redirects.
	kill()
	expectTables(t, "the crash", table)
	expectRedirected(t, lo)
	r, err := Setup(cfg)
	if err != nil {
		t.Fatalf("Setup over a crashed run's table: %v", err)
	}
	expectTables(t, "Setup over the crashed run's table", table)
	expectRedirected(t, lo)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	expectTables(t, "Close")
	expectRefused(t, lo)

	kill = crash(t, "stale")
	kill()
	expectTables(t, "another crash", table)
	if err := Cleanup(Config{Name: "stale", Logger: nattest.Logger(t)}); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	expectTables(t, "Cleanup")
	expectRefused(t, lo)
	if err := Cleanup(Config{Name: "stale", Logger: nattest.Logger(t)}); err != nil {
		t.Fatalf("Cleanup with nothing to clean: %v", err)
	}
	expectOwnerFree(t, "Cleanup", table)

	// A table of the name that no one owns, whatever it holds, is stale
	// too: one made by hand, with a chain of its own.
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tb := c.AddTable(&nftables.Table{Name: table, Family: nftables.TableFamilyINet})
	c.AddChain(&nftables.Chain{Name: "by-hand", Table: tb})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	start(t, cfg)
	expectRedirected(t, lo)
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, ch := range chains {
		if ch.Table.Name == table {
			names = append(names, ch.Name)
		}
	}
	if strings.Join(names, " ") != "prerouting output" {
		t.Errorf("the table's chains after Setup over one made by hand: %q, want prerouting and output alone", names)
	}
}

// TestRedirectSecondInstance runs Setup twice with one Name in one
// process: the second refuses, and the first goes on; another Name
// redirects another port beside it.
func TestRedirectSecondInstance(t *testing.T) {
	enter(t)
	lo := target{dialer{name: "the host"}, loV4, listen(t, loV4, to)}
	cfg := Config{From: from, To: to, Name: "twice", Logger: nattest.Logger(t)}
	first := start(t, cfg)
	_, err := Setup(cfg)
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "ss -xap | grep @iketcp/nftables/iketcp_redirect_twice shows") {
		t.Fatalf("a second Setup of the Name: %v, want ErrInUse that says how to find the owner", err)
	}
	t.Logf("a second Setup of the Name: %v", err)
	if err := Cleanup(cfg); !errors.Is(err, ErrInUse) {
		t.Fatalf("Cleanup of a running Name: %v, want ErrInUse", err)
	}
	expectTables(t, "the refusals", "iketcp_redirect_twice")
	expectRedirected(t, lo)

	// Another Name, another port.
	other := start(t, Config{From: 8443, To: to, Name: "other", Logger: nattest.Logger(t)})
	expectTables(t, "two Names", "iketcp_redirect_twice", "iketcp_redirect_other")
	c, err := nattest.DialTCP(netip.AddrPortFrom(loV4, 8443))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	lo.ln.SetDeadline(time.Now().Add(5 * time.Second))
	s, err := lo.ln.Accept()
	if err != nil {
		t.Fatalf("the listener did not get the connection to 8443: %v", err)
	}
	defer s.Close()
	if s.RemoteAddr().String() != c.LocalAddr().String() {
		t.Errorf("the connection to 8443 came from %s, want %s", s.RemoteAddr(), c.LocalAddr())
	}
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}

	// Once the first closes, the Name is free.
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	start(t, cfg)
	expectRedirected(t, lo)
}

// TestRedirectNeedsNetAdmin drops CAP_NET_ADMIN from a thread of its own
// and checks that every way in names the capability and the way around
// it.
func TestRedirectNeedsNetAdmin(t *testing.T) {
	nattest.SkipOrFail(t, nattest.Missing(), "to drop CAP_NET_ADMIN in a namespace of its own")
	cfg := Config{From: from, To: to, Logger: nattest.Logger(t)}
	var errs []error
	err := nattest.WithoutNetAdmin(func() error {
		_, err := Setup(cfg)
		errs = append(errs, err, Cleanup(cfg))
		// The kernel's own refusal, past the up-front check.
		r := newRedirect(cfg)
		errs = append(errs, r.start())
		if r.nft != nil || r.owner >= 0 {
			t.Error("the refused setup left its sockets open")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for k, e := range errs {
		if e == nil || !errors.Is(e, nat.ErrNeedsNetAdmin) || !strings.Contains(e.Error(), "CAP_NET_ADMIN") || !strings.Contains(e.Error(), "--redirect none") {
			t.Errorf("error %d: %v, want one that matches nat.ErrNeedsNetAdmin and says what to do", k, e)
		}
	}
	t.Logf("without CAP_NET_ADMIN: %v", errors.Join(errs...))
}

// TestRedirectFailedSetupUndoes fails Setup after each thing it installs
// in turn, and checks that it leaves nothing behind.
func TestRedirectFailedSetupUndoes(t *testing.T) {
	enter(t)
	lo := target{dialer{name: "the host"}, loV4, listen(t, loV4, to)}
	cfg := Config{From: from, To: to, Name: "undo", Logger: nattest.Logger(t)}
	steps := nattest.CheckUndo(t, func() (io.Closer, error) { return Setup(cfg) }, func(step string) {
		expectTables(t, "a failure after "+step)
		expectOwnerFree(t, "a failure after "+step, cfg.Table())
		expectRefused(t, lo)
	})
	if len(steps) != 2 {
		t.Errorf("want 2 steps: the owner socket, the table")
	}
}

// TestRedirectConcurrentClose, for the race detector: Close from many
// goroutines at once removes the table once, and each returns nil.
func TestRedirectConcurrentClose(t *testing.T) {
	enter(t)
	r := start(t, Config{From: from, To: to, Name: "race", Logger: nattest.Logger(t)})
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for k := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[k] = r.Close()
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	expectTables(t, "concurrent Closes")
}

// rootNetns is the namespace the test binary started in, read before any
// test ran.
var rootNetns = netnsOfThread()

func netnsOfThread() string {
	s, _ := os.Readlink("/proc/thread-self/ns/net")
	return s
}

// TestRedirectNotInRootNamespace, last of this file, makes sure that the
// tests never touched the namespace the test binary started in.
func TestRedirectNotInRootNamespace(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if rootNetns == "" || netnsOfThread() != rootNetns {
		t.Fatal("this test's thread is not in the namespace the process started in")
	}
	nattest.SkipOrFail(t, nattest.Missing(), "to read the root namespace's nftables tables")
	for _, name := range iketcpTables(t) {
		if strings.HasPrefix(name, DefaultTable) {
			t.Errorf("a table of the tests' in the root namespace: %s", name)
		}
	}
	for _, name := range []string{"", "rules", "stale", "twice", "other", "undo", "race"} {
		expectOwnerFree(t, "the root namespace", Config{Name: name}.Table())
	}
}

// TestRedirectAdopt hands a running redirect over as an upgrade does: a
// second Redirect adopts the table with the owner socket, the first lets
// go; the table stays in all along, the Name stays in use all along, a
// connection made before the hand-over keeps working after it, and the
// adopter's Close removes the table. An adopter of a changed port replaces
// the rules in place; a socket that is not the owner is refused and
// changes nothing.
func TestRedirectAdopt(t *testing.T) {
	enter(t)
	lo := target{dialer{name: "the host"}, loV4, listen(t, loV4, to)}
	cfg := Config{From: from, To: to, Name: "up", Logger: nattest.Logger(t)}
	old := start(t, cfg)

	// Before the hand-over: a connection through the redirect.
	c, err := nattest.DialTCP(netip.AddrPortFrom(loV4, from))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	lo.ln.SetDeadline(time.Now().Add(5 * time.Second))
	s, err := lo.ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	// Not the owner socket: refused, nothing changed.
	other, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	wrong := os.NewFile(uintptr(other), "not-the-owner")
	if _, err := Adopt(cfg, wrong); err == nil || !strings.Contains(err.Error(), "not the owner socket") {
		t.Fatalf("Adopt of a socket that is not the owner: %v", err)
	}
	wrong.Close()
	expectTables(t, "a refused Adopt", "iketcp_redirect_up")

	f, err := old.OwnerFile()
	if err != nil {
		t.Fatal(err)
	}
	adopted, err := Adopt(cfg, f)
	f.Close()
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	t.Cleanup(func() { adopted.Close() })
	old.Release()
	if err := old.Close(); err != nil {
		t.Fatalf("Close after Release: %v", err)
	}
	expectTables(t, "after the hand-over", "iketcp_redirect_up")
	if err := Cleanup(cfg); !errors.Is(err, ErrInUse) {
		t.Fatalf("Cleanup after the hand-over: %v, want ErrInUse: the adopter holds the owner socket", err)
	}
	exchange(t, "the connection made before the hand-over", c, s)
	expectRedirected(t, lo)

	// A second hand-over to a changed port: the rules are replaced in the
	// chains that stay.
	moved := listen(t, loV4, to+1)
	f, err = adopted.OwnerFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg2 := cfg
	cfg2.To = to + 1
	again, err := Adopt(cfg2, f)
	f.Close()
	if err != nil {
		t.Fatalf("Adopt with another port: %v", err)
	}
	t.Cleanup(func() { again.Close() })
	adopted.Release()
	exchange(t, "the connection made before both hand-overs", c, s)
	c2, err := nattest.DialTCP(netip.AddrPortFrom(loV4, from))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	moved.SetDeadline(time.Now().Add(5 * time.Second))
	s2, err := moved.Accept()
	if err != nil {
		t.Fatalf("after the port changed, the new port's listener accepts nothing: %v", err)
	}
	s2.Close()

	if err := again.Close(); err != nil {
		t.Fatal(err)
	}
	expectTables(t, "after the adopter's Close")
	expectOwnerFree(t, "after the adopter's Close", "iketcp_redirect_up")
}
