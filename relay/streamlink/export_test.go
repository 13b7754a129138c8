package streamlink

import (
	"github.com/iketcp/iketcp/relay"
	"golang.org/x/sys/unix"
)

// NotSentLowatOf returns the TCP_NOTSENT_LOWAT the kernel holds for a
// link's socket, and what the link believes it set (0 if it does not
// adjust it).
func NotSentLowatOf(link relay.Link) (kernel, set int) {
	l := link.(*Link)
	raw := rawConn(underlying(l.nc))
	raw.Control(func(fd uintptr) {
		kernel, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT)
	})
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.lowat != nil {
		set = l.lowat.set
	}
	return kernel, set
}
