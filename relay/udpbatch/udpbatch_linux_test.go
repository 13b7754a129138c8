package udpbatch

import (
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSockaddr checks the conversions between netip.AddrPort and the raw
// sockaddrs the kernel reads and writes.
func TestSockaddr(t *testing.T) {
	lo, err := net.InterfaceByIndex(1)
	if err != nil {
		t.Skipf("no interface 1: %v", err)
	}
	for _, tc := range []struct {
		in     string
		v4only bool
		len    uint32
		out    string // what a read of the same sockaddr returns
	}{
		{"192.0.2.1:500", true, unix.SizeofSockaddrInet4, "192.0.2.1:500"},
		{"192.0.2.1:4500", false, unix.SizeofSockaddrInet6, "192.0.2.1:4500"}, // mapped on the wire, unmapped on read
		{"[2001:db8::1]:65535", false, unix.SizeofSockaddrInet6, "[2001:db8::1]:65535"},
		{"[fe80::1%1]:500", false, unix.SizeofSockaddrInet6, "[fe80::1%" + lo.Name + "]:500"},
		{"[fe80::1%" + lo.Name + "]:500", false, unix.SizeofSockaddrInet6, "[fe80::1%" + lo.Name + "]:500"},
	} {
		var slot unix.RawSockaddrInet6
		n := putSockaddr(&slot, netip.MustParseAddrPort(tc.in), tc.v4only)
		if n != tc.len {
			t.Errorf("%s: sockaddr length %d, want %d", tc.in, n, tc.len)
		}
		if !tc.v4only && netip.MustParseAddrPort(tc.in).Addr().Is4() && slot.Addr != netip.MustParseAddr("::ffff:"+netip.MustParseAddrPort(tc.in).Addr().String()).As16() {
			t.Errorf("%s: not mapped on an IPv6 socket: %v", tc.in, slot.Addr)
		}
		if got := addrPortOf(&slot, n); got.String() != tc.out {
			t.Errorf("%s: read back as %v, want %s", tc.in, got, tc.out)
		}
	}
	if got := addrPortOf(&unix.RawSockaddrInet6{}, 0); got.IsValid() {
		t.Errorf("empty sockaddr read as %v", got)
	}
}
