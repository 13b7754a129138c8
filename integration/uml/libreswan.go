package uml

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// HostPackages are the Debian packages the UML lab needs on the host:
// what builds the kernel, and the libraries of Debian's libreswan, which
// the guests run from the host's filesystem. libreswan itself is never
// installed (it conflicts with strongSwan's packages): EnsureLibreswan
// unpacks its .deb into the cache.
var HostPackages = []string{
	// The kernel build.
	"gcc", "make", "flex", "bison", "bc", "libc6-dev", "patch", "xz-utils", "binutils",
	// libreswan's run-time dependencies (its .deb's Depends, less what
	// the lab has already: iproute2, iptables).
	"libnss3", "libnss3-tools", "libnspr4", "libevent-core-2.1-7", "libevent-pthreads-2.1-7",
	"libldns3", "libunbound8", "libcurl3-nss", "libcap-ng0", "libaudit1", "libldap-2.5-0",
	"libcrypt1", "libpam0g", "libselinux1", "libsystemd0",
}

// hostTools are programs of HostPackages the lab runs, checked by
// MissingHostTools.
var hostTools = []string{"gcc", "make", "flex", "bison", "bc", "patch", "xz", "strip", "certutil", "apt-get", "dpkg-deb"}

// MissingHostTools lists the programs of HostPackages that are not
// installed.
func MissingHostTools() []string {
	var missing []string
	for _, t := range hostTools {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	return missing
}

// MissingHostPackages lists the HostPackages that dpkg does not have
// installed: a library pluto loads is no program MissingHostTools finds.
func MissingHostPackages() []string {
	args := append([]string{"-W", "-f", "${Package} ${db:Status-Status}\n"}, HostPackages...)
	out, _ := exec.Command("dpkg-query", args...).Output() // exits 1 when one is unknown
	installed := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		if name, status, ok := strings.Cut(line, " "); ok && status == "installed" {
			installed[strings.TrimSuffix(name, ":amd64")] = true
		}
	}
	var missing []string
	for _, p := range HostPackages {
		if !installed[p] {
			missing = append(missing, p)
		}
	}
	return missing
}

// InstallHostPackages installs HostPackages with apt-get, writing its
// output to out. It needs root.
func InstallHostPackages(ctx context.Context, out io.Writer) error {
	if out == nil {
		out = io.Discard
	}
	for _, args := range [][]string{
		{"-o", "DPkg::Lock::Timeout=120", "update"},
		append([]string{"-o", "DPkg::Lock::Timeout=120", "install", "-y", "--no-install-recommends"}, HostPackages...),
	} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		cmd.Stdout, cmd.Stderr = out, out
		cmd.WaitDelay = 5 * time.Second
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("apt-get %s: %w", strings.Join(args, " "), err)
		}
	}
	return nil
}

// Libreswan is Debian's libreswan unpacked (not installed) in the cache.
type Libreswan struct {
	// Root is the unpacked tree: Root/usr/libexec/ipsec/pluto.
	Root string
	// Version is the package's version, e.g. "4.10-2+deb12u1".
	Version string
}

// Pluto, Whack and Addconn are the paths of libreswan's programs.
func (s *Libreswan) Pluto() string { return filepath.Join(s.Root, "usr/libexec/ipsec/pluto") }

// Whack is the path of libreswan's control program.
func (s *Libreswan) Whack() string { return filepath.Join(s.Root, "usr/libexec/ipsec/whack") }

// EnsureLibreswan downloads Debian's libreswan package (apt-get download)
// and unpacks it into the cache, unless the cache holds the candidate
// version already.
func EnsureLibreswan(ctx context.Context, cacheDir string) (*Libreswan, error) {
	if cacheDir == "" {
		cacheDir = CacheDir()
	}
	version, err := candidateVersion(ctx, "libreswan")
	if err != nil {
		return nil, err
	}
	s := &Libreswan{Version: version, Root: filepath.Join(cacheDir, "libreswan-"+version)}
	if isFile(s.Pluto()) {
		return s, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, err
	}
	unlock, err := lockDir(ctx, cacheDir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if isFile(s.Pluto()) {
		return s, nil
	}
	deb, err := downloadDeb(ctx, filepath.Join(cacheDir, "src"), "libreswan", version)
	if err != nil {
		return nil, err
	}
	tmp := s.Root + ".tmp"
	os.RemoveAll(tmp)
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, tmp).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("dpkg-deb -x %s: %w: %s", deb, err, out)
	}
	if err := os.Rename(tmp, s.Root); err != nil {
		return nil, err
	}
	return s, nil
}
