package control

import (
	"bytes"
	"context"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSocketModeSetAtBind: on Linux the socket file is born 0600 even with
// an empty umask; listenPrivate's chmod after bind (the fallback, which
// logs) is not needed.
func TestSocketModeSetAtBind(t *testing.T) {
	withUmask(t, 0)
	var logged bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logged, &slog.HandlerOptions{Level: slog.LevelDebug}))
	path := filepath.Join(t.TempDir(), "server.sock")
	ln, err := listenPrivate(path, log)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := fs.ModeSocket | socketMode; fi.Mode() != want {
		t.Fatalf("socket mode %v, want %v", fi.Mode(), want)
	}
	if logged.Len() != 0 {
		t.Fatalf("the mode was fixed after bind, not set at it: %s", logged.Bytes())
	}
}

// TestFetchRefusesServerOfAnotherUser: a socket that passes every file
// check (ours, in our private directory) but is served by a process of
// another uid, as after a swap between the checks and the connect, is
// not asked for status.
func TestFetchRefusesServerOfAnotherUser(t *testing.T) {
	requireRoot(t)
	path := filepath.Join(t.TempDir(), "server.sock")
	p := plant(t, listenWithPeerUID(t, path, otherUID))
	raw, err := Fetch(context.Background(), path)
	wantErr(t, err, "control socket "+path+" is served by a process of uid 65534, not you (uid 0)", "--control")
	if raw != nil {
		t.Fatalf("Fetch returned %q", raw)
	}
	p.wantNotAsked(t)
}

// listenWithPeerUID listens on path with a socket whose SO_PEERCRED says
// uid. The file is bound as root, so it passes every file check, but
// listen(2), where the kernel records the credentials, runs on a thread
// whose effective uid is uid: a raw setresuid changes that thread only
// (unix.Setresuid would change every thread of the process). The thread is
// never unlocked, so it ends with its goroutine.
func listenWithPeerUID(t *testing.T, path string, uid int) net.Listener {
	t.Helper()
	type result struct {
		ln  net.Listener
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		ln, err := func() (net.Listener, error) {
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return nil, err
			}
			f := os.NewFile(uintptr(fd), path)
			defer f.Close()
			if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
				return nil, err
			}
			if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
				return nil, e
			}
			if err := unix.Listen(fd, 8); err != nil {
				return nil, err
			}
			return net.FileListener(f)
		}()
		done <- result{ln, err}
	}()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.ln
}
