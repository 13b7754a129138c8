package udpbatch

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The scratch arrays are handed to the kernel as they are: check that the
// declarations in golang.org/x/sys/unix have the kernel's layout.
var (
	_ [unix.SizeofMmsghdr - unsafe.Sizeof(unix.Mmsghdr{})]struct{}
	_ [unsafe.Sizeof(unix.Mmsghdr{}) - unix.SizeofMmsghdr]struct{}
	_ [unix.SizeofIovec - unsafe.Sizeof(unix.Iovec{})]struct{}
	_ [unsafe.Sizeof(unix.Iovec{}) - unix.SizeofIovec]struct{}
	_ [unix.SizeofSockaddrInet6 - unsafe.Sizeof(unix.RawSockaddrInet6{})]struct{}
	_ [unsafe.Sizeof(unix.RawSockaddrInet6{}) - unix.SizeofSockaddrInet4]struct{} // an Inet6 slot holds an Inet4
)

// sysConn is the Linux batch state of a Conn.
type sysConn struct {
	// raw is the UDPConn's RawConn, set in New: its Read and Write wait in
	// the netpoller and honour deadlines and Close.
	raw syscall.RawConn

	// recv is the receive scratch; Conn.rmu guards it.
	recv *recvScratch

	// sendMu guards sendFree, the idle send scratch. A WriteBatch takes one
	// scratch for the whole call, so concurrent writers never share one.
	// At most cap(sendFree) idle ones are kept; beyond that many
	// concurrent writers, WriteBatch allocates.
	sendMu   sync.Mutex
	sendFree []*sendScratch

	// gso is set while WriteBatch coalesces runs of equal-sized datagrams
	// to one destination into one UDP_SEGMENT send (generic segmentation
	// offload): the kernel then walks its output path once per run, not
	// once per datagram. It is cleared for good, and said once, if the
	// kernel refuses one (EIO: a device without checksum offload).
	gso atomic.Bool

	// gro is set while the socket has UDP_GRO on (gro_linux.go): reads then
	// go through groRecv. It is cleared for good if the Conn falls back.
	gro atomic.Bool
	// groRecv is the receive state with GRO: the Conn's own buffers and
	// the datagrams in them still to be returned. Made on the first read;
	// Conn.rmu guards it.
	groRecv *groReader
}

// GSO limits: the kernel takes at most UDP_MAX_SEGMENTS (64 on older
// kernels) segments in one send, and an IP packet's worth of payload.
const (
	maxGSOSegments = 64
	maxGSOBytes    = 65507 // an IPv4 datagram's largest payload
)

// initSys probes recvmmsg and sendmmsg on c's socket and sets up the
// scratch, and receive offload if opts asks for it. It returns why the
// batch path cannot be used, or nil.
func (c *Conn) initSys(opts Options) *UnsupportedError {
	raw, err := c.uc.SyscallConn()
	if err != nil {
		return &UnsupportedError{Err: fmt.Errorf("unavailable: %w", err)}
	}
	var (
		why    *UnsupportedError
		domain int
		domErr error
	)
	err = raw.Control(func(fd uintptr) {
		domain, domErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
		why = probe(fd)
	})
	if err != nil {
		return &UnsupportedError{Err: fmt.Errorf("unavailable: %w", err)}
	}
	if domErr == nil {
		c.v4only = domain == unix.AF_INET
	}
	if why != nil {
		return why
	}
	c.sys.raw = raw
	c.sys.recv = newRecvScratch(c.batch)
	c.sys.gso.Store(gsoProbe(raw))
	if opts.GRO {
		c.startGRO(opts.failGRO)
	}
	// Keep at most about 1 MiB of idle send scratch, and at least a few
	// (none for a Conn that shares its send scratch).
	if !c.sharesSend() {
		idle := max(4, min(256, (1<<20)/(c.batch*scratchBytesPerMsg)))
		c.sys.sendFree = make([]*sendScratch, 0, idle)
	}
	return nil
}

