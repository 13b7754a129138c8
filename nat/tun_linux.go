package nat

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/songgao/water"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// What transparent mode and fake-TCP mode share: the TUN device and its
// batch-shaped Read and Write, the capability check, the errors of a setup
// step, and the removal of a device that a crashed run left.

// batchSize is what BatchSize reports: the TUN device queues up to 500
// packets, and 64 per call keeps a Read's buffers at 4 MiB.
const batchSize = 64

// in6AddrGenModeNone keeps the kernel from giving the TUN device an IPv6
// link-local address, which would make it send router solicitations and
// multicast listener reports into the device.
const in6AddrGenModeNone = 1

// testHookInstalled, if set, runs after each thing a setup installs; an
// error from it fails the setup there. Tests use it to check the undoing.
var testHookInstalled func(what string) error

// installed reports a thing that a setup installed to testHookInstalled.
func installed(what string) error {
	if testHookInstalled == nil {
		return nil
	}
	return testHookInstalled(what)
}

// Errors of Read and Write, allocated once so that the calls never
// allocate.
var (
	errShortSizes = errors.New("nat: Read needs len(sizes) >= len(bufs)")
	errOffset     = errors.New("nat: a buffer has no room after the offset")
)

// mode is the mode a setup works for, as its errors and log lines name it.
type mode struct {
	name string // "transparent mode", as a sentence starts
	// needsNetAdmin is the error for a missing CAP_NET_ADMIN; errors.Is
	// matches it with ErrNeedsNetAdmin.
	needsNetAdmin error
}

var (
	modeTransparent = mode{"transparent mode", ErrNeedsNetAdmin}
	modeFakeTCP     = mode{"fake-TCP mode", errFakeTCPNeedsNetAdmin}
)

// netAdmin wraps the error of a step: EPERM (as in a user namespace that
// does not own the network namespace) as the mode's CAP_NET_ADMIN error.
func (m mode) netAdmin(what string, err error) error {
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%w: %s: %v", m.needsNetAdmin, what, err)
	}
	return fmt.Errorf("%s: %s: %w", m.name, what, err)
}

// checkNetAdmin fails with the mode's CAP_NET_ADMIN error when the calling
// thread lacks CAP_NET_ADMIN in its effective set. If the set cannot be
// read, the kernel's own EPERM will tell later.
func (m mode) checkNetAdmin() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return nil
	}
	if data[unix.CAP_NET_ADMIN/32].Effective&(1<<(unix.CAP_NET_ADMIN%32)) == 0 {
		return m.needsNetAdmin
	}
	return nil
}

// gone reports whether a removal failed only because the object is
// already gone.
func gone(err error) bool {
	var notFound netlink.LinkNotFoundError
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENODEV) || errors.As(err, &notFound)
}

// setSysctl writes a sysctl of the calling thread's network namespace;
// key uses slashes (net/ipv4/conf/NAME/rp_filter).
func setSysctl(key, value string) error {
	return os.WriteFile("/proc/sys/"+key, []byte(value), 0)
}

// tunDev is an open TUN device: its descriptor and the state behind the
// batch-shaped Read that Interceptor and FakeTCPNet share.
type tunDev struct {
	file *os.File        // the TUN device, non-blocking: waits go to the netpoller
	raw  syscall.RawConn // file's, for read's batches
	// closed is set first thing in Close, so that a Read woken by the
	// device's removal reports net.ErrClosed.
	closed atomic.Bool

	// rmu serializes read. The r fields carry one call's arguments to, and
	// results from, readFn (readBatch), built once so that read does not
	// allocate a closure.
	rmu    sync.Mutex
	rbufs  [][]byte
	rsizes []int
	roff   int
	rn     int
	rerr   error
	readFn func(fd uintptr) bool
}

// open creates the TUN device name and readies d to read and write it.
func (d *tunDev) open(m mode, name string) error {
	f, err := openTUN(m, name)
	if err != nil {
		return err
	}
	d.file = f
	if d.raw, err = f.SyscallConn(); err != nil {
		return fmt.Errorf("%s: TUN device %s: %w", m.name, name, err)
	}
	d.readFn = d.readBatch
	return nil
}

// read is Read of Interceptor and FakeTCPNet.
func (d *tunDev) read(bufs [][]byte, sizes []int, offset int) (n int, err error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	if len(sizes) < len(bufs) {
		return 0, errShortSizes
	}
	for _, b := range bufs {
		if offset < 0 || offset >= len(b) {
			return 0, errOffset
		}
	}
	if d.raw == nil {
		return 0, net.ErrClosed
	}
	d.rmu.Lock()
	defer d.rmu.Unlock()
	d.rbufs, d.rsizes, d.roff, d.rn, d.rerr = bufs, sizes, offset, 0, nil
	err = d.raw.Read(d.readFn)
	n, rerr := d.rn, d.rerr
	d.rbufs, d.rsizes, d.rerr = nil, nil, nil // keep no reference to the caller's buffers
	if err == nil {
		err = rerr
	}
	if err != nil && (d.closed.Load() || errors.Is(err, os.ErrClosed)) {
		err = net.ErrClosed
	}
	return n, err
}

