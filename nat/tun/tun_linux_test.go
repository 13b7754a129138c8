package tun_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/internal/setup"
	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/iketcp/iketcp/nat/tun"
	"github.com/iketcp/iketcp/nat/tun/tuntest"
)

// The tests build everything in anonymous network namespaces of their
// own (nattest.Enter), which vanish with the test.

var errTestNeedsNetAdmin = errors.New("the test mode needs CAP_NET_ADMIN")

var testMode = setup.Mode{Name: "test mode", NeedsNetAdmin: errTestNeedsNetAdmin}

// The device's address, and a peer behind it: what the test sends to
// the peer goes into the device.
var (
	devAddr  = netip.MustParseAddr("192.0.2.1")
	peerAddr = netip.MustParseAddr("192.0.2.2")
)

// create moves the test into a new namespace and creates a TUN device
// there, up, with devAddr/24; the test's end closes it and the handle.
func create(t *testing.T, name string) (*tun.TUN, *netlink.Handle) {
	t.Helper()
	nattest.Enter(t)
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	d, err := tun.Create(h, testMode, name, false, tun.Options{})
	if err != nil {
		h.Close()
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		h.Close()
	})
	if err := d.Up(); err != nil {
		t.Fatal(err)
	}
	if err := nattest.AddAddr(d.Link(), devAddr, 24); err != nil {
		t.Fatal(err)
	}
	return d, h
}

