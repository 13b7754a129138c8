package lab

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Privileges runs an iketcp instance as an ordinary user, under setpriv
// (util-linux), with only the capabilities named: they are made
// inheritable and ambient, so that they survive the exec into iketcp, and
// nothing else is.
type Privileges struct {
	// UID is the user (and group) to run as. 0 keeps root's user, with
	// the bounding set cut to Caps, so that root too holds only those:
	// for a device node only root may open (a /dev/net/tun of mode 0600).
	UID int
	// Caps are capabilities(7) names without the "cap_" prefix, e.g.
	// "net_admin", "net_bind_service".
	Caps []string
}

func (p *Privileges) String() string {
	caps := "no capabilities"
	if len(p.Caps) > 0 {
		caps = "cap_" + strings.Join(p.Caps, ",cap_")
	}
	return fmt.Sprintf("uid %d, %s", p.UID, caps)
}

// user is the setpriv arguments that only change the user.
func (p *Privileges) user() []string {
	id := strconv.Itoa(p.UID)
	return []string{"--reuid=" + id, "--regid=" + id, "--clear-groups"}
}

// setprivArgs are the whole setpriv command line before the program.
func (p *Privileges) setprivArgs() []string {
	caps := "-all"
	for _, c := range p.Caps {
		caps += ",+" + c
	}
	args := append(p.user(), "--inh-caps="+caps)
	if p.UID == 0 {
		return append(args, "--bounding-set="+caps)
	}
	if len(p.Caps) > 0 {
		args = append(args, "--ambient-caps="+caps)
	}
	return args
}

// home makes a directory of the user's own, mode 0700, under the system's
// temporary directory (unix socket paths must be short), with a copy of
// binary in it: the user's control socket goes there, and the test
// binary's own directory is not the user's to enter. The lab removes it
// on Close.
func (l *Lab) home(p *Privileges, name, binary string) (dir, bin string, err error) {
	if p.UID < 0 {
		return "", "", fmt.Errorf("privileges: uid %d", p.UID)
	}
	dir, err = os.MkdirTemp("", "iketcp-"+l.Name+"-"+name+"-")
	if err != nil {
		return "", "", err
	}
	if err := l.onClose(func() error { return os.RemoveAll(dir) }); err != nil {
		os.RemoveAll(dir)
		return "", "", err
	}
	bin = filepath.Join(dir, "iketcp")
	if err := copyFile(binary, bin, 0o755); err != nil {
		return "", "", err
	}
	for _, path := range []string{dir, bin} {
		if err := os.Chown(path, p.UID, p.UID); err != nil {
			return "", "", err
		}
	}
	return dir, bin, nil
}

func copyFile(from, to string, mode os.FileMode) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// setprivPath returns the path of util-linux's setpriv.
func setprivPath() (string, error) { return mustFaultTool("setpriv") }

// StartIketcpAs is StartIketcp as an ordinary user with only the
// capabilities of as: its control socket and a copy of binary live in a
// directory of that user's own.
func (l *Lab) StartIketcpAs(ctx context.Context, ns *Namespace, binary, name string, as *Privileges, args ...string) (*Iketcp, error) {
	dir, bin, err := l.home(as, ns.Role+"-"+name, binary)
	if err != nil {
		return nil, err
	}
	return l.startIketcpAs(ctx, ns, bin, filepath.Join(dir, "control.sock"), l.filePath(ns.Role+"-"+name, ".log"), args, as)
}

// TUNPrivileges is who runs a mode that opens /dev/net/tun with caps: an
// ordinary user where the device node lets others read and write it
// (Debian's default, 0666), else root's user with only caps (a node of
// mode 0600, which CAP_NET_ADMIN does not override).
func TUNPrivileges(uid int, caps ...string) *Privileges {
	if fi, err := os.Stat("/dev/net/tun"); err == nil && fi.Mode().Perm()&0o006 == 0o006 {
		return &Privileges{UID: uid, Caps: caps}
	}
	return &Privileges{UID: 0, Caps: caps}
}
