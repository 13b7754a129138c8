package tun_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/iketcp/iketcp/nat/tun"
	"github.com/iketcp/iketcp/nat/tun/tuntest"
)

// The offload tests route between two TUN devices in a namespace of
// their own: what the test writes into the first, from a host behind it
// (tcpSrc4, 192.0.2.2), the kernel forwards out of the second toward
// tcpDst4 (198.51.100.2), where the test reads it: the kernel is the
// receiver of every super-segment written, and the device it forwards
// into shows what it made of it.

// router creates, in a new namespace, the device "in" with offloads
// inOffload, 192.0.2.1/24, and the device "out" with outOffload,
// 198.51.100.1/24, both up, with forwarding on.
func router(t *testing.T, inOffload, outOffload bool) (in, out *tun.TUN) {
	t.Helper()
	nattest.Enter(t)
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	for _, key := range []string{"net/ipv4/ip_forward", "net/ipv4/conf/all/rp_filter", "net/ipv4/conf/default/rp_filter"} {
		nattest.SetSysctl(t, key, map[bool]string{true: "1", false: "0"}[key == "net/ipv4/ip_forward"])
	}
	mk := func(name string, offload bool, addr netip.Addr) *tun.TUN {
		d, err := tun.Create(h, testMode, name, false, tun.Options{Offload: offload})
		if err != nil {
			t.Fatalf("Create %s: %v", name, err)
		}
		t.Cleanup(func() {
			if err := d.Close(); err != nil {
				t.Errorf("Close %s: %v", name, err)
			}
		})
		if got := d.Offload(); (got == nil) != offload {
			t.Fatalf("%s: offload asked %v, got %v", name, offload, got)
		}
		if err := d.Up(); err != nil {
			t.Fatal(err)
		}
		if err := nattest.AddAddr(d.Link(), addr, 24); err != nil {
			t.Fatal(err)
		}
		return d
	}
	in = mk("tsoin0", inOffload, netip.MustParseAddr("192.0.2.1"))
	out = mk("tsoout0", outOffload, netip.MustParseAddr("198.51.100.1"))
	return in, out
}

// datagrams returns n payloads of size bytes, each in a buffer of its own
// behind 64 bytes of headroom, and all of them in a row.
func datagrams(n, size int) (bufs [][]byte, all []byte) {
	for k := range n {
		p := payloadOf(k, size)
		bufs = append(bufs, append(make([]byte, 64), p...))
		all = append(all, p...)
	}
	return bufs, all
}

// superPacket is the OffloadPacket of a super-segment of n datagrams of
// size bytes from seq on, as a stack builds one: the first segment's
// headers with the IP length of the whole and the pseudo-header's sum in
// the checksum field, then each datagram where it lies.
func superPacket(t *testing.T, n, size int, seq uint32) tun.OffloadPacket {
	t.Helper()
	h, pkt, _ := superSegment(false, seq, flagACK|flagPSH, size, repeat(size, n)...)
	bufs, all := datagrams(n, size)
	if !bytes.Equal(pkt[40:], all) {
		t.Fatal("the payloads differ from superSegment's")
	}
	if n == 1 {
		h.GSOType, h.GSOSize = tun.GSONone, 0
	}
	return tun.OffloadPacket{Hdr: h, Head: pkt[:40], Bufs: bufs, Offset: 64}
}

// readSome reads from d until want packets came or 5 s passed.
func readSome(t *testing.T, d *tun.TUN, want int, virtio bool) [][]byte {
	t.Helper()
	bufs := make([][]byte, d.BatchSize())
	for k := range bufs {
		bufs[k] = make([]byte, tun.VirtioNetHdrLen+tun.MTU)
	}
	sizes := make([]int, len(bufs))
	var got [][]byte
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < want && time.Now().Before(deadline) {
		if err := d.File().SetReadDeadline(deadline); err != nil {
			t.Fatal(err)
		}
		var n int
		var err error
		if virtio {
			n, err = d.ReadOffload(bufs, sizes, tun.VirtioNetHdrLen)
		} else {
			n, err = d.Read(bufs, sizes, tun.VirtioNetHdrLen)
		}
		for k := range n {
			got = append(got, bytes.Clone(bufs[k][:tun.VirtioNetHdrLen+sizes[k]]))
		}
		if err != nil {
			t.Fatalf("after %d of %d packets: %v", len(got), want, err)
		}
	}
	if len(got) < want {
		t.Fatalf("%d of %d packets in 5 s", len(got), want)
	}
	return got
}

