//go:build unix

package control

import (
	"bufio"
	"context"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// otherUID stands for another local user: the tests run as root and chown
// what that user would have made to it.
const otherUID = 65534

// requireRoot skips t unless it runs as root, which standing in for
// another user needs; under CI=true it fails instead, where tests must not
// skip.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	msg := "needs root to stand in for another user (chown, setresuid)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + "; CI=true, so this is a failure, not a skip")
	}
	t.Skip(msg)
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// withUmask sets the process's umask for the rest of t. The tests of this
// package do not run in parallel.
func withUmask(t *testing.T, mask int) {
	old := syscall.Umask(mask)
	t.Cleanup(func() { syscall.Umask(old) })
}

// mkdir makes dir with exactly mode (no umask) owned by uid.
func mkdir(t *testing.T, dir string, mode fs.FileMode, uid int) {
	t.Helper()
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, uid, uid); err != nil {
		t.Fatal(err)
	}
}

// wantErr fails t unless err mentions every one of parts.
func wantErr(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want one that mentions %q", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Fatalf("error %q does not mention %q", err, p)
		}
	}
}

// snapshot describes dir and what is in it (names, types, modes, owners),
// to show that a refused Listen left it as it was.
func snapshot(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		uid, err := fileOwner(fi)
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s %v uid %d\n", path, fi.Mode(), uid)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// planted is a server someone else set up to feed `iketcp status` lies. It
// records the request line of every connection it accepts, in order.
type planted struct {
	ln net.Listener
	wg sync.WaitGroup

	mu       sync.Mutex // guards the following
	requests []string
}

// plant serves lies on ln until the test ends.
func plant(t *testing.T, ln net.Listener) *planted {
	p := &planted{ln: ln}
	p.wg.Add(1)
	go p.serveLies()
	t.Cleanup(func() {
		ln.Close()
		p.wg.Wait()
	})
	return p
}

// plantAt listens on path and serves lies there.
func plantAt(t *testing.T, path string) *planted {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	return plant(t, ln)
}

func (p *planted) serveLies() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		c.SetDeadline(time.Now().Add(requestTimeout))
		line, _ := bufio.NewReader(c).ReadString('\n')
		p.mu.Lock()
		p.requests = append(p.requests, strings.TrimSpace(line))
		p.mu.Unlock()
		c.Write([]byte(`{"sessions": 666}` + "\n"))
		c.Close()
	}
}

// asked returns the request lines the planted server received before
// now: it connects itself with a sentinel request and, since one goroutine
// accepts and answers connections in their order, returns once the
// sentinel is answered.
func (p *planted) asked(t *testing.T) []string {
	t.Helper()
	c, err := net.Dial("unix", p.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("sentinel\n"))
	if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	reqs := slices.Clone(p.requests)
	if len(reqs) == 0 || reqs[len(reqs)-1] != "sentinel" {
		t.Fatalf("planted server saw %q, not the sentinel last", reqs)
	}
	return reqs[:len(reqs)-1]
}

// wantNotAsked fails t if the planted server was asked for status.
func (p *planted) wantNotAsked(t *testing.T) {
	t.Helper()
	if reqs := p.asked(t); slices.Contains(reqs, "status") {
		t.Fatalf("the planted server was asked for status: %q", reqs)
	}
}

