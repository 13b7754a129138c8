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
	"time"
	"unsafe"

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

// offloadFlags are what Options.Offload asks TUNSETOFFLOAD for: finish
// checksums, and TCP segmentation over IPv4 and IPv6. Not TUN_F_TSO_ECN
// (the stacks behind these devices never set CWR), nor UDP's
// segmentation: transparent mode, the one user of UDP here, does not ask
// for offloads. Tests make the kernel refuse with a flag it does not
// know.
var offloadFlags = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6

// maxIovecs is the kernel's UIO_MAXIOV, the most pieces of one writev.
const maxIovecs = 1024

// Errors of Read and Write, allocated once so that the calls never
// allocate.
var (
	errShortSizes = errors.New("nat: Read needs len(sizes) >= len(bufs)")
	errOffset     = errors.New("nat: a buffer has no room after the offset")
	errNoHdrRoom  = errors.New("nat: ReadOffload needs an offset of at least VirtioNetHdrLen")
	errPieces     = errors.New("nat: a packet of more pieces than one writev takes")
	errBadPacket  = errors.New("nat: an empty packet, or a piece offset outside its buffer")
)

// TUN is a TUN device that Create made (IFF_TUN|IFF_NO_PI, not
// persistent, and IFF_VNET_HDR when it offloads), or that Adopt took
// over from another process: its descriptor, its link, and the state
// behind its batch-shaped Read and Write. It knows how to remove itself:
// Close deletes the link and closes the descriptor (Release only closes
// the descriptor).
type TUN struct {
	// Set by Create, read-only afterwards.
	mode setup.Mode
	name string
	nl   *netlink.Handle // the creator's, bound to the device's namespace
	file *os.File        // the TUN device, non-blocking: waits go to the netpoller
	raw  syscall.RawConn // file's, for read's batches
	link netlink.Link    // nil until found
	// vnet: every packet read or written has a virtio-net header in
	// front, and the kernel took the offloads. offload is nil then, and
	// otherwise says why not.
	vnet    bool
	offload error
	// closed is set first thing in Close, so that a Read woken by the
	// device's removal reports net.ErrClosed.
	closed atomic.Bool

	// rmu serializes Read and ReadOffload, and guards the following. The
	// r fields carry one call's arguments to, and results from, readFn
	// (readBatch), built once so that Read does not allocate a closure.
	rmu      sync.Mutex
	rbufs    [][]byte
	rsizes   []int
	roff     int
	rn       int
	rerr     error
	rvirtio  bool // the call is ReadOffload's: headers go to the caller
	readFn   func(fd uintptr) bool
	rhdr     [VirtioNetHdrLen]byte // Read's header of the packet it reads, on a vnet device
	riov     [2]unix.Iovec
	pend     []byte   // a super-segment that Read has not yet handed out whole
	pendCut  TCPSplit // where its segments lie
	pendNext int      // the next of them to hand out

	// wmu serializes the writes of a vnet device, and guards the
	// following: one packet's pieces for writeFn (writePacket).
	wmu     sync.Mutex
	wiov    []unix.Iovec
	whdr    [VirtioNetHdrLen]byte
	werr    error
	writeFn func(fd uintptr) bool
}

var (
	_ Device        = (*TUN)(nil)
	_ OffloadDevice = (*TUN)(nil)
)

// Create creates the TUN device name in the network namespace of h (the
// calling thread's, as the TUN driver's), sets its MTU to MTU and keeps
// the kernel from giving it an IPv6 link-local address (which fails only
// where IPv6 is off, an error only if needIPv6). The device is down and
// has no address: the mode does the rest. Its errors name m, and wrap
// m.NeedsNetAdmin where a missing CAP_NET_ADMIN caused them. On failure
// it removes what it made. With opts.Offload it asks the kernel for the
// offloads, and falls back to the plain device where the kernel refuses:
// Offload says which it got.
//
// h must stay open until Close, which removes the device through it; the
// device does not own it.
func Create(h *netlink.Handle, m setup.Mode, name string, needIPv6 bool, opts Options) (*TUN, error) {
	f, vnet, why, err := openOffload(m, name, opts.Offload)
	if err != nil {
		return nil, err
	}
	d := &TUN{mode: m, name: name, nl: h, file: f, vnet: vnet, offload: why}
	d.readFn = d.readBatch
	d.writeFn = d.writePacket
	if vnet {
		d.pend = make([]byte, 0, MTU)
		d.wiov = make([]unix.Iovec, 0, 64)
	}
	if err := d.init(needIPv6); err != nil {
		return nil, setup.Undo(err, d.Close)
	}
	return d, nil
}

