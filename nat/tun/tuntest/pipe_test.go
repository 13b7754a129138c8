package tuntest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/iketcp/iketcp/nat/tun"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// readAll reads what b holds now, without blocking, as strings.
func readAll(t *testing.T, b *PipeEnd) []string {
	t.Helper()
	var got []string
	bufs := [][]byte{make([]byte, 16), make([]byte, 16), make([]byte, 16)}
	sizes := make([]int, len(bufs))
	for b.Queued() > 0 {
		n, err := b.Read(bufs, sizes, 4)
		if err != nil {
			t.Fatal(err)
		}
		for k := range n {
			got = append(got, string(bufs[k][4:4+sizes[k]]))
		}
	}
	return got
}

// packets returns count packets, "p0", "p1", ..., each after offset bytes.
func packets(count, offset int) [][]byte {
	bufs := make([][]byte, count)
	for k := range bufs {
		bufs[k] = append(make([]byte, offset), fmt.Sprintf("p%d", k)...)
	}
	return bufs
}

func TestPipeMovesBatches(t *testing.T) {
	a, b := NewPipe(3, 8)
	if a.BatchSize() != 3 {
		t.Errorf("BatchSize %d", a.BatchSize())
	}
	var captured []string
	a.SetCapture(func(pkt []byte) { captured = append(captured, string(pkt)) })
	if n, err := a.Write(packets(5, 2), 2); n != 5 || err != nil {
		t.Fatalf("Write: %d, %v", n, err)
	}
	if b.Queued() != 5 || a.Written() != 5 {
		t.Errorf("queued %d, written %d", b.Queued(), a.Written())
	}
	bufs := [][]byte{make([]byte, 16), make([]byte, 16), make([]byte, 16)}
	sizes := make([]int, 3)
	if n, err := b.Read(bufs, sizes, 4); n != 3 || err != nil || string(bufs[2][4:4+sizes[2]]) != "p2" {
		t.Fatalf("Read: %d, %v", n, err)
	}
	if got := fmt.Sprint(readAll(t, b)); got != "[p3 p4]" {
		t.Errorf("the rest: %s", got)
	}
	if got := fmt.Sprint(captured); got != "[p0 p1 p2 p3 p4]" {
		t.Errorf("captured %s", got)
	}
	// The other way too.
	if n, err := b.Write(packets(1, 0), 0); n != 1 || err != nil {
		t.Fatal(n, err)
	}
	if got := fmt.Sprint(readAll(t, a)); got != "[p0]" {
		t.Errorf("b to a: %s", got)
	}
}

func TestPipeFaults(t *testing.T) {
	a, b := NewPipe(8, 64)
	a.SetFaults(1, 0, 0)
	a.Write(packets(4, 0), 0)
	if b.Queued() != 0 || a.Lost() != 4 || a.Written() != 4 {
		t.Errorf("loss 1: queued %d, lost %d, written %d", b.Queued(), a.Lost(), a.Written())
	}
	a.SetFaults(0, 1, 0)
	a.Write(packets(2, 0), 0)
	if got := fmt.Sprint(readAll(t, b)); got != "[p0 p0 p1 p1]" {
		t.Errorf("dup 1: %s", got)
	}
	// Reordering holds one packet back behind the next.
	a.SetFaults(0, 0, 1)
	a.Write(packets(4, 0), 0)
	if got := fmt.Sprint(readAll(t, b)); got != "[p1 p0 p3 p2]" {
		t.Errorf("reorder 1: %s", got)
	}
	a.SetFaults(0, 0, 0)
	// A full queue drops and counts.
	c, d := NewPipe(8, 2)
	c.Write(packets(5, 0), 0)
	if d.Queued() != 2 || c.Overflowed() != 3 {
		t.Errorf("overflow: queued %d, overflowed %d", d.Queued(), c.Overflowed())
	}
}

