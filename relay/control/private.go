package control

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// Modes of what Listen creates. The directory is private to its owner:
// the reading side refuses sockets that are not owned by its effective uid
// anyway, so group access (for an admin group on /run/iketcp) would only
// let the group connect with other tools; admins run `sudo iketcp status`.
const (
	dirMode    fs.FileMode = 0o700
	socketMode fs.FileMode = 0o600
)

// elsewhere is the advice every refusal ends with.
const elsewhere = "pass --control in a directory of your own"

// makeDir creates dir, its last element only, with dirMode. An existing
// dir is left as it is, for checkDir to judge: nothing is created through
// a symlink (mkdir(2) does not follow one in the last element), and no
// parent is created with modes of our choosing under someone else's tree.
func makeDir(dir string, log *slog.Logger) error {
	err := os.Mkdir(dir, dirMode)
	switch {
	case err == nil:
		log.Debug("created control directory", "dir", dir, "mode", dirMode)
		return nil
	case errors.Is(err, fs.ErrExist):
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("control directory %s cannot be created: its parent %s does not exist (create it, or %s)", dir, filepath.Dir(dir), elsewhere)
	default:
		return fmt.Errorf("control directory: %w (%s)", err, elsewhere)
	}
}

// checkDir returns an error unless dir is a directory (not a symlink to
// one) owned by the effective uid and writable by no one else: only then
// can nobody else plant, replace or remove a socket in it.
func checkDir(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("control directory: %w", err)
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("control directory %s is a symlink: remove it, or %s", dir, elsewhere)
	case !fi.IsDir():
		return fmt.Errorf("control directory %s is not a directory: remove it, or %s", dir, elsewhere)
	}
	if err := checkOwner("control directory", dir, fi); err != nil {
		return err
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		return fmt.Errorf("control directory %s is writable by group or others (mode %04o): run chmod go-w %s, or %s", dir, uint32(perm), dir, elsewhere)
	}
	return nil
}

// checkOwner returns an error unless fi, the Lstat of the thing at path,
// is owned by the effective uid.
func checkOwner(what, path string, fi fs.FileInfo) error {
	uid, err := fileOwner(fi)
	if err != nil {
		return fmt.Errorf("%s %s: %w", what, path, err)
	}
	if euid := os.Geteuid(); uid != euid {
		return fmt.Errorf("%s %s is owned by uid %d, not you (uid %d): remove it, or %s", what, path, uid, euid, elsewhere)
	}
	return nil
}

// checkSocket returns an error unless path is a socket (not a symlink to
// one) owned by the effective uid.
func checkSocket(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return fmt.Errorf("no iketcp instance answers on %s: %w", path, err)
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("control socket %s is a symlink: remove it, or %s", path, elsewhere)
	case fi.Mode().Type() != fs.ModeSocket:
		return fmt.Errorf("control socket %s is not a socket: pass the --control of a running iketcp", path)
	}
	return checkOwner("control socket", path, fi)
}

// checkPeer returns an error unless the process that answers on c runs as
// the effective uid. The file checks come first and give the clearer
// message; this one holds even if the socket was swapped after them.
// Where the system cannot tell (peerUID's ok is false), the file checks
// stand alone.
func checkPeer(c net.Conn, path string) error {
	sc, isSys := c.(syscall.Conn)
	if !isSys {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	uid, ok, err := peerUID(rc)
	if err != nil {
		return fmt.Errorf("control socket %s: reading the credentials of its server: %w", path, err)
	}
	if euid := os.Geteuid(); ok && uid != euid {
		return fmt.Errorf("control socket %s is served by a process of uid %d, not you (uid %d): remove the socket, or %s", path, uid, euid, elsewhere)
	}
	return nil
}

// removeStale removes a socket left at path by a crashed instance. A
// socket that a live instance answers on, or anything at path that is
// not a socket, is an error: neither is ours to remove.
func removeStale(path string, log *slog.Logger) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("control socket %s: something that is not a socket is in the way: remove it, or choose another --control path", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("control socket %s is in use by another running iketcp: give this instance its own --control path", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing stale control socket: %w", err)
	}
	log.Info("replaced a stale control socket", "path", path)
	return nil
}

// listenPrivate listens on path with the socket file created at
// socketMode.
//
// The umask is not touched: it is per process, and even a umask set on a
// locked OS thread is shared by every thread of the Go runtime (they share
// one fs_struct, CLONE_FS), so it would race with any goroutine creating
// files meanwhile. Instead presetMode sets the mode of the socket before
// bind(2): on Linux, bind gives the new file the mode of the unbound
// socket's inode, less the umask. Where the system does not do that, or
// the umask took more than it should, chmod fixes the mode right after
// bind; the window that leaves is harmless, because the socket sits in a
// directory that checkDir has found nobody else can enter.
func listenPrivate(path string, log *slog.Logger) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		if cerr := rc.Control(func(fd uintptr) { err = presetMode(fd, socketMode) }); cerr != nil {
			return cerr
		}
		return err
	}}
	ln, err := lc.Listen(context.Background(), "unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w (%s)", err, elsewhere)
	}
	fi, err := os.Lstat(path)
	if err == nil && fi.Mode().Perm() != socketMode {
		log.Debug("control socket mode set after bind", "path", path, "was", fi.Mode().Perm())
		err = os.Chmod(path, socketMode)
	}
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return ln, nil
}