// checkSegments checks that pkts (each behind its virtio-net header) are
// the n segments of size bytes from seq on that the kernel cut and
// forwarded: each one datagram, in order, sequence numbers advancing by
// its size, IPv4 IDs by one, PSH only on the last, TTL one less, correct
// checksums.
func checkSegments(t *testing.T, pkts [][]byte, n, size int, seq uint32) {
	t.Helper()
	if len(pkts) != n {
		t.Fatalf("%d packets, want %d segments", len(pkts), n)
	}
	for k, b := range pkts {
		p := b[tun.VirtioNetHdrLen:]
		if len(p) != 40+size || p[0] != 0x45 || p[9] != unix.IPPROTO_TCP {
			t.Fatalf("segment %d: %d bytes, % x", k, len(p), p[:min(len(p), 40)])
		}
		got := tcpSegment{
			seq:   binary.BigEndian.Uint32(p[24:28]),
			flags: p[33],
			id:    binary.BigEndian.Uint16(p[4:6]),
		}
		want := tcpSegment{seq: seq + uint32(k*size), flags: flagACK, id: 100 + uint16(k)}
		if k == n-1 {
			want.flags |= flagPSH
		}
		if got.seq != want.seq || got.flags != want.flags || got.id != want.id {
			t.Errorf("segment %d: seq %d flags %#x id %d; want seq %d flags %#x id %d", k, got.seq, got.flags, got.id, want.seq, want.flags, want.id)
		}
		if p[8] != 63 {
			t.Errorf("segment %d: TTL %d, want 63 (forwarded once)", k, p[8])
		}
		if !bytes.Equal(p[40:], payloadOf(k, size)) {
			t.Errorf("segment %d carries another payload", k)
		}
		if !checksumsOK(p) {
			t.Errorf("segment %d: bad checksums", k)
		}
	}
}

// TestTSOArrivesAsSegments writes super-segments of N equal datagrams into
// an offloading device; the kernel forwards each into a device without
// offloads as the N segments it stands for.
func TestTSOArrivesAsSegments(t *testing.T) {
	in, out := router(t, true, false)
	if got := nattest.IP(t, "-d", "link", "show", "dev", "tsoin0"); !strings.Contains(got, "vnet_hdr on") {
		t.Errorf("the offloading device has no virtio-net headers:\n%s", got)
	}
	const seq = 0xffff_0000
	for _, c := range []struct{ n, size int }{{2, 1400}, {46, 1400}, {5, 333}, {1, 1000}} {
		p := superPacket(t, c.n, c.size, seq)
		if n, err := in.WriteOffload([]tun.OffloadPacket{p}); n != 1 || err != nil {
			t.Fatalf("WriteOffload of %d×%d: %d, %v", c.n, c.size, n, err)
		}
		checkSegments(t, readSome(t, out, c.n, false), c.n, c.size, seq)
		t.Logf("a super-segment of %d×%d bytes arrived as %d segments", c.n, c.size, c.n)
	}
	// A plain Write on the offloading device still writes plain packets.
	seg := tcpPacket(tcpSegment{src: tcpSrc4, dst: tcpDst4, seq: 5, ack: 77, flags: flagACK, id: 9, payload: []byte("plain")})
	if n, err := in.Write([][]byte{seg}, 0); n != 1 || err != nil {
		t.Fatalf("Write: %d, %v", n, err)
	}
	got := readSome(t, out, 1, false)[0][tun.VirtioNetHdrLen:]
	if !bytes.HasSuffix(got, []byte("plain")) || !checksumsOK(got) {
		t.Errorf("the plain packet arrived as % x", got)
	}
}