// readBatch is readFn: it reads packets until the batch is full or none
// is queued, and asks the netpoller to wait only while it has none.
func (d *tunDev) readBatch(fd uintptr) bool {
	for d.rn < len(d.rbufs) {
		m, err := unix.Read(int(fd), d.rbufs[d.rn][d.roff:])
		switch err {
		case nil:
			d.rsizes[d.rn] = m
			d.rn++
		case unix.EINTR:
		case unix.EAGAIN:
			return d.rn > 0
		default:
			d.rerr = err
			return true
		}
	}
	return true
}

// write is Write of Interceptor and FakeTCPNet.
func (d *tunDev) write(bufs [][]byte, offset int) (n int, err error) {
	for _, b := range bufs {
		if offset < 0 || offset > len(b) {
			return n, errOffset
		}
		if d.file == nil {
			return n, net.ErrClosed
		}
		if _, err := d.file.Write(b[offset:]); err != nil {
			if d.closed.Load() || errors.Is(err, os.ErrClosed) {
				return n, net.ErrClosed
			}
			return n, err
		}
		n++
	}
	return n, nil
}

// openTUN creates the TUN device (IFF_TUN|IFF_NO_PI, not persistent) and
// returns its non-blocking descriptor.
func openTUN(m mode, name string) (*os.File, error) {
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return nil, fmt.Errorf("%s needs the TUN driver, and %w: load it (modprobe tun) or, in a container, pass the device in", m.name, err)
	}
	// water opens the device without close-on-exec: hold off forks until
	// it is set, so that no child process keeps the device alive. (When
	// its ioctl fails, water leaks the descriptor; the checks before this
	// make that rare, and the process usually exits on the error.)
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	ifce, err := water.New(water.Config{
		DeviceType:             water.TUN,
		PlatformSpecificParams: water.PlatformSpecificParams{Name: name},
	})
	if err != nil {
		switch {
		case errors.Is(err, unix.EBUSY):
			return nil, fmt.Errorf("%s: TUN device %s is busy: another process holds it; choose another device name", m.name, name)
		case errors.Is(err, unix.EACCES):
			return nil, fmt.Errorf("%s: open /dev/net/tun: %w (CAP_NET_ADMIN does not override its file mode: let this user read and write it, as mode 0666 does)", m.name, err)
		}
		return nil, m.netAdmin(fmt.Sprintf("create TUN device %s", name), err)
	}
	f, ok := ifce.ReadWriteCloser.(*os.File)
	if !ok {
		ifce.Close()
		return nil, fmt.Errorf("%s: TUN device %s: unexpected %T", m.name, name, ifce.ReadWriteCloser)
	}
	// Not f.Fd(), which would make the descriptor blocking.
	raw, err := f.SyscallConn()
	if err == nil {
		err = raw.Control(func(fd uintptr) { unix.CloseOnExec(int(fd)) })
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: TUN device %s: %w", m.name, name, err)
	}
	return f, nil
}

// findStaleTUN looks for a device called name that a crashed run may have
// left: it returns nil if there is none, and fails if there is one that
// is not a TUN device, which is not iketcp's (and then nothing is
// touched).
func findStaleTUN(h *netlink.Handle, m mode, name string) (netlink.Link, error) {
	link, err := h.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		return nil, nil
	case err != nil:
		return nil, m.netAdmin(fmt.Sprintf("look for a device named %s", name), err)
	case link.Type() != "tuntap":
		return nil, fmt.Errorf("%s: a %s device named %s exists and is not iketcp's: remove it, or choose another TUN device name", m.name, link.Type(), name)
	}
	return link, nil
}

// removeStaleTUN removes a device that findStaleTUN found.
func removeStaleTUN(h *netlink.Handle, m mode, link netlink.Link, log *slog.Logger) error {
	name := link.Attrs().Name
	if t, ok := link.(*netlink.Tuntap); ok && t.NonPersist {
		// A device without the persist flag lives only while a process
		// holds it open.
		log.Warn(m.name+": removing a TUN device that a running process still holds: is another iketcp running with the same device name?", "device", name)
	}
	if err := h.LinkDel(link); err != nil && !gone(err) {
		return m.netAdmin(fmt.Sprintf("remove stale TUN device %s", name), err)
	}
	log.Warn(m.name+": removed a TUN device that an earlier run left", "device", name)
	return nil
}