// TestReadBatches sends a burst and checks that Read takes more than one
// packet per call, refuses a buffer without room, and cuts a packet
// longer than its buffer.
func TestReadBatches(t *testing.T) {
	d, _ := create(t, "tunb0")
	if got := nattest.IP(t, "link", "show", "dev", "tunb0"); !strings.Contains(got, "mtu 65535") {
		t.Errorf("the device's MTU is not %d:\n%s", tun.MTU, got)
	}
	c, err := net.ListenUDP("udp4", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const burst = 50
	to := netip.AddrPortFrom(peerAddr, 4500)
	for k := range burst {
		if _, err := c.WriteToUDPAddrPort(fmt.Appendf(nil, "%d", k), to); err != nil {
			t.Fatal(err)
		}
	}
	bufs := make([][]byte, d.BatchSize())
	for k := range bufs {
		bufs[k] = make([]byte, tun.MTU+8)
	}
	sizes := make([]int, len(bufs))
	// A buffer without room is refused before anything is read.
	if n, err := d.Read([][]byte{make([]byte, 8)}, sizes, 8); n != 0 || !errors.Is(err, tun.ErrOffset) {
		t.Fatalf("Read into a buffer without room: %d, %v", n, err)
	}
	if n, err := d.Read(bufs, sizes[:1], 8); n != 0 || !errors.Is(err, tun.ErrShortSizes) {
		t.Fatalf("Read with too few sizes: %d, %v", n, err)
	}
	got, most, calls := 0, 0, 0
	for got < burst {
		n, err := d.Read(bufs, sizes, 8)
		if err != nil {
			t.Fatal(err)
		}
		for k := range n {
			// IPv4 without options, then UDP.
			p := bufs[k][8 : 8+sizes[k]]
			if len(p) < 28 || p[0] != 0x45 || p[9] != unix.IPPROTO_UDP || string(p[28:]) != fmt.Sprint(got+k) {
				t.Fatalf("packet %d: %x", got+k, p)
			}
		}
		got += n
		most = max(most, n)
		calls++
	}
	t.Logf("%d packets in %d calls, at most %d per call", got, calls, most)
	if most < 2 {
		t.Fatal("Read never returned more than one packet")
	}

	// A packet longer than its buffer is cut to the buffer, and its IP
	// length field tells.
	if _, err := c.WriteToUDPAddrPort(make([]byte, 1000), to); err != nil {
		t.Fatal(err)
	}
	short := make([]byte, 200)
	if n, err := d.Read([][]byte{short}, sizes, 0); n != 1 || err != nil || sizes[0] != len(short) {
		t.Fatalf("Read into a short buffer: %d, %v, size %d", n, err, sizes[0])
	}
	if total := int(short[2])<<8 | int(short[3]); total != 20+8+1000 {
		t.Fatalf("cut packet's IP length field: %d", total)
	}

	// Write hands a packet to the kernel, as if from the peer.
	from := netip.AddrPortFrom(peerAddr, 4500)
	local := netip.AddrPortFrom(devAddr, c.LocalAddr().(*net.UDPAddr).AddrPort().Port())
	reply := nattest.UDPPacket(from, local, []byte("reply"))
	if n, err := d.Write([][]byte{append(make([]byte, 4), reply...)}, 4); n != 1 || err != nil {
		t.Fatalf("Write: %d, %v", n, err)
	}
	if got := nattest.ExpectUDP(t, c, []byte("reply")); got != from {
		t.Fatalf("the reply came from %s, want %s", got, from)
	}
}

// TestCloseRemovesTheDevice closes a device that another descriptor
// (as a child process's would) still holds: the device goes, a blocked
// Read wakes with net.ErrClosed, and Read and Write fail with it after.
func TestCloseRemovesTheDevice(t *testing.T) {
	d, h := create(t, "tunc0")
	// Not File().Fd(), which would make the descriptor blocking.
	raw, err := d.File().SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	held, derr := -1, error(nil)
	if err := raw.Control(func(fd uintptr) { held, derr = unix.Dup(int(fd)) }); err != nil || derr != nil {
		t.Fatal(err, derr)
	}
	defer unix.Close(held)
	tuntest.CheckCloseWakesRead(t, d, tun.MTU, d.Close)
	if _, err := h.LinkByName("tunc0"); err == nil {
		t.Error("the device is still there")
	}
	tuntest.CheckClosed(t, d, tun.MTU, make([]byte, 20))
}

// TestStale finds and removes a device that a crashed run left, and
// refuses one that is not a TUN device.
func TestStale(t *testing.T) {
	nattest.Enter(t)
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	log := nattest.Logger(t)
	if s, err := tun.FindStale(h, testMode, "tuns0"); s != nil || err != nil {
		t.Fatalf("FindStale with no device: %v, %v", s, err)
	}
	if err := (*tun.Stale)(nil).Remove(log); err != nil {
		t.Fatalf("Remove of nothing: %v", err)
	}
	// A persistent device, as an older run or a hand-made one leaves.
	if err := h.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tuns0"}, Mode: netlink.TUNTAP_MODE_TUN}); err != nil {
		t.Fatal(err)
	}
	s, err := tun.FindStale(h, testMode, "tuns0")
	if s == nil || err != nil {
		t.Fatalf("FindStale with a TUN device: %v, %v", s, err)
	}
	if err := s.Remove(log); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if _, err := h.LinkByName("tuns0"); err == nil {
		t.Error("the device is still there")
	}
	// A device of the name that is not a TUN device is not iketcp's.
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "tuns0"}, PeerName: "tunsp"}); err != nil {
		t.Fatal(err)
	}
	if s, err := tun.FindStale(h, testMode, "tuns0"); s != nil || err == nil || !strings.Contains(err.Error(), "test mode: a veth device named tuns0 exists and is not iketcp's") {
		t.Fatalf("FindStale with a veth device: %v, %v", s, err)
	}
}

// TestCreateErrors checks Create's errors for a name another descriptor
// holds, and for the kernel's refusal without CAP_NET_ADMIN.
func TestCreateErrors(t *testing.T) {
	d, h := create(t, "tune0")
	if _, err := tun.Create(h, testMode, d.Name(), false, tun.Options{}); err == nil || !strings.Contains(err.Error(), "test mode: TUN device tune0 is busy") {
		t.Errorf("Create of a device another descriptor holds: %v", err)
	}
	err := nattest.WithoutNetAdmin(func() error { return nattest.CreateTUN(testMode, "tune1") })
	if !errors.Is(err, errTestNeedsNetAdmin) || !strings.Contains(err.Error(), "create TUN device tune1") {
		t.Errorf("Create without CAP_NET_ADMIN: %v", err)
	}
}