// TestGROReachesReader writes super-segments into one offloading device
// and reads them from another: the kernel forwards them whole, ReadOffload
// hands them out as they came, and Read as their segments.
func TestGROReachesReader(t *testing.T) {
	in, out := router(t, true, true)
	const n, size, seq = 20, 1400, 7
	for _, virtio := range []bool{true, false} {
		if _, err := in.WriteOffload([]tun.OffloadPacket{superPacket(t, n, size, seq)}); err != nil {
			t.Fatal(err)
		}
		if !virtio {
			checkSegments(t, readSome(t, out, n, false), n, size, seq)
			continue
		}
		got := readSome(t, out, 1, true)
		var h tun.VirtioNetHdr
		if err := h.Decode(got[0]); err != nil {
			t.Fatal(err)
		}
		pkt := got[0][tun.VirtioNetHdrLen:]
		t.Logf("ReadOffload: %d bytes, header %+v", len(pkt), h)
		cut, err := tun.SplitTCP(&h, pkt)
		if err != nil {
			t.Fatalf("the kernel's super-segment does not split: %v (header %+v)", err, h)
		}
		if !h.ChecksumTrusted() || cut.Segments() != n || cut.GSOSize() != size {
			t.Fatalf("header %+v: %d segments of %d", h, cut.Segments(), cut.GSOSize())
		}
		segs := make([][]byte, n)
		for k := range n {
			segs[k] = make([]byte, tun.VirtioNetHdrLen+2000)
			segs[k] = segs[k][:tun.VirtioNetHdrLen+cut.Put(segs[k][tun.VirtioNetHdrLen:], pkt, k)]
		}
		checkSegments(t, segs, n, size, seq)
	}
}