// probe asks the kernel for recvmmsg and sendmmsg with an empty vector,
// which moves no datagram. A kernel without them says ENOSYS; a seccomp
// filter or sandbox that forbids them says EPERM or EACCES. Any other
// answer means the call exists. (recvmmsg also hands back, and so clears, a
// pending socket error, which only a socket used before New can have.)
func probe(fd uintptr) *UnsupportedError {
	var h [1]unix.Mmsghdr
	for _, call := range [...]struct {
		name string
		trap uintptr
	}{{"recvmmsg", unix.SYS_RECVMMSG}, {"sendmmsg", unix.SYS_SENDMMSG}} {
		_, _, e := unix.Syscall6(call.trap, fd, uintptr(unsafe.Pointer(&h[0])), 0, unix.MSG_DONTWAIT, 0, 0)
		switch e {
		case unix.ENOSYS, unix.EPERM, unix.EACCES:
			return &UnsupportedError{Op: call.name, Err: e}
		}
	}
	return nil
}

// gsoProbe reports whether the kernel knows UDP_SEGMENT (Linux 4.18).
func gsoProbe(raw syscall.RawConn) bool {
	ok := false
	raw.Control(func(fd uintptr) {
		_, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT)
		ok = err == nil
	})
	return ok
}

// GSO reports whether WriteBatch coalesces runs of equal-sized datagrams
// into segmentation-offload sends.
func (c *Conn) GSO() bool { return c.fallback.Load() == nil && c.sys.gso.Load() }

const scratchBytesPerMsg = int(unsafe.Sizeof(unix.Mmsghdr{}) + unsafe.Sizeof(unix.Iovec{}) + unsafe.Sizeof(unix.RawSockaddrInet6{}))

// scratch is what one batch system call reads: header i describes datagram
// i, whose one iovec is iovs[i] and whose address slot is names[i] (large
// enough for either family).
type scratch struct {
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6
}

func newScratch(n int) scratch {
	s := scratch{
		hdrs:  make([]unix.Mmsghdr, n),
		iovs:  make([]unix.Iovec, n),
		names: make([]unix.RawSockaddrInet6, n),
	}
	for i := range s.hdrs {
		s.hdrs[i].Hdr.Iov = &s.iovs[i]
		s.hdrs[i].Hdr.SetIovlen(1)
	}
	return s
}

// setBuf points datagram i at b.
func (s *scratch) setBuf(i int, b []byte) {
	iov := &s.iovs[i]
	iov.Base = nil
	if len(b) > 0 {
		iov.Base = &b[0]
	}
	iov.SetLen(len(b))
}

// forget drops the references to the caller's buffers in iovs[:n].
func (s *scratch) forget(n int) {
	for i := range s.iovs[:n] {
		s.iovs[i].Base = nil
	}
}

// recvScratch is the state of one ReadBatch. fn is s.recv, made once, so
// that handing it to RawConn.Read does not allocate; the call's inputs and
// results travel in the struct.
type recvScratch struct {
	scratch
	vlen  int           // in: datagrams offered
	try   bool          // in: report EAGAIN as n == 0 rather than wait
	n     int           // out: datagrams received
	errno syscall.Errno // out: the kernel's error, if n == 0
	fn    func(fd uintptr) bool
}

func newRecvScratch(n int) *recvScratch {
	s := &recvScratch{scratch: newScratch(n)}
	for i := range s.hdrs {
		s.hdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&s.names[i]))
	}
	s.fn = s.recv
	return s
}

// recv is the RawConn.Read callback: false sends the caller back to the
// netpoller to wait for readability.
func (s *recvScratch) recv(fd uintptr) bool {
	for {
		r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&s.hdrs[0])), uintptr(s.vlen), 0, 0, 0)
		switch e {
		case 0:
			s.n, s.errno = int(r), 0
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			if s.try {
				s.n, s.errno = 0, 0
				return true
			}
			return false
		default:
			s.n, s.errno = 0, e
			return true
		}
	}
}