// openOffload opens the device, with the offloads if want and the kernel
// takes them; why says why not otherwise.
func openOffload(m setup.Mode, name string, want bool) (f *os.File, vnet bool, why error, err error) {
	if !want {
		f, err = open(m, name, 0)
		return f, false, &OffloadError{Err: ErrOffloadNotAsked}, err
	}
	f, err = open(m, name, unix.IFF_VNET_HDR)
	if errors.Is(err, unix.EINVAL) {
		// A kernel without virtio-net headers on TUN devices (before
		// 2.6.27): the plain device.
		f, err = open(m, name, 0)
		return f, false, &OffloadError{Op: "IFF_VNET_HDR", Err: unix.EINVAL}, err
	}
	if err != nil {
		return nil, false, nil, err
	}
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, false, nil, fmt.Errorf("%s: TUN device %s: %w", m.Name, name, err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.IoctlSetInt(int(fd), unix.TUNSETOFFLOAD, offloadFlags) }); err != nil {
		serr = err
	}
	if serr == nil {
		return f, true, nil, nil
	}
	// Refused: the device goes with its only descriptor, and comes back
	// plain, under the same name.
	f.Close()
	f, err = open(m, name, 0)
	return f, false, &OffloadError{Op: "TUNSETOFFLOAD", Err: serr}, err
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

// Offload is nil when the device moves packets with virtio-net headers
// and the kernel's offloads; otherwise an *OffloadError says why not.
func (d *TUN) Offload() error { return d.offload }

// Read reads up to len(bufs) packets, each into bufs[k][offset:], and
// their sizes into sizes[k]. It blocks until a packet is there, then takes
// as many as are queued without blocking again. A packet longer than its
// buffer is cut to the buffer's length, silently, as the device does: a
// size equal to the room in the buffer, with an IP length field beyond
// it, tells; buffers of MTU bytes after the offset never cut one. The n
// packets are valid even when err is not nil. After Close it returns
// net.ErrClosed. Calls are serialized; none allocates.
//
// On a device with offloads, Read hands out each super-segment the kernel
// delivers as the segments it stands for, with their own headers and
// checksums (one buffer each: what does not fit in this call's buffers
// comes first in the next call's), and finishes the checksum of a packet
// that has it unfinished: packets as a device without offloads delivers
// them. A super-segment that SplitTCP refuses is dropped.
func (d *TUN) Read(bufs [][]byte, sizes []int, offset int) (n int, err error) {
	return d.read(bufs, sizes, offset, false)
}

// ReadOffload reads as Read does, but hands out packets as the kernel
// delivers them, each with its virtio-net header in
// bufs[k][offset-VirtioNetHdrLen:offset]: see OffloadDevice. A packet
// longer than its buffer is cut, as by Read. Without offloads it returns
// Offload's error.
func (d *TUN) ReadOffload(bufs [][]byte, sizes []int, offset int) (n int, err error) {
	if !d.vnet {
		return 0, d.offload
	}
	if offset < VirtioNetHdrLen {
		return 0, errNoHdrRoom
	}
	return d.read(bufs, sizes, offset, true)
}

