package tun

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/songgao/water"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
)

// batchSize is what BatchSize reports: the TUN device queues up to 500
// packets, and 64 per call keeps a Read's buffers at 4 MiB.
const batchSize = 64

// in6AddrGenModeNone keeps the kernel from giving the TUN device an IPv6
// link-local address, which would make it send router solicitations and
// multicast listener reports into the device.
const in6AddrGenModeNone = 1

// Errors of Read and Write, allocated once so that the calls never
// allocate.
var (
	errShortSizes = errors.New("nat: Read needs len(sizes) >= len(bufs)")
	errOffset     = errors.New("nat: a buffer has no room after the offset")
)

// TUN is a TUN device that Create made (IFF_TUN|IFF_NO_PI, not
// persistent): its descriptor, its link, and the state behind its
// batch-shaped Read. It knows how to remove itself: Close deletes the
// link and closes the descriptor.
type TUN struct {
	// Set by Create, read-only afterwards.
	mode setup.Mode
	name string
	nl   *netlink.Handle // the creator's, bound to the device's namespace
	file *os.File        // the TUN device, non-blocking: waits go to the netpoller
	raw  syscall.RawConn // file's, for read's batches
	link netlink.Link    // nil until found
	// closed is set first thing in Close, so that a Read woken by the
	// device's removal reports net.ErrClosed.
	closed atomic.Bool

	// rmu serializes Read. The r fields carry one call's arguments to, and
	// results from, readFn (readBatch), built once so that Read does not
	// allocate a closure.
	rmu    sync.Mutex
	rbufs  [][]byte
	rsizes []int
	roff   int
	rn     int
	rerr   error
	readFn func(fd uintptr) bool
}

var _ Device = (*TUN)(nil)

// Create creates the TUN device name in the network namespace of h (the
// calling thread's, as the TUN driver's), sets its MTU to MTU and keeps
// the kernel from giving it an IPv6 link-local address (which fails only
// where IPv6 is off, an error only if needIPv6). The device is down and
// has no address: the mode does the rest. Its errors name m, and wrap
// m.NeedsNetAdmin where a missing CAP_NET_ADMIN caused them. On failure
// it removes what it made.
//
// h must stay open until Close, which removes the device through it; the
// device does not own it.
func Create(h *netlink.Handle, m setup.Mode, name string, needIPv6 bool) (*TUN, error) {
	f, err := open(m, name)
	if err != nil {
		return nil, err
	}
	d := &TUN{mode: m, name: name, nl: h, file: f}
	d.readFn = d.readBatch
	if err := d.init(needIPv6); err != nil {
		return nil, setup.Undo(err, d.Close)
	}
	return d, nil
}

// init readies the new device d: its raw descriptor for Read, its link,
// no IPv6 address generation, the MTU.
func (d *TUN) init(needIPv6 bool) error {
	var err error
	if d.raw, err = d.file.SyscallConn(); err != nil {
		return fmt.Errorf("%s: TUN device %s: %w", d.mode.Name, d.name, err)
	}
	link, err := d.nl.LinkByName(d.name)
	if err != nil {
		return d.mode.Failed(fmt.Sprintf("find the new TUN device %s", d.name), err)
	}
	d.link = link
	// Before the device is up, so that it never gets a link-local address
	// and sends nothing of its own into the device. Where IPv6 is off
	// this fails, which matters only if IPv6 is needed.
	if err := d.nl.LinkSetIP6AddrGenMode(link, in6AddrGenModeNone); err != nil && needIPv6 {
		return d.mode.Failed(fmt.Sprintf("turn off IPv6 address generation on %s (is IPv6 disabled?)", d.name), err)
	}
	if err := d.nl.LinkSetMTU(link, MTU); err != nil {
		return d.mode.Failed(fmt.Sprintf("set MTU %d on %s", MTU, d.name), err)
	}
	return nil
}

// Name is the device's name.
func (d *TUN) Name() string { return d.name }

// Link is the device's link, for the routes and addresses the mode gives
// it.
func (d *TUN) Link() netlink.Link { return d.link }

// File is the device's descriptor. Closing it, without Close, leaves
// behind what a crashed run leaves (the kernel removes the device with
// its last descriptor); tests do that.
func (d *TUN) File() *os.File { return d.file }

// DisableRPFilter turns the device's IPv4 reverse-path filter off
// (net.ipv4.conf.NAME.rp_filter 0), which leaves it to
// net.ipv4.conf.all.rp_filter (the higher of the two counts). Where
// /proc/sys is read-only, as in many containers, it fails.
func (d *TUN) DisableRPFilter() error {
	return setup.WriteSysctl("net/ipv4/conf/"+d.name+"/rp_filter", "0")
}

// IPv6On reports whether IPv6 is on for the device: off are hosts with
// net.ipv6.conf.all and default.disable_ipv6, or booted with
// ipv6.disable=1.
func (d *TUN) IPv6On() bool {
	off, err := os.ReadFile("/proc/sys/net/ipv6/conf/" + d.name + "/disable_ipv6")
	return err == nil && strings.TrimSpace(string(off)) == "0"
}