// peek is the RawConn.Read callback of waitReadSys: it reads nothing, and
// sends the caller to the netpoller while there is nothing to read. A
// pending error ends the wait, for the next read to report.
func peek(fd uintptr) bool {
	for {
		_, _, e := unix.Syscall6(unix.SYS_RECVFROM, fd, 0, 0, unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
		switch e {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		return true
	}
}

func (c *Conn) waitReadSys() error { return c.sys.raw.Read(peek) }

// recvError is ReadBatch's error for the kernel's answer to recvmmsg, or
// nil for none.
func (c *Conn) recvError(errno syscall.Errno) error {
	switch errno {
	case 0:
		return nil
	case unix.ENOSYS:
		return &UnsupportedError{Op: "recvmmsg", Err: errno}
	}
	return &net.OpError{Op: "read", Net: c.laddr.Network(), Source: c.laddr, Addr: c.uc.RemoteAddr(),
		Err: os.NewSyscallError("recvmmsg", errno)}
}

func (c *Conn) readBatchSys(msgs []Message, try bool) (int, error) {
	if c.sys.gro.Load() {
		return c.readGROLocked(msgs, try)
	}
	s := c.sys.recv
	s.vlen, s.try = len(msgs), try
	for i := range msgs {
		s.setBuf(i, msgs[i].Buf)
		h := &s.hdrs[i]
		h.Hdr.Namelen = unix.SizeofSockaddrInet6
		h.Hdr.Flags = 0
		h.Len = 0
	}
	err := c.sys.raw.Read(s.fn)
	s.forget(len(msgs))
	if err != nil {
		return 0, err
	}
	if err := c.recvError(s.errno); err != nil {
		return 0, err
	}
	for i := range s.n {
		m, h := &msgs[i], &s.hdrs[i]
		m.N = int(h.Len)
		m.Truncated = h.Hdr.Flags&unix.MSG_TRUNC != 0
		if m.Truncated || m.N > len(m.Buf) {
			m.N = len(m.Buf)
			c.truncated.Add(1)
		}
		m.Addr = addrPortOf(&s.names[i], h.Hdr.Namelen)
	}
	return s.n, nil
}

// sendScratch is the state of one WriteBatch; fn is s.send, made once.
// With GSO, header i may describe a run of datagrams: counts[i] of them,
// from iovs[first[i]], with a UDP_SEGMENT control message in ctrl.
type sendScratch struct {
	scratch
	off, end int           // in/out: hdrs[off:end] are still to be sent
	errno    syscall.Errno // out: the kernel's error for hdrs[off]
	counts   []int         // datagrams per header
	ctrl     []byte        // a UDP_SEGMENT control message per header
	failGSO  bool          // tests: answer EIO to a segmentation-offload send
	fn       func(fd uintptr) bool
}

// gsoCmsgSpace is the room of one UDP_SEGMENT control message.
var gsoCmsgSpace = unix.CmsgSpace(2)

func newSendScratch(n int) *sendScratch {
	s := &sendScratch{scratch: newScratch(n), counts: make([]int, n), ctrl: make([]byte, n*gsoCmsgSpace)}
	for i := range n {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&s.ctrl[i*gsoCmsgSpace]))
		h.Level, h.Type = unix.IPPROTO_UDP, unix.UDP_SEGMENT
		h.SetLen(unix.CmsgLen(2))
	}
	s.fn = s.send
	return s
}

// sentMessages returns how many datagrams the first k headers hold.
func (s *sendScratch) sentMessages(k int) int {
	n := 0
	for _, c := range s.counts[:k] {
		n += c
	}
	return n
}

// send is the RawConn.Write callback. It loops over partial sendmmsg
// results; false sends the caller back to the netpoller to wait for
// writability, after which it goes on from hdrs[off].
func (s *sendScratch) send(fd uintptr) bool {
	for s.off < s.end {
		if s.failGSO && s.counts[s.off] > 1 {
			s.errno = unix.EIO
			return true
		}
		r, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&s.hdrs[s.off])), uintptr(s.end-s.off), 0, 0, 0)
		switch e {
		case 0:
			if r == 0 {
				return false // nothing taken: wait, do not spin
			}
			s.off += int(r)
		case unix.EINTR:
		case unix.EAGAIN:
			return false
		default:
			s.errno = e
			return true
		}
	}
	return true
}

// sharedSendBatch is how many datagrams one system call describes on a
// Conn whose BatchSize is smaller: such Conns (a server's per-session
// backend sockets read 8 at a time, for memory) borrow their send scratch
// from one list that they all share, so that a burst of 64 frames from
// one connection leaves in one sendmmsg (with GSO, one skb per run), and
// 10,000 idle sessions hold no send scratch at all.
const sharedSendBatch = 64

// sharedSend holds the idle scratch of the Conns that share it: at most
// 64, about 600 KiB; beyond that many concurrent writers, WriteBatch
// allocates.
var sharedSend struct {
	mu   sync.Mutex
	free []*sendScratch
}

func (c *Conn) sharesSend() bool { return c.batch < sharedSendBatch }