func (d *TUN) read(bufs [][]byte, sizes []int, offset int, virtio bool) (n int, err error) {
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
	d.rbufs, d.rsizes, d.roff, d.rn, d.rerr, d.rvirtio = bufs, sizes, offset, 0, nil, virtio
	if d.vnet {
		d.takePending()
		if d.rn == len(bufs) {
			d.rbufs, d.rsizes = nil, nil
			return d.rn, nil
		}
	}
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
		var m int
		var err error
		switch {
		case !d.vnet:
			m, err = unix.Read(int(fd), d.rbufs[d.rn][d.roff:])
		case d.rvirtio:
			m, err = unix.Read(int(fd), d.rbufs[d.rn][d.roff-VirtioNetHdrLen:])
		default:
			m, err = d.readv(fd, d.rbufs[d.rn][d.roff:])
		}
		switch err {
		case nil:
			if d.vnet {
				d.took(m - VirtioNetHdrLen)
			} else {
				d.rsizes[d.rn] = m
				d.rn++
			}
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

// readv reads one packet of a vnet device: its header into d.rhdr, the
// packet into buf.
func (d *TUN) readv(fd uintptr, buf []byte) (int, error) {
	d.riov[0].Base, d.riov[0].Len = &d.rhdr[0], VirtioNetHdrLen
	d.riov[1].Base = &buf[0]
	d.riov[1].SetLen(len(buf))
	m, _, errno := unix.Syscall(unix.SYS_READV, fd, uintptr(unsafe.Pointer(&d.riov[0])), 2)
	d.riov[1].Base = nil // keep no reference to the caller's buffer
	if errno != 0 {
		return 0, errno
	}
	return int(m), nil
}

// took accounts for a packet of m bytes (after its header) that a vnet
// device read into d.rbufs[d.rn]: ReadOffload's as it is; Read's with its
// checksum finished, or, a super-segment, kept to be handed out as
// segments. A read too short for a header is nothing.
func (d *TUN) took(m int) {
	if m < 0 {
		return
	}
	buf := d.rbufs[d.rn][d.roff:]
	m = min(m, len(buf)) // cut, as the device cuts
	if d.rvirtio {
		d.rsizes[d.rn] = m
		d.rn++
		return
	}
	var h VirtioNetHdr
	_ = h.Decode(d.rhdr[:])
	pkt := buf[:m]
	if !h.IsGSO() {
		if FinishChecksum(&h, pkt) == nil {
			d.rsizes[d.rn] = m
			d.rn++
		}
		return
	}
	cut, err := SplitTCP(&h, pkt)
	if err != nil {
		return
	}
	d.pend = append(d.pend[:0], pkt...)
	d.pendCut, d.pendNext = cut, 0
	d.takePending()
}

// takePending hands out the segments of the pending super-segment, one
// to a buffer, while there are buffers; ReadOffload's with an empty
// header.
func (d *TUN) takePending() {
	for d.pendNext < d.pendCut.Segments() && d.rn < len(d.rbufs) {
		buf := d.rbufs[d.rn]
		if d.rvirtio {
			clear(buf[d.roff-VirtioNetHdrLen : d.roff])
		}
		d.rsizes[d.rn] = d.pendCut.Put(buf[d.roff:], d.pend, d.pendNext)
		d.rn++
		d.pendNext++
	}
}

// Write writes each bufs[k][offset:] as one IPv4 or IPv6 packet, which the
// kernel then receives as if from the wire. It stops at the first error,
// returning how many packets were written. Safe for concurrent use; it
// does not allocate.
func (d *TUN) Write(bufs [][]byte, offset int) (n int, err error) {
	if d.vnet {
		return d.writeVirtio(bufs, offset)
	}
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

// writeVirtio is Write on a vnet device: each packet with an empty
// header.
func (d *TUN) writeVirtio(bufs [][]byte, offset int) (n int, err error) {
	d.wmu.Lock()
	defer d.wmu.Unlock()
	for _, b := range bufs {
		if offset < 0 || offset > len(b) {
			return n, errOffset
		}
		clear(d.whdr[:])
		d.wiov = appendIovec(appendIovec(d.wiov[:0], d.whdr[:]), b[offset:])
		if err := d.writeLocked(); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// WriteOffload writes each of pkts as one packet with its virtio-net
// header, Head and then each Bufs[k][Offset:] gathered by one writev: see
// OffloadDevice and OffloadPacket. It stops at the first error, returning
// how many packets were written. Without offloads it returns Offload's
// error. Safe for concurrent use; it does not allocate.
func (d *TUN) WriteOffload(pkts []OffloadPacket) (n int, err error) {
	if !d.vnet {
		return 0, d.offload
	}
	d.wmu.Lock()
	defer d.wmu.Unlock()
	for i := range pkts {
		p := &pkts[i]
		if 2+len(p.Bufs) > maxIovecs {
			return n, errPieces
		}
		_ = p.Hdr.Encode(d.whdr[:])
		d.wiov = appendIovec(appendIovec(d.wiov[:0], d.whdr[:]), p.Head)
		size := len(p.Head)
		for _, b := range p.Bufs {
			if p.Offset < 0 || p.Offset > len(b) {
				clear(d.wiov)
				return n, errBadPacket
			}
			d.wiov = appendIovec(d.wiov, b[p.Offset:])
			size += len(b) - p.Offset
		}
		if size == 0 {
			clear(d.wiov)
			return n, errBadPacket
		}
		if err := d.writeLocked(); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// appendIovec appends b to iov, unless it is empty.
func appendIovec(iov []unix.Iovec, b []byte) []unix.Iovec {
	if len(b) == 0 {
		return iov
	}
	v := unix.Iovec{Base: &b[0]}
	v.SetLen(len(b))
	return append(iov, v)
}

// writeLocked writes d.wiov as one packet, and forgets it; the caller
// holds wmu.
func (d *TUN) writeLocked() error {
	d.werr = nil
	err := d.raw.Write(d.writeFn)
	clear(d.wiov) // keep no reference to the caller's buffers
	if err == nil {
		err = d.werr
	}
	if err != nil && (d.closed.Load() || errors.Is(err, os.ErrClosed) || errors.Is(err, unix.EBADFD)) {
		return net.ErrClosed
	}
	return err
}

// writePacket is writeFn: one writev of d.wiov.
func (d *TUN) writePacket(fd uintptr) bool {
	for {
		_, _, errno := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&d.wiov[0])), uintptr(len(d.wiov)))
		switch errno {
		case 0:
			return true
		case unix.EINTR:
		case unix.EAGAIN:
			return false
		default:
			d.werr = errno
			return true
		}
	}
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

// open creates the TUN device (IFF_TUN|IFF_NO_PI, not persistent, and
// the extra flags) and returns its non-blocking, close-on-exec
// descriptor, which the netpoller waits on.
func open(m setup.Mode, name string, flags uint16) (*os.File, error) {
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return nil, fmt.Errorf("%s needs the TUN driver, and %w: load it (modprobe tun) or, in a container, pass the device in", m.Name, err)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("%s: open /dev/net/tun: %w (CAP_NET_ADMIN does not override its file mode: let this user read and write it, as mode 0666 does)", m.Name, err)
		}
		return nil, m.Failed("open /dev/net/tun", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err == nil {
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | flags)
		err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
	}
	if err != nil {
		unix.Close(fd)
		switch {
		case errors.Is(err, unix.EBUSY):
			return nil, fmt.Errorf("%s: TUN device %s is busy: another process holds it; choose another device name", m.Name, name)
		case errors.Is(err, unix.EINVAL) && flags != 0:
			return nil, err // the caller tries again without the flags
		}
		return nil, m.Failed(fmt.Sprintf("create TUN device %s", name), os.NewSyscallError("ioctl TUNSETIFF", err))
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun"), nil
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

// A TUN device handed from one process to another (a server's planned
// restart): the old process sends a duplicate of its descriptor (Dup),
// the new one adopts it (Adopt), and the old one lets go of its own
// without removing the device (Release). The device is not persistent: it
// lives while a descriptor of it is open, in either process, so it never
// goes away in between, and what the kernel routes into it meanwhile
// waits in its queue for the reader.

// Adopt takes over the running TUN device name, whose descriptor f
// another process handed over, in the network namespace of h: it checks
// that f is that device, as Create makes it (IFF_TUN|IFF_NO_PI, not
// persistent, not multi-queue; IFF_VNET_HDR when it offloads, whose
// offloads it asks for again), and returns it as Create would, with its
// MTU, addresses and state as they are. It works on a duplicate of f,
// which the caller still closes. Close then removes the device.
func Adopt(h *netlink.Handle, m setup.Mode, name string, f *os.File) (*TUN, error) {
	fd, err := dupFile(f)
	if err != nil {
		return nil, fmt.Errorf("%s: TUN device %s handed over: %w", m.Name, name, err)
	}
	fail := func(err error) (*TUN, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: TUN device %s handed over: %w", m.Name, name, err)
	}
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return fail(err)
	}
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		return fail(fmt.Errorf("not a TUN device: %w", os.NewSyscallError("ioctl TUNGETIFF", err)))
	}
	flags := ifr.Uint16()
	switch {
	case ifr.Name() != name:
		return fail(fmt.Errorf("the descriptor is device %s's", ifr.Name()))
	case flags&(unix.IFF_TUN|unix.IFF_TAP|unix.IFF_NO_PI) != unix.IFF_TUN|unix.IFF_NO_PI:
		return fail(fmt.Errorf("flags %#x, want IFF_TUN|IFF_NO_PI", flags))
	case flags&(unix.IFF_PERSIST|unix.IFF_MULTI_QUEUE) != 0:
		return fail(fmt.Errorf("flags %#x: persistent or multi-queue, which iketcp never makes", flags))
	}
	vnet := flags&unix.IFF_VNET_HDR != 0
	var why error = &OffloadError{Err: ErrOffloadNotAsked}
	if vnet {
		if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, offloadFlags); err != nil {
			return fail(os.NewSyscallError("ioctl TUNSETOFFLOAD", err))
		}
		why = nil
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return fail(os.NewSyscallError("fcntl O_NONBLOCK", err))
	}
	d := &TUN{mode: m, name: name, nl: h, file: os.NewFile(uintptr(fd), "/dev/net/tun"), vnet: vnet, offload: why}
	d.readFn = d.readBatch
	d.writeFn = d.writePacket
	if vnet {
		d.pend = make([]byte, 0, MTU)
		d.wiov = make([]unix.Iovec, 0, 64)
	}
	if d.raw, err = d.file.SyscallConn(); err != nil {
		d.file.Close()
		return nil, fmt.Errorf("%s: TUN device %s: %w", m.Name, name, err)
	}
	link, err := h.LinkByName(name)
	if err != nil {
		d.file.Close()
		return nil, m.Failed(fmt.Sprintf("find the TUN device %s handed over", name), err)
	}
	d.link = link
	return d, nil
}

// dupFile returns a close-on-exec duplicate of f's descriptor.
func dupFile(f *os.File) (int, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	var nfd int
	var derr error
	if err := raw.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr)
	}
	return nfd, nil
}

// Dup returns a close-on-exec duplicate of the device's descriptor, for
// another process to Adopt; the caller closes it.
func (d *TUN) Dup() (*os.File, error) {
	fd, err := dupFile(d.file)
	if err != nil {
		return nil, fmt.Errorf("%s: TUN device %s: %w", d.mode.Name, d.name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun"), nil
}

// Release closes the device's descriptor without removing the device,
// which another process adopted: it lives on with that process's
// descriptor. Blocked Reads return net.ErrClosed. Close does nothing
// after it.
func (d *TUN) Release() error {
	if d.closed.Swap(true) {
		return nil
	}
	if err := d.file.Close(); err != nil {
		return fmt.Errorf("close TUN device %s: %w", d.name, err)
	}
	return nil
}

// SetReadDeadline sets the deadline of Read and ReadOffload: one in the
// past wakes a blocked one, which returns os.ErrDeadlineExceeded; the
// zero time clears it.
func (d *TUN) SetReadDeadline(t time.Time) error { return d.file.SetReadDeadline(t) }
