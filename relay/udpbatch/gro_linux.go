package udpbatch

import (
	"log/slog"
	"net/netip"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// UDP GRO receive: the socket has UDP_GRO on, and recvmmsg reads into
// groSlots buffers of the Conn's own, each large enough for the largest
// message the kernel may coalesce. A message that comes with a UDP_GRO
// control message holds a run of datagrams of the size it gives (the last
// may be shorter); the Conn splits it with segment and copies each
// datagram into a Message of the caller's.
const (
	groSlots     = 8
	groSlotBytes = 1 << 16 // a UDP payload is at most 65,527 bytes (IPv6), 65,507 (IPv4)
	groCtrlBytes = 64      // room for the UDP_GRO control message, 24 bytes, and then some
)

// groReader is the GRO receive state of a Conn; Conn.rmu guards it.
type groReader struct {
	s    *recvScratch // groSlots headers, header i on slot i of buf and ctrl
	buf  []byte       // groSlots × groSlotBytes
	ctrl []byte       // groSlots × groCtrlBytes
	msgs [groSlots]groMessage

	// msgs[next:got] are still to be returned; the next datagram starts at
	// off in msgs[next].
	got, next, off int
}

// groMessage is what the kernel said of one message it put in a slot.
type groMessage struct {
	n     int  // bytes in the slot
	seg   int  // the segment size, or 0 for one datagram
	trunc bool // the kernel cut the message (MSG_TRUNC)
	addr  netip.AddrPort
}

func newGROReader() *groReader {
	g := &groReader{
		s:    newRecvScratch(groSlots),
		buf:  make([]byte, groSlots*groSlotBytes),
		ctrl: make([]byte, groSlots*groCtrlBytes),
	}
	for i := range groSlots {
		g.s.setBuf(i, g.slot(i))
		g.s.hdrs[i].Hdr.Control = &g.ctrl[i*groCtrlBytes]
	}
	return g
}

func (g *groReader) slot(i int) []byte { return g.buf[i*groSlotBytes : (i+1)*groSlotBytes] }

// startGRO sets UDP_GRO on the socket, or says once why not; fail stands in
// for a kernel that does not know it. A Conn without it reads as before.
func (c *Conn) startGRO(fail bool) {
	var err error
	if fail {
		err = unix.ENOPROTOOPT
	} else if cerr := c.sys.raw.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO, 1)
	}); cerr != nil {
		err = cerr
	}
	if err == nil {
		c.sys.gro.Store(true)
		if c.log != nil {
			c.log.Debug("udpbatch: receive offload on", slog.String("local", c.laddr.String()))
		}
		return
	}
	if c.log != nil {
		c.log.Info("udpbatch: receive offload unavailable (UDP_GRO needs Linux 5.0); runs will arrive datagram by datagram",
			slog.String("local", c.laddr.String()), slog.Any("err", os.NewSyscallError("setsockopt UDP_GRO", err)))
	}
}

// stopGRO turns UDP_GRO off when the Conn falls back to one datagram per
// system call, which reads into the caller's buffer: a coalesced message
// would not fit there. The datagrams already split stay for ReadBatch; a
// message the kernel coalesced and queued before now is read as one
// datagram, truncated (a fallback after New is rare: New has probed).
func (c *Conn) stopGRO() {
	if !c.sys.gro.Swap(false) {
		return
	}
	c.sys.raw.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO, 0) // best effort: a socket closed has no queue to read
	})
	if !c.leftover.Load() {
		c.sys.groRecv = nil
	}
}

// GRO reports whether the socket has UDP generic receive offload on, so
// that the kernel may hand the Conn coalesced runs of datagrams.
func (c *Conn) GRO() bool { return c.fallback.Load() == nil && c.sys.gro.Load() }

// readGROLocked reads up to min(len(msgs), groSlots) messages into the
// Conn's buffers and returns their datagrams as takeLeftoversLocked does.
// Since every message holds at least one datagram, msgs is never short of
// room for the first datagram of each.
func (c *Conn) readGROLocked(msgs []Message, try bool) (int, error) {
	g := c.sys.groRecv
	if g == nil {
		g = newGROReader()
		c.sys.groRecv = g
	}
	s := g.s
	s.vlen, s.try = min(len(msgs), groSlots), try
	for i := range s.vlen {
		h := &s.hdrs[i]
		h.Hdr.Namelen = unix.SizeofSockaddrInet6
		h.Hdr.SetControllen(groCtrlBytes)
		h.Hdr.Flags = 0
		h.Len = 0
	}
	if err := c.sys.raw.Read(s.fn); err != nil {
		return 0, err
	}
	if err := c.recvError(s.errno); err != nil {
		return 0, err
	}
	for i := range s.n {
		h, m := &s.hdrs[i], &g.msgs[i]
		m.n = min(int(h.Len), groSlotBytes)
		m.trunc = h.Hdr.Flags&unix.MSG_TRUNC != 0
		m.seg = groSegmentSize(g.ctrl[i*groCtrlBytes : i*groCtrlBytes+min(int(h.Hdr.Controllen), groCtrlBytes)])
		if m.seg > 0 && m.seg < m.n {
			c.coalesced.Add(1)
		}
		m.addr = addrPortOf(&s.names[i], h.Hdr.Namelen)
	}
	g.got, g.next, g.off = s.n, 0, 0
	return c.takeLeftoversLocked(msgs), nil
}

// takeLeftoversLocked copies the datagrams read and not yet returned into
// msgs, in order, and returns how many. A datagram longer than a Buf is
// cut and Truncated, as the kernel does; so is the last datagram of a
// message the kernel cut.
func (c *Conn) takeLeftoversLocked(msgs []Message) int {
	g := c.sys.groRecv
	if g == nil {
		return 0
	}
	k := 0
	for ; k < len(msgs) && g.next < g.got; k++ {
		gm := &g.msgs[g.next]
		dgram, next := segment(g.slot(g.next), gm.n, gm.seg, g.off)
		last := next >= gm.n
		m := &msgs[k]
		m.N = copy(m.Buf, dgram)
		m.Addr = gm.addr
		m.Truncated = m.N < len(dgram) || (last && gm.trunc)
		if m.Truncated {
			c.truncated.Add(1)
		}
		if last {
			g.next, g.off = g.next+1, 0
		} else {
			g.off = next
		}
	}
	c.leftover.Store(g.next < g.got)
	if g.next >= g.got && !c.sys.gro.Load() {
		c.sys.groRecv = nil // offload stopped: its buffers go once drained
	}
	return k
}

// groSegmentSize returns the segment size of a UDP_GRO control message in
// ctrl, the control data of one message, or 0 if there is none.
func groSegmentSize(ctrl []byte) int {
	for len(ctrl) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&ctrl[0]))
		l := int(h.Len)
		if l < unix.SizeofCmsghdr || l > len(ctrl) {
			return 0
		}
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && l >= unix.CmsgLen(4) {
			return int(*(*int32)(unsafe.Pointer(&ctrl[unix.CmsgLen(0)])))
		}
		l = unix.CmsgSpace(l - unix.CmsgLen(0))
		if l >= len(ctrl) {
			return 0
		}
		ctrl = ctrl[l:]
	}
	return 0
}