func (c *Conn) getSend() *sendScratch {
	mu, free, size := &c.sys.sendMu, &c.sys.sendFree, c.batch
	if c.sharesSend() {
		mu, free, size = &sharedSend.mu, &sharedSend.free, sharedSendBatch
	}
	mu.Lock()
	if n := len(*free); n > 0 {
		s := (*free)[n-1]
		(*free)[n-1] = nil
		*free = (*free)[:n-1]
		mu.Unlock()
		s.failGSO = c.failGSO
		return s
	}
	mu.Unlock()
	s := newSendScratch(size)
	s.failGSO = c.failGSO
	return s
}

func (c *Conn) putSend(s *sendScratch) {
	if c.sharesSend() {
		sharedSend.mu.Lock()
		if len(sharedSend.free) < sharedSendBatch {
			sharedSend.free = append(sharedSend.free, s)
		}
		sharedSend.mu.Unlock()
		return
	}
	c.sys.sendMu.Lock()
	if len(c.sys.sendFree) < cap(c.sys.sendFree) {
		c.sys.sendFree = append(c.sys.sendFree, s)
	}
	c.sys.sendMu.Unlock()
}

func (c *Conn) writeBatchSys(msgs []Message) (sent int, err error) {
	s := c.getSend()
	defer c.putSend(s)
	for sent < len(msgs) {
		chunk := msgs[sent:min(len(msgs), sent+len(s.counts))]
		gso := c.sys.gso.Load()
		hdrs, k, addrErr := c.fill(s, chunk, sent, gso)
		s.off, s.end, s.errno = 0, hdrs, 0
		if hdrs > 0 {
			c.sendCalls.Add(1)
			err = c.sys.raw.Write(s.fn)
		}
		s.forget(k)
		done := s.sentMessages(s.off)
		sent += done
		switch {
		case err != nil:
			return sent, err
		case s.errno == unix.EIO && gso && s.counts[s.off] > 1:
			// The way out cannot segment (no checksum offload): send
			// datagram by datagram from here on.
			c.sys.gso.Store(false)
			if c.log != nil {
				c.log.Info("udpbatch: segmentation offload refused, sending datagram by datagram",
					slog.String("local", c.laddr.String()), slog.String("err", s.errno.Error()))
			}
			continue
		case s.errno == unix.ENOSYS:
			return sent, &UnsupportedError{Op: "sendmmsg", Err: s.errno}
		case s.errno != 0:
			var to net.Addr
			if a := msgs[sent].Addr; a.IsValid() {
				to = net.UDPAddrFromAddrPort(a)
			} else {
				to = c.uc.RemoteAddr()
			}
			return sent, &net.OpError{Op: "write", Net: c.laddr.Network(), Source: c.laddr, Addr: to,
				Err: os.NewSyscallError("sendmmsg", s.errno)}
		case addrErr != nil:
			return sent, addrErr
		}
	}
	return sent, nil
}

// fill describes chunk to the kernel in s: one header per datagram, or
// with gso one per run of datagrams to the same destination, each as
// large as the first but the last, which may be shorter (the kernel's
// rule for segments). It stops at the first message whose destination
// the socket cannot send to, returning its error. It returns the headers
// filled and the messages they describe. base is chunk[0]'s index in the
// WriteBatch call.
func (c *Conn) fill(s *sendScratch, chunk []Message, base int, gso bool) (hdrs, k int, err error) {
	for k < len(chunk) {
		first := k
		dst, err := c.dest(base+k, chunk[k].Addr)
		if err != nil {
			return hdrs, k, err
		}
		size := len(chunk[k].Buf)
		total := size
		s.setBuf(k, chunk[k].Buf)
		k++
		for gso && size > 0 && k < len(chunk) && k-first < maxGSOSegments {
			m := &chunk[k]
			if len(m.Buf) > size || len(m.Buf) == 0 || total+len(m.Buf) > maxGSOBytes {
				break
			}
			next, err := c.dest(base+k, m.Addr)
			if err != nil || next != dst {
				break // the next header reports it, or starts a run of its own
			}
			s.setBuf(k, m.Buf)
			total += len(m.Buf)
			k++
			if len(m.Buf) < size {
				break // a shorter segment ends a run
			}
		}
		h := &s.hdrs[hdrs]
		h.Len = 0
		h.Hdr.Flags = 0
		h.Hdr.Iov = &s.iovs[first]
		h.Hdr.SetIovlen(k - first)
		s.counts[hdrs] = k - first
		if k-first > 1 {
			ctrl := s.ctrl[hdrs*gsoCmsgSpace : (hdrs+1)*gsoCmsgSpace]
			*(*uint16)(unsafe.Pointer(&ctrl[unix.CmsgLen(0)])) = uint16(size)
			h.Hdr.Control = &ctrl[0]
			h.Hdr.SetControllen(len(ctrl))
		} else {
			h.Hdr.Control = nil
			h.Hdr.SetControllen(0)
		}
		if !dst.IsValid() {
			h.Hdr.Name, h.Hdr.Namelen = nil, 0
		} else {
			h.Hdr.Name = (*byte)(unsafe.Pointer(&s.names[hdrs]))
			h.Hdr.Namelen = putSockaddr(&s.names[hdrs], dst, c.v4only)
		}
		hdrs++
	}
	return hdrs, k, nil
}

