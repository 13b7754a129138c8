package setup

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Failed returns the error of a step, what, that failed with err: EPERM
// (as in a user namespace that does not own the network namespace)
// becomes the mode's CAP_NET_ADMIN error, anything else is named with the
// mode.
func (m Mode) Failed(what string, err error) error {
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%w: %s: %v", m.NeedsNetAdmin, what, err)
	}
	return fmt.Errorf("%s: %s: %w", m.Name, what, err)
}

// Run runs f, a setup or a clean-up of m, with the calling goroutine
// locked to its thread: every netlink socket, TUN device and sysctl file
// that f opens belongs to that thread's network namespace (the
// process's, unless the caller moved its thread). It checks CAP_NET_ADMIN
// first.
func (m Mode) Run(f func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := m.CheckNetAdmin(); err != nil {
		return err
	}
	return f()
}

// CheckNetAdmin fails with the mode's CAP_NET_ADMIN error when the calling
// thread lacks CAP_NET_ADMIN in its effective set. If the set cannot be
// read, the kernel's own EPERM will tell later.
func (m Mode) CheckNetAdmin() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return nil
	}
	if data[unix.CAP_NET_ADMIN/32].Effective&(1<<(unix.CAP_NET_ADMIN%32)) == 0 {
		return m.NeedsNetAdmin
	}
	return nil
}

// Gone reports whether a removal failed only because the object is
// already gone.
func Gone(err error) bool {
	var notFound netlink.LinkNotFoundError
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENODEV) || errors.As(err, &notFound)
}

// WriteSysctl writes a sysctl of the calling thread's network namespace;
// key uses slashes (net/ipv4/conf/NAME/rp_filter).
func WriteSysctl(key, value string) error {
	return os.WriteFile("/proc/sys/"+key, []byte(value), 0)
}