// Up brings the device up.
func (d *TUN) Up() error {
	if err := d.nl.LinkSetUp(d.link); err != nil {
		return d.mode.Failed(fmt.Sprintf("bring %s up", d.name), err)
	}
	return nil
}

// BatchSize is the number of buffers a Read should be given.
func (d *TUN) BatchSize() int { return batchSize }

// Read reads up to len(bufs) packets, each into bufs[k][offset:], and
// their sizes into sizes[k]. It blocks until a packet is there, then takes
// as many as are queued without blocking again. A packet longer than its
// buffer is cut to the buffer's length, silently, as the device does: a
// size equal to the room in the buffer, with an IP length field beyond
// it, tells; buffers of MTU bytes after the offset never cut one. The n
// packets are valid even when err is not nil. After Close it returns
// net.ErrClosed. Calls are serialized; none allocates.
func (d *TUN) Read(bufs [][]byte, sizes []int, offset int) (n int, err error) {
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
func (d *TUN) readBatch(fd uintptr) bool {
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

// Write writes each bufs[k][offset:] as one IPv4 or IPv6 packet, which the
// kernel then receives as if from the wire. It stops at the first error,
// returning how many packets were written. Safe for concurrent use; it
// does not allocate.
func (d *TUN) Write(bufs [][]byte, offset int) (n int, err error) {
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

// Close removes the device: it deletes the link, which removes the device
// even if a child process holds a copy of the descriptor, then closes the
// descriptor, which wakes any Read with net.ErrClosed. It is idempotent,
// and works from any thread.
func (d *TUN) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	var errs []error
	if d.link != nil {
		if err := d.nl.LinkDel(d.link); err != nil && !setup.Gone(err) {
			errs = append(errs, d.mode.Failed(fmt.Sprintf("remove TUN device %s", d.name), err))
		}
	}
	if d.file != nil {
		if err := d.file.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close TUN device %s: %w", d.name, err))
		}
	}
	return errors.Join(errs...)
}

// open creates the TUN device (IFF_TUN|IFF_NO_PI, not persistent) and
// returns its non-blocking descriptor.
func open(m setup.Mode, name string) (*os.File, error) {
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return nil, fmt.Errorf("%s needs the TUN driver, and %w: load it (modprobe tun) or, in a container, pass the device in", m.Name, err)
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
			return nil, fmt.Errorf("%s: TUN device %s is busy: another process holds it; choose another device name", m.Name, name)
		case errors.Is(err, unix.EACCES):
			return nil, fmt.Errorf("%s: open /dev/net/tun: %w (CAP_NET_ADMIN does not override its file mode: let this user read and write it, as mode 0666 does)", m.Name, err)
		}
		return nil, m.Failed(fmt.Sprintf("create TUN device %s", name), err)
	}
	f, ok := ifce.ReadWriteCloser.(*os.File)
	if !ok {
		ifce.Close()
		return nil, fmt.Errorf("%s: TUN device %s: unexpected %T", m.Name, name, ifce.ReadWriteCloser)
	}
	// Not f.Fd(), which would make the descriptor blocking.
	raw, err := f.SyscallConn()
	if err == nil {
		err = raw.Control(func(fd uintptr) { unix.CloseOnExec(int(fd)) })
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: TUN device %s: %w", m.Name, name, err)
	}
	return f, nil
}

// Stale is a device that a crashed run left, as FindStale found it.
type Stale struct {
	nl   *netlink.Handle
	mode setup.Mode
	link netlink.Link
}

// FindStale looks, through h, for a device called name that a crashed run
// of m may have left: it returns nil if there is none, and fails if there
// is one that is not a TUN device, which is not iketcp's (and then nothing
// is touched). A mode looks first, and removes the rest of what the run
// left only if it may.
func FindStale(h *netlink.Handle, m setup.Mode, name string) (*Stale, error) {
	link, err := h.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		return nil, nil
	case err != nil:
		return nil, m.Failed(fmt.Sprintf("look for a device named %s", name), err)
	case link.Type() != "tuntap":
		return nil, fmt.Errorf("%s: a %s device named %s exists and is not iketcp's: remove it, or choose another TUN device name", m.Name, link.Type(), name)
	}
	return &Stale{nl: h, mode: m, link: link}, nil
}

// Remove removes the stale device, saying so in log. A nil Stale has
// nothing to remove.
func (s *Stale) Remove(log *slog.Logger) error {
	if s == nil {
		return nil
	}
	name := s.link.Attrs().Name
	if t, ok := s.link.(*netlink.Tuntap); ok && t.NonPersist {
		// A device without the persist flag lives only while a process
		// holds it open.
		log.Warn(s.mode.Name+": removing a TUN device that a running process still holds: is another iketcp running with the same device name?", "device", name)
	}
	if err := s.nl.LinkDel(s.link); err != nil && !setup.Gone(err) {
		return s.mode.Failed(fmt.Sprintf("remove stale TUN device %s", name), err)
	}
	log.Warn(s.mode.Name+": removed a TUN device that an earlier run left", "device", name)
	return nil
}