// putSockaddr writes a into slot as the socket's family expects it and
// returns its length: sockaddr_in on an AF_INET socket (dest has checked a is
// IPv4), otherwise sockaddr_in6, with IPv4 mapped to ::ffff:a.b.c.d.
func putSockaddr(slot *unix.RawSockaddrInet6, a netip.AddrPort, v4only bool) uint32 {
	if v4only {
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(slot))
		*sa = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.Addr().As4()}
		putPort(&sa.Port, a.Port())
		return unix.SizeofSockaddrInet4
	}
	*slot = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: a.Addr().As16()}
	putPort(&slot.Port, a.Port())
	if z := a.Addr().Zone(); z != "" {
		slot.Scope_id = zoneIndex(z)
	}
	return unix.SizeofSockaddrInet6
}

// addrPortOf reads the address the kernel wrote into slot, unmapping IPv4.
func addrPortOf(slot *unix.RawSockaddrInet6, namelen uint32) netip.AddrPort {
	switch {
	case slot.Family == unix.AF_INET && namelen >= unix.SizeofSockaddrInet4:
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(slot))
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), getPort(&sa.Port))
	case slot.Family == unix.AF_INET6 && namelen >= unix.SizeofSockaddrInet6:
		ip := netip.AddrFrom16(slot.Addr)
		if ip.Is4In6() {
			ip = ip.Unmap()
		} else if slot.Scope_id != 0 {
			ip = ip.WithZone(zoneName(slot.Scope_id))
		}
		return netip.AddrPortFrom(ip, getPort(&slot.Port))
	}
	return netip.AddrPort{}
}

// The Port fields of the raw sockaddrs hold the port in network byte order.

func putPort(p *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(p))
	b[0], b[1] = byte(port>>8), byte(port)
}

func getPort(p *uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(p))
	return uint16(b[0])<<8 | uint16(b[1])
}

// zones caches IPv6 scope IDs and the zone names that stand for them, so
// that a link-local peer costs an interface lookup once, not per datagram.
// A zone is an interface name where the index has one, else the index in
// decimal, as in the net package.
var zones struct {
	sync.RWMutex
	name  map[uint32]string
	index map[string]uint32
}

func zoneName(id uint32) string {
	zones.RLock()
	z, ok := zones.name[id]
	zones.RUnlock()
	if ok {
		return z
	}
	z = strconv.FormatUint(uint64(id), 10)
	if ifi, err := net.InterfaceByIndex(int(id)); err == nil {
		z = ifi.Name
	}
	zones.Lock()
	if zones.name == nil {
		zones.name = make(map[uint32]string)
	}
	zones.name[id] = z
	zones.Unlock()
	return z
}

func zoneIndex(z string) uint32 {
	zones.RLock()
	id, ok := zones.index[z]
	zones.RUnlock()
	if ok {
		return id
	}
	if n, err := strconv.ParseUint(z, 10, 32); err == nil {
		id = uint32(n)
	} else if ifi, err := net.InterfaceByName(z); err == nil {
		id = uint32(ifi.Index)
	} else {
		return 0 // not cached: the interface may appear later; the kernel refuses scope 0 for link-local
	}
	zones.Lock()
	if zones.index == nil {
		zones.index = make(map[string]uint32)
	}
	zones.index[z] = id
	zones.Unlock()
	return id
}
