package relay_test

import (
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/relay"
)

// TestSetDeadAfter: the socket carries TCP_USER_TIMEOUT and keepalives
// every quarter of the bound, as set.
func TestSetDeadAfter(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := relay.SetDeadAfter(c.(*net.TCPConn), 4*time.Second); err != nil {
		t.Fatal(err)
	}
	rc, _ := c.(*net.TCPConn).SyscallConn()
	var user, idle, intvl, cnt, keep int
	rc.Control(func(fd uintptr) {
		user, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
		idle, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
		intvl, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPINTVL)
		cnt, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPCNT)
		keep, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE)
	})
	if user != 4000 || keep != 1 || idle != 1 || intvl != 1 || cnt != 4 {
		t.Fatalf("TCP_USER_TIMEOUT %d ms, keepalive %d idle %d s interval %d s count %d; want 4000, 1, 1, 1, 4", user, keep, idle, intvl, cnt)
	}
}