// TestListenCreatesPrivateDir is the happy path: a missing directory is
// created 0700, the socket 0600 whatever the umask, both owned by us, and
// Fetch and Sockets accept them.
func TestListenCreatesPrivateDir(t *testing.T) {
	withUmask(t, 0)
	dir := filepath.Join(t.TempDir(), "iketcp")
	path := filepath.Join(dir, "server.sock")
	s, err := Listen(path, func() any { return map[string]int{"sessions": 3} }, discard())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, c := range []struct {
		path string
		mode fs.FileMode
	}{{dir, fs.ModeDir | 0o700}, {path, fs.ModeSocket | 0o600}} {
		fi, err := os.Lstat(c.path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != c.mode {
			t.Errorf("%s: mode %v, want %v", c.path, fi.Mode(), c.mode)
		}
		if uid, _ := fileOwner(fi); uid != os.Geteuid() {
			t.Errorf("%s: owned by uid %d, want %d", c.path, uid, os.Geteuid())
		}
	}
	raw, err := Fetch(context.Background(), path)
	if err != nil || !strings.Contains(string(raw), `"sessions": 3`) {
		t.Fatalf("Fetch = %q, %v", raw, err)
	}
	if socks, err := Sockets(dir); err != nil || !slices.Equal(socks, []string{path}) {
		t.Fatalf("Sockets = %q, %v", socks, err)
	}
}

// TestListenNeedsParent: only the last element of the directory is made.
func TestListenNeedsParent(t *testing.T) {
	top := t.TempDir()
	_, err := Listen(filepath.Join(top, "a", "b", "server.sock"), func() any { return nil }, discard())
	wantErr(t, err, filepath.Join(top, "a")+" does not exist", "--control")
	if entries, _ := os.ReadDir(top); len(entries) != 0 {
		t.Fatalf("created %v", entries)
	}
}

// TestListenRefusesUnsafeDir: Listen creates and serves nothing in a
// directory another user owns or can write, or through a symlink.
func TestListenRefusesUnsafeDir(t *testing.T) {
	requireRoot(t)
	for _, c := range []struct {
		name string
		make func(t *testing.T, top string) string
		want []string
	}{
		{"owned by another user", func(t *testing.T, top string) string {
			dir := filepath.Join(top, "iketcp")
			mkdir(t, dir, 0o700, otherUID)
			return dir
		}, []string{"is owned by uid 65534, not you (uid 0): remove it, or pass --control in a directory of your own"}},
		{"writable by group", func(t *testing.T, top string) string {
			dir := filepath.Join(top, "iketcp")
			mkdir(t, dir, 0o770, 0)
			return dir
		}, []string{"is writable by group or others (mode 0770)", "chmod go-w", "--control"}},
		{"writable by others", func(t *testing.T, top string) string {
			dir := filepath.Join(top, "iketcp")
			mkdir(t, dir, 0o703, 0)
			return dir
		}, []string{"is writable by group or others (mode 0703)", "--control"}},
		{"world-writable and sticky like /tmp", func(t *testing.T, top string) string {
			dir := filepath.Join(top, "iketcp")
			mkdir(t, dir, 0o777|fs.ModeSticky, 0)
			return dir
		}, []string{"is writable by group or others (mode 0777)", "--control"}},
		{"symlink to a private directory", func(t *testing.T, top string) string {
			target := filepath.Join(top, "real")
			mkdir(t, target, 0o700, 0)
			link := filepath.Join(top, "iketcp")
			if err := os.Symlink(target, link); err != nil {
				t.Fatal(err)
			}
			return link
		}, []string{"is a symlink: remove it, or pass --control in a directory of your own"}},
		{"symlink to another user's directory", func(t *testing.T, top string) string {
			target := filepath.Join(top, "theirs")
			mkdir(t, target, 0o700, otherUID)
			link := filepath.Join(top, "iketcp")
			if err := os.Symlink(target, link); err != nil {
				t.Fatal(err)
			}
			return link
		}, []string{"is a symlink", "--control"}},
		{"dangling symlink", func(t *testing.T, top string) string {
			link := filepath.Join(top, "iketcp")
			if err := os.Symlink(filepath.Join(top, "nowhere"), link); err != nil {
				t.Fatal(err)
			}
			return link
		}, []string{"is a symlink", "--control"}},
		{"not a directory", func(t *testing.T, top string) string {
			file := filepath.Join(top, "iketcp")
			if err := os.WriteFile(file, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return file
		}, []string{"is not a directory", "--control"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			top := t.TempDir()
			dir := c.make(t, top)
			before := snapshot(t, top)
			s, err := Listen(filepath.Join(dir, "server.sock"), func() any { return nil }, discard())
			if s != nil {
				s.Close()
			}
			wantErr(t, err, append([]string{dir}, c.want...)...)
			if after := snapshot(t, top); after != before {
				t.Fatalf("Listen changed %s:\nbefore:\n%safter:\n%s", top, before, after)
			}
		})
	}
}

// TestListenKeepsWhatIsNotASocket: a file at the socket's path is not
// removed.
func TestListenKeepsWhatIsNotASocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "server.sock")
	if err := os.WriteFile(path, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Listen(path, func() any { return nil }, discard())
	wantErr(t, err, path, "not a socket", "--control")
	if b, err := os.ReadFile(path); err != nil || string(b) != "keep" {
		t.Fatalf("file at the path: %q, %v", b, err)
	}
}

// TestReadersRefuseUnsafeDir: Fetch and Sockets neither ask nor list a
// live server in a directory another user owns or can write, or behind a
// symlink.
func TestReadersRefuseUnsafeDir(t *testing.T) {
	requireRoot(t)
	for _, c := range []struct {
		name string
		make func(t *testing.T, top string) (dir, target string)
		want []string
	}{
		{"owned by another user", func(t *testing.T, top string) (string, string) {
			dir := filepath.Join(top, "iketcp")
			mkdir(t, dir, 0o700, otherUID)
			return dir, dir
		}, []string{"is owned by uid 65534, not you (uid 0): remove it, or pass --control in a directory of your own"}},
		{"writable by group", func(t *testing.T, top string) (string, string) {
			dir := filepath.Join(top, "iketcp")
			mkdir(t, dir, 0o770, 0)
			return dir, dir
		}, []string{"is writable by group or others (mode 0770)", "--control"}},
		{"writable by others", func(t *testing.T, top string) (string, string) {
			dir := filepath.Join(top, "iketcp")
			mkdir(t, dir, 0o1777, 0)
			return dir, dir
		}, []string{"is writable by group or others (mode 0777)", "--control"}},
		{"symlink", func(t *testing.T, top string) (string, string) {
			target := filepath.Join(top, "real")
			mkdir(t, target, 0o700, 0)
			link := filepath.Join(top, "iketcp")
			if err := os.Symlink(target, link); err != nil {
				t.Fatal(err)
			}
			return link, target
		}, []string{"is a symlink", "--control"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir, target := c.make(t, t.TempDir())
			p := plantAt(t, filepath.Join(target, "server.sock"))
			path := filepath.Join(dir, "server.sock")

			raw, err := Fetch(context.Background(), path)
			wantErr(t, err, append([]string{dir}, c.want...)...)
			if raw != nil {
				t.Fatalf("Fetch returned %q", raw)
			}
			socks, err := Sockets(dir)
			wantErr(t, err, append([]string{dir}, c.want...)...)
			if socks != nil {
				t.Fatalf("Sockets listed %q", socks)
			}
			if reqs := p.asked(t); len(reqs) != 0 {
				t.Fatalf("the planted server was contacted: %q", reqs)
			}
		})
	}
}

// TestReadersRefuseSocketOfAnotherUser: in a private directory of ours, a
// socket that another user owns (root could have put it there, or we are
// root and a user's socket was moved in) is neither asked nor listed; nor
// is a symlink to a socket.
func TestReadersRefuseSocketOfAnotherUser(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "server.sock")
	p := plantAt(t, path)
	if err := os.Lchown(path, otherUID, otherUID); err != nil {
		t.Fatal(err)
	}
	want := []string{"control socket " + path + " is owned by uid 65534, not you (uid 0): remove it"}

	raw, err := Fetch(context.Background(), path)
	wantErr(t, err, want...)
	if raw != nil {
		t.Fatalf("Fetch returned %q", raw)
	}
	socks, err := Sockets(dir)
	wantErr(t, err, want...)
	if socks != nil {
		t.Fatalf("Sockets listed %q", socks)
	}

	link := filepath.Join(dir, "client.sock")
	if err := os.Lchown(path, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(path, link); err != nil {
		t.Fatal(err)
	}
	raw, err = Fetch(context.Background(), link)
	wantErr(t, err, "control socket "+link+" is a symlink", "--control")
	if raw != nil {
		t.Fatalf("Fetch returned %q", raw)
	}
	if socks, err := Sockets(dir); err != nil || !slices.Equal(socks, []string{path}) {
		t.Fatalf("Sockets = %q, %v; want the socket and not the symlink", socks, err)
	}
	if reqs := p.asked(t); len(reqs) != 0 {
		t.Fatalf("the planted server was contacted: %q", reqs)
	}
}