func TestPipeDeadlineAndClose(t *testing.T) {
	a, b := NewPipe(1, 4)
	read := func() chan error {
		done := make(chan error, 1)
		go func() {
			_, err := b.Read([][]byte{make([]byte, 16)}, []int{0}, 0)
			done <- err
		}()
		return done
	}
	wait := func(done chan error, want error) {
		t.Helper()
		select {
		case err := <-done:
			if !errors.Is(err, want) {
				t.Errorf("Read: %v, want %v", err, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Read was not woken")
		}
	}
	done := read()
	time.Sleep(10 * time.Millisecond)
	if err := b.SetReadDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	wait(done, os.ErrDeadlineExceeded)
	if err := b.SetReadDeadline(time.Now().Add(time.Hour)); err == nil {
		t.Error("a future deadline was accepted")
	}
	if err := b.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	a.Write(packets(1, 0), 0)
	wait(read(), nil)

	done = read()
	time.Sleep(10 * time.Millisecond)
	b.Close()
	b.Close()
	wait(done, net.ErrClosed)
	if _, err := b.Write(packets(1, 0), 0); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after Close: %v", err)
	}
}

// TestPipeDoesNotAllocate writes and reads a batch in steady state.
func TestPipeDoesNotAllocate(t *testing.T) {
	if nattest.RaceEnabled {
		t.Skip("the race detector allocates")
	}
	a, b := NewPipe(32, 64)
	a.SetFaults(0.1, 0.1, 0.1)
	a.SetCapture(func([]byte) {})
	out := packets(32, 64)
	in := make([][]byte, 32)
	for k := range in {
		in[k] = make([]byte, 64+1500)
	}
	sizes := make([]int, len(in))
	allocs := testing.AllocsPerRun(200, func() {
		a.Write(out, 64)
		for b.Queued() > 0 {
			if _, err := b.Read(in, sizes, 64); err != nil {
				panic(err)
			}
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per batch written and read", allocs)
	}
}

// TestPumpAndClosedChecks runs the helpers for real devices on a pipe.
func TestPumpAndClosedChecks(t *testing.T) {
	a, b := NewPipe(4, 16)
	got := Pump(t, b, 64)
	a.Write(packets(3, 0), 0)
	for k := range 3 {
		select {
		case p := <-got:
			if string(p) != fmt.Sprintf("p%d", k) {
				t.Fatalf("pumped %q", p)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("nothing pumped")
		}
	}
	c, _ := NewPipe(1, 1)
	CheckCloseWakesRead(t, c, 16, c.Close)
	CheckClosed(t, c, 16, []byte("x"))
}

// superTCP is a super-segment of n segments of size bytes from
// 192.0.2.2 to 198.51.100.2, as a stack writes one with WriteOffload: the
// headers, with the pseudo-header's sum in the checksum field, and the
// payloads in buffers of their own behind 8 bytes of room.
func superTCP(n, size int) tun.OffloadPacket {
	src, dst := netip.MustParseAddrPort("192.0.2.2:40000"), netip.MustParseAddrPort("198.51.100.2:4500")
	var all []byte
	var bufs [][]byte
	for k := range n {
		p := bytes.Repeat([]byte{byte('a' + k)}, size)
		all = append(all, p...)
		bufs = append(bufs, append(make([]byte, 8), p...))
	}
	head := nattest.TCPPacket(src, dst, 1000, 1, 0x18, 7, all)[:40]
	tcpLen := 20 + len(all)
	pseudo := append(append(append([]byte{}, head[12:16]...), head[16:20]...), 0, 6, byte(tcpLen>>8), byte(tcpLen))
	nattest.Put16(head[36:], ^nattest.Checksum(pseudo))
	h := tun.VirtioNetHdr{Flags: tun.VirtioNeedsCsum, GSOType: tun.GSOTCPv4, HdrLen: 40, GSOSize: uint16(size), CsumStart: 20, CsumOffset: 16}
	return tun.OffloadPacket{Hdr: h, Head: head, Bufs: bufs, Offset: 8}
}

// segmentsOK checks that pkts are n TCP segments of size bytes, 'a'...,
// sequence numbers from 1000 on, with correct checksums.
func segmentsOK(t *testing.T, pkts [][]byte, n, size int) {
	t.Helper()
	if len(pkts) != n {
		t.Fatalf("%d packets, want %d segments", len(pkts), n)
	}
	for k, p := range pkts {
		tcp := p[20:]
		pseudo := append(append([]byte{}, p[12:20]...), 0, 6, byte(len(tcp)>>8), byte(len(tcp)))
		seq := uint32(tcp[4])<<24 | uint32(tcp[5])<<16 | uint32(tcp[6])<<8 | uint32(tcp[7])
		if len(p) != 40+size || seq != 1000+uint32(k*size) || p[40] != byte('a'+k) ||
			nattest.Checksum(p[:20]) != 0 || nattest.Checksum(append(pseudo, tcp...)) != 0 {
			t.Errorf("segment %d: % x", k, p[:min(len(p), 44)])
		}
	}
}

// readN reads what end holds, with Read or ReadOffload, headers included
// for ReadOffload.
func readN(t *testing.T, end *PipeEnd, virtio bool) [][]byte {
	t.Helper()
	bufs := [][]byte{make([]byte, 2000), make([]byte, 2000)}
	if virtio {
		bufs = [][]byte{make([]byte, superBuf)}
	}
	sizes := make([]int, len(bufs))
	var got [][]byte
	for range 100 {
		var n int
		var err error
		if virtio {
			n, err = end.ReadOffload(bufs, sizes, tun.VirtioNetHdrLen)
		} else {
			n, err = end.Read(bufs, sizes, tun.VirtioNetHdrLen)
		}
		if err != nil {
			t.Fatal(err)
		}
		for k := range n {
			from := tun.VirtioNetHdrLen
			if virtio {
				from = 0
			}
			got = append(got, bytes.Clone(bufs[k][from:tun.VirtioNetHdrLen+sizes[k]]))
		}
		if end.Queued() == 0 && end.pendNext == end.pendCut.Segments() {
			return got
		}
	}
	t.Fatal("the end never ran dry")
	return nil
}

// TestOffloadPipe moves a super-segment to an offloading end (whole, or
// cut by its Read) and to a plain one (cut on the way), and a plain
// packet to an offloading end.
func TestOffloadPipe(t *testing.T) {
	a, b := NewOffloadPipe(4, 16, true, false)
	if a.Offload() != nil || !errors.Is(b.Offload(), tun.ErrOffloadNotAsked) {
		t.Fatalf("Offload: %v, %v", a.Offload(), b.Offload())
	}
	if _, err := b.WriteOffload([]tun.OffloadPacket{superTCP(2, 10)}); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("WriteOffload at a plain end: %v", err)
	}
	var captured []int
	a.SetCapture(func(pkt []byte) { captured = append(captured, len(pkt)) })
	if n, err := a.WriteOffload([]tun.OffloadPacket{superTCP(5, 100)}); n != 1 || err != nil {
		t.Fatalf("WriteOffload: %d, %v", n, err)
	}
	if fmt.Sprint(captured) != "[540]" {
		t.Errorf("captured %v, want the super-segment as one packet", captured)
	}
	segmentsOK(t, readN(t, b, false), 5, 100) // cut on the way to a plain end

	c, d := NewOffloadPipe(4, 16, true, true)
	for _, virtio := range []bool{true, false} {
		if _, err := c.WriteOffload([]tun.OffloadPacket{superTCP(6, 100)}); err != nil {
			t.Fatal(err)
		}
		got := readN(t, d, virtio)
		if !virtio {
			segmentsOK(t, got, 6, 100) // Read cuts it, across calls of two buffers
			continue
		}
		var h tun.VirtioNetHdr
		if len(got) != 1 || h.Decode(got[0]) != nil || h.GSOType != tun.GSOTCPv4 || h.GSOSize != 100 || len(got[0]) != tun.VirtioNetHdrLen+640 {
			t.Fatalf("ReadOffload at an offloading end: %d packets, header %+v", len(got), h)
		}
	}
	// A plain packet reaches an offloading end behind an empty header.
	if _, err := b.Write(packets(1, 0), 0); err != nil {
		t.Fatal(err)
	}
	got := readN(t, a, true)
	if len(got) != 1 || !bytes.Equal(got[0], append(make([]byte, tun.VirtioNetHdrLen), "p0"...)) {
		t.Errorf("a plain packet at an offloading end: %q", got)
	}
}

// TestOffloadPipeDoesNotAllocate writes super-segments and reads them
// whole, in steady state.
func TestOffloadPipeDoesNotAllocate(t *testing.T) {
	if nattest.RaceEnabled {
		t.Skip("the race detector allocates")
	}
	a, b := NewOffloadPipe(4, 16, true, true)
	pkts := []tun.OffloadPacket{superTCP(32, 1400)}
	bufs := [][]byte{make([]byte, superBuf)}
	sizes := []int{0}
	if allocs := testing.AllocsPerRun(100, func() {
		if _, err := a.WriteOffload(pkts); err != nil {
			panic(err)
		}
		if n, err := b.ReadOffload(bufs, sizes, tun.VirtioNetHdrLen); n != 1 || err != nil {
			panic(fmt.Sprint(n, err))
		}
	}); allocs != 0 {
		t.Errorf("%v allocations per super-segment", allocs)
	}
}