// TestOffloadRefused makes the kernel refuse TUNSETOFFLOAD: the device
// comes up without virtio-net headers, says why, and moves packets as a
// plain device does.
func TestOffloadRefused(t *testing.T) {
	restore := tun.RefuseOffloads()
	defer restore()
	nattest.Enter(t)
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	d, err := tun.Create(h, testMode, "tsonone0", false, tun.Options{Offload: true})
	if err != nil {
		t.Fatalf("Create with the offloads refused: %v", err)
	}
	defer d.Close()
	why := d.Offload()
	var oe *tun.OffloadError
	if !errors.As(why, &oe) || oe.Op != "TUNSETOFFLOAD" || !errors.Is(why, unix.EINVAL) || !errors.Is(why, errors.ErrUnsupported) {
		t.Fatalf("Offload: %v", why)
	}
	t.Logf("Offload: %v", why)
	if got := nattest.IP(t, "-d", "link", "show", "dev", "tsonone0"); !strings.Contains(got, "vnet_hdr off") {
		t.Errorf("the fallback device has virtio-net headers:\n%s", got)
	}
	if _, err := d.ReadOffload([][]byte{make([]byte, 100)}, []int{0}, 20); err != why {
		t.Errorf("ReadOffload: %v", err)
	}
	if _, err := d.WriteOffload([]tun.OffloadPacket{{Head: []byte{0x45}}}); err != why {
		t.Errorf("WriteOffload: %v", err)
	}
	if err := d.Up(); err != nil {
		t.Fatal(err)
	}
	if err := nattest.AddAddr(d.Link(), devAddr, 24); err != nil {
		t.Fatal(err)
	}
	checkPlainDevice(t, d)

	// Not asked for: said so.
	restore()
	p, err := tun.Create(h, testMode, "tsooff0", false, tun.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Offload(); !errors.Is(err, tun.ErrOffloadNotAsked) {
		t.Errorf("Offload without Options.Offload: %v", err)
	}
}

// checkPlainDevice sends a datagram into d (up, with devAddr/24) and
// writes one back through it.
func checkPlainDevice(t *testing.T, d *tun.TUN) {
	t.Helper()
	c, err := net.ListenUDP("udp4", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	to := netip.AddrPortFrom(peerAddr, 4500)
	if _, err := c.WriteToUDPAddrPort([]byte("in"), to); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, tun.MTU)
	sizes := []int{0}
	if err := d.File().SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := d.Read([][]byte{buf}, sizes, 0)
	if n != 1 || err != nil || sizes[0] != 30 || string(buf[28:30]) != "in" {
		t.Fatalf("Read: %d, %v: % x", n, err, buf[:sizes[0]])
	}
	// The local socket left its checksum to the device, if it offloads:
	// Read hands it out finished.
	pseudo := append(append([]byte{}, buf[12:20]...), 0, unix.IPPROTO_UDP, 0, 10)
	if nattest.Checksum(buf[:20]) != 0 || nattest.Checksum(append(pseudo, buf[20:30]...)) != 0 {
		t.Fatalf("Read: bad checksums: % x", buf[:30])
	}
	local := netip.AddrPortFrom(devAddr, c.LocalAddr().(*net.UDPAddr).AddrPort().Port())
	if n, err := d.Write([][]byte{nattest.UDPPacket(to, local, []byte("out"))}, 0); n != 1 || err != nil {
		t.Fatalf("Write: %d, %v", n, err)
	}
	nattest.ExpectUDP(t, c, []byte("out"))
}

// TestOffloadDevicePlainUse runs the plain Device contract on an
// offloading device: packets in both directions (a kernel socket's
// datagram arrives with its checksum unfinished, and Read finishes it),
// no allocation in steady state, Close.
func TestOffloadDevicePlainUse(t *testing.T) {
	nattest.Enter(t)
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	d, err := tun.Create(h, testMode, "tsoplain0", false, tun.Options{Offload: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Offload(); err != nil {
		t.Fatalf("the kernel refused the offloads: %v", err)
	}
	if err := d.Up(); err != nil {
		t.Fatal(err)
	}
	if err := nattest.AddAddr(d.Link(), devAddr, 24); err != nil {
		t.Fatal(err)
	}
	checkPlainDevice(t, d)

	// The raw view of a datagram sent by a local socket: its checksum
	// left to the device.
	c, err := net.ListenUDP("udp4", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	to := netip.AddrPortFrom(peerAddr, 4500)
	if _, err := c.WriteToUDPAddrPort([]byte("raw"), to); err != nil {
		t.Fatal(err)
	}
	bufs := [][]byte{make([]byte, tun.VirtioNetHdrLen+tun.MTU)}
	sizes := []int{0}
	if n, err := d.ReadOffload(bufs, sizes, 4); !errors.Is(err, tun.ErrNoHdrRoom) || n != 0 {
		t.Errorf("ReadOffload without room for the header: %d, %v", n, err)
	}
	if n, err := d.ReadOffload(bufs, sizes, tun.VirtioNetHdrLen); n != 1 || err != nil {
		t.Fatalf("ReadOffload: %d, %v", n, err)
	}
	var vh tun.VirtioNetHdr
	_ = vh.Decode(bufs[0])
	t.Logf("a local socket's datagram: header %+v", vh)
	if vh.IsGSO() {
		t.Errorf("one datagram came as a super-segment: %+v", vh)
	}

	send := func() {
		if _, err := c.WriteToUDPAddrPort([]byte("to the peer"), to); err != nil {
			t.Fatal(err)
		}
	}
	local := netip.AddrPortFrom(devAddr, c.LocalAddr().(*net.UDPAddr).AddrPort().Port())
	if !nattest.RaceEnabled {
		tuntest.CheckNoAllocs(t, d, tun.MTU, send, nattest.UDPPacket(to, local, []byte("reply")))
	}
	tuntest.CheckCloseWakesRead(t, d, tun.MTU, d.Close)
	tuntest.CheckClosed(t, d, tun.MTU, make([]byte, 20))
	if _, err := d.WriteOffload([]tun.OffloadPacket{{Head: make([]byte, 20)}}); !errors.Is(err, net.ErrClosed) {
		t.Errorf("WriteOffload after Close: %v", err)
	}
}

// TestOffloadDoesNotAllocate moves super-segments through two offloading
// devices with WriteOffload and ReadOffload, and counts allocations.
func TestOffloadDoesNotAllocate(t *testing.T) {
	if nattest.RaceEnabled {
		t.Skip("the race detector allocates on its own; make test runs this check without -race")
	}
	in, out := router(t, true, true)
	pkts := []tun.OffloadPacket{superPacket(t, 10, 1400, 1)}
	bufs := make([][]byte, out.BatchSize())
	for k := range bufs {
		bufs[k] = make([]byte, tun.VirtioNetHdrLen+tun.MTU)
	}
	sizes := make([]int, len(bufs))
	got := 0
	allocs := testing.AllocsPerRun(100, func() {
		if n, err := in.WriteOffload(pkts); n != 1 || err != nil {
			panic(fmt.Sprintf("WriteOffload: %d, %v", n, err))
		}
		n, err := out.ReadOffload(bufs, sizes, tun.VirtioNetHdrLen)
		if err != nil {
			panic(err)
		}
		got += n
	})
	if allocs != 0 {
		t.Errorf("%v allocations per super-segment written and read", allocs)
	}
	if got == 0 {
		t.Error("nothing was read")
	}
}
