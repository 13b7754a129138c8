package udpbatch

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// run is count datagrams of size bytes, which a segmentation-offload
// sender sends as one message where it can.
type run struct{ count, size int }

// runMessages returns the datagrams of runs, numbered from first, for to.
func runMessages(to netip.AddrPort, tag, first int, runs ...run) []Message {
	var msgs []Message
	for _, r := range runs {
		for range r.count {
			msgs = append(msgs, Message{Buf: dgram(tag, first+len(msgs), r.size), Addr: to})
		}
	}
	return msgs
}

// gsoSender is a Conn on uc that sends runs as segmentation-offload sends.
func gsoSender(t *testing.T, uc *net.UDPConn) *Conn {
	t.Helper()
	c := newConn(t, uc, false, 256)
	if !c.GSO() {
		t.Skip("no UDP_SEGMENT here (Linux 4.18)")
	}
	_ = uc.SetWriteBuffer(4 << 20)
	return c
}

// skipWithoutGRO skips a test for a Conn without GRO where the kernel
// refuses UDP_GRO, and fails it where the kernel takes it.
func skipWithoutGRO(t testing.TB) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.SOL_UDP, unix.UDP_GRO, 1); err != nil {
		t.Skipf("no UDP_GRO here (Linux 5.0): %v", err)
	}
	t.Fatal("GRO() is off, yet the kernel takes UDP_GRO")
}

// groReceiver is a Conn on uc with receive offload on.
func groReceiver(t *testing.T, uc *net.UDPConn, batch int) *Conn {
	t.Helper()
	_ = uc.SetReadBuffer(4 << 20)
	return newConnWith(t, uc, Options{BatchSize: batch, GRO: true})
}

// readCounted reads want datagrams with ReadBatch and len(msgs) buffers
// of size bytes, and returns copies of them and what each call returned.
func readCounted(t *testing.T, c *Conn, batch, size, want int) (got []Message, perCall []int) {
	t.Helper()
	msgs := make([]Message, batch)
	for i := range msgs {
		msgs[i].Buf = make([]byte, size)
	}
	for len(got) < want {
		if len(perCall) > want {
			t.Fatalf("%d ReadBatch calls for %d of %d datagrams", len(perCall), len(got), want)
		}
		n, err := c.ReadBatch(msgs)
		if err != nil {
			t.Fatalf("ReadBatch after %d of %d datagrams: %v", len(got), want, err)
		}
		if n < 1 || n > len(msgs) {
			t.Fatalf("ReadBatch returned n=%d with %d messages", n, len(msgs))
		}
		perCall = append(perCall, n)
		got = appendCopies(got, msgs[:n])
	}
	return got, perCall
}

// appendCopies appends msgs to got with buffers of their own.
func appendCopies(got, msgs []Message) []Message {
	for _, m := range msgs {
		m.Buf = bytes.Clone(m.Buf[:m.N])
		got = append(got, m)
	}
	return got
}

// checkWhole fails the test unless got is want, each datagram whole and
// from from.
func checkWhole(t *testing.T, got, want []Message, from netip.AddrPort) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d datagrams, want %d", len(got), len(want))
	}
	for i, m := range got {
		w := want[i].Buf
		switch {
		case m.Truncated:
			t.Fatalf("datagram %d (%d bytes) truncated to %d", i, len(w), m.N)
		case !bytes.Equal(m.Buf[:m.N], w):
			t.Fatalf("datagram %d: %d bytes %x..., want %d bytes %x...", i, m.N, m.Buf[:min(m.N, 4)], len(w), w[:min(len(w), 4)])
		case m.Addr != from:
			t.Fatalf("datagram %d from %v, want %v", i, m.Addr, from)
		}
	}
}

// TestGRO: runs sent with segmentation offload reach a receiver with
// receive offload as coalesced messages, and ReadBatch returns every
// datagram as a Message of its own, whole, in order, from the sender;
// on every topology (IPv4, IPv6, dual-stack, connected).
func TestGRO(t *testing.T) {
	for _, top := range topologies {
		t.Run(top.name, func(t *testing.T) {
			srvUC, peerUC, srvAt := top.setup(t)
			rx := groReceiver(t, srvUC, 64)
			tx := gsoSender(t, peerUC)
			// The sender cuts the 1400s at 46 (the IP limit); each shorter
			// datagram ends a run, an empty one is sent alone.
			want := runMessages(srvAt, 1, 0, run{70, 1400}, run{1, 500}, run{2, 1400}, run{1, 0}, run{1, 1400},
				run{10, 1000}, run{10, 200}, run{40, 30}, run{1, 1301})
			if n, err := tx.WriteBatch(want); n != len(want) || err != nil {
				t.Fatalf("WriteBatch = %d, %v; want %d, nil", n, err, len(want))
			}
			got, perCall := readCounted(t, rx, 64, 2048, len(want))
			checkWhole(t, got, want, addrPort(peerUC))
			t.Logf("%d datagrams in %d coalesced messages, %d ReadBatch calls returning %v",
				len(want), rx.Coalesced(), len(perCall), perCall)
			if rx.Coalesced() < 5 {
				t.Errorf("Coalesced() = %d, want at least 5: the runs did not arrive coalesced", rx.Coalesced())
			}
			if len(perCall) > len(want)/16 {
				t.Errorf("%d ReadBatch calls for %d datagrams", len(perCall), len(want))
			}
			if perCall[0] != 64 {
				t.Errorf("the first ReadBatch returned %d datagrams, want 64: runs of at most 46 from several messages", perCall[0])
			}
			if rx.Truncated() != 0 {
				t.Errorf("Truncated() = %d", rx.Truncated())
			}
			if n, err := rx.TryReadBatch(make([]Message, 4)); n != 0 || err != nil {
				t.Errorf("TryReadBatch after the last datagram = %d, %v; want 0, nil", n, err)
			}
		})
	}
}

// TestGROLeftovers: a caller with fewer Messages than a coalesced message
// holds gets the rest from later calls, ReadBatch and TryReadBatch alike,
// without a system call (the read deadline has passed, so one would
// fail), and WaitRead returns at once while any are left.
func TestGROLeftovers(t *testing.T) {
	for _, network := range []struct {
		name string
		addr netip.Addr
	}{{"udp4", lo4}, {"udp6", lo6}} {
		t.Run(network.name, func(t *testing.T) {
			rxUC, txUC := listen(t, network.name, network.addr), listen(t, network.name, network.addr)
			rx := groReceiver(t, rxUC, 64)
			tx := gsoSender(t, txUC)
			want := runMessages(addrPort(rxUC), 2, 0, run{20, 1000}, run{10, 700})
			if n, err := tx.WriteBatch(want); n != len(want) || err != nil {
				t.Fatalf("WriteBatch = %d, %v", n, err)
			}
			if err := rx.WaitRead(); err != nil {
				t.Fatal(err)
			}
			msgs := make([]Message, 16)
			for i := range msgs {
				msgs[i].Buf = make([]byte, 2048)
			}
			n, err := rx.ReadBatch(msgs[:3])
			if n != 3 || err != nil {
				t.Fatalf("ReadBatch of 3 = %d, %v", n, err)
			}
			if rx.Coalesced() != 2 {
				t.Fatalf("Coalesced() = %d after the first read, want 2", rx.Coalesced())
			}
			got := appendCopies(nil, msgs[:n])

			if err := rxUC.SetReadDeadline(time.Now().Add(-time.Second)); err != nil {
				t.Fatal(err)
			}
			// 5, 4, 16 (across the two messages), 1, then 5 with 1 left.
			sizes := []int{5, 4, 16, 1}
			for i := 0; len(got) < len(want); i++ {
				if i > len(want) {
					t.Fatalf("%d calls for %d datagrams", i, len(got))
				}
				if err := rx.WaitRead(); err != nil {
					t.Fatalf("WaitRead with %d datagrams left: %v", len(want)-len(got), err)
				}
				k, read, name := sizes[i%len(sizes)], rx.ReadBatch, "ReadBatch"
				if i%2 == 1 {
					read, name = rx.TryReadBatch, "TryReadBatch"
				}
				n, err := read(msgs[:k])
				if n != min(k, len(want)-len(got)) || err != nil {
					t.Fatalf("%s of %d with %d left = %d, %v", name, k, len(want)-len(got), n, err)
				}
				got = appendCopies(got, msgs[:n])
			}
			checkWhole(t, got, want, addrPort(txUC))

			// None left: now each call goes to the socket, past its deadline.
			if err := rx.WaitRead(); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("WaitRead with none left: %v, want os.ErrDeadlineExceeded", err)
			}
			if n, err := rx.TryReadBatch(msgs); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("TryReadBatch with none left = %d, %v; want os.ErrDeadlineExceeded", n, err)
			}
			if n, err := rx.ReadBatch(msgs); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("ReadBatch with none left = %d, %v; want os.ErrDeadlineExceeded", n, err)
			}
		})
	}
}

// TestGROTruncated: a datagram of a coalesced message longer than the
// caller's buffer is cut to it, marked and counted, as without GRO; the
// datagrams after it are whole.
func TestGROTruncated(t *testing.T) {
	rxUC, txUC := listen(t, "udp4", lo4), listen(t, "udp4", lo4)
	rx := groReceiver(t, rxUC, 64)
	tx := gsoSender(t, txUC)
	want := runMessages(addrPort(rxUC), 3, 0, run{10, 1000}, run{5, 300})
	if n, err := tx.WriteBatch(want); n != len(want) || err != nil {
		t.Fatalf("WriteBatch = %d, %v", n, err)
	}
	got, _ := readCounted(t, rx, 8, 600, len(want))
	for i, m := range got {
		w := want[i].Buf
		if long := len(w) > 600; m.Truncated != long || m.N != min(len(w), 600) || !bytes.Equal(m.Buf, w[:m.N]) {
			t.Errorf("datagram %d of %d bytes: Truncated=%v N=%d, want %v, %d", i, len(w), m.Truncated, m.N, long, min(len(w), 600))
		}
		if m.Addr != addrPort(txUC) {
			t.Errorf("datagram %d from %v", i, m.Addr)
		}
	}
	if rx.Truncated() != 10 {
		t.Errorf("Truncated() = %d, want 10", rx.Truncated())
	}
	if rx.Coalesced() == 0 {
		t.Error("Coalesced() = 0: nothing arrived coalesced")
	}
}

// TestGROFallback: where UDP_GRO cannot be set the Conn says so once and
// reads as without it; a Conn that falls back to one datagram per system
// call turns it off, and first returns what it had left over.
func TestGROFallback(t *testing.T) {
	t.Run("refused", func(t *testing.T) {
		var logged bytes.Buffer
		log := slog.New(slog.NewTextHandler(&logged, nil))
		rxUC := listen(t, "udp4", lo4)
		rx := New(rxUC, Options{Logger: log, GRO: true, failGRO: true})
		if rx.Fallback() != nil {
			t.Skipf("no batch system calls here: %v", rx.Fallback())
		}
		if err := rxUC.SetDeadline(time.Now().Add(patience)); err != nil {
			t.Fatal(err)
		}
		if rx.GRO() {
			t.Fatal("GRO() is on although UDP_GRO was refused")
		}
		if n := strings.Count(logged.String(), "\n"); n != 1 || !strings.Contains(logged.String(), "level=INFO") ||
			!strings.Contains(logged.String(), "UDP_GRO") {
			t.Fatalf("logged %d lines, want one at INFO naming UDP_GRO:\n%s", n, logged.String())
		}
		t.Logf("logged: %s", strings.TrimSpace(logged.String()))
		tx := gsoSender(t, listen(t, "udp4", lo4))
		want := runMessages(addrPort(rxUC), 4, 0, run{20, 500})
		if n, err := tx.WriteBatch(want); n != len(want) || err != nil {
			t.Fatalf("WriteBatch = %d, %v", n, err)
		}
		got, _ := readCounted(t, rx, 64, 2048, len(want))
		checkWhole(t, got, want, addrPort(tx.UDPConn()))
		if rx.Coalesced() != 0 {
			t.Errorf("Coalesced() = %d without GRO", rx.Coalesced())
		}
	})
	t.Run("not asked", func(t *testing.T) {
		if c := newConn(t, listen(t, "udp4", lo4), false, 0); c.GRO() {
			t.Error("GRO() is on without Options.GRO")
		}
	})
	t.Run("no batch calls", func(t *testing.T) {
		c := New(listen(t, "udp4", lo4), Options{GRO: true, forceFallback: true})
		if c.GRO() || c.Fallback() == nil {
			t.Errorf("GRO() = %v, Fallback() = %v on a Conn told to fall back", c.GRO(), c.Fallback())
		}
	})
	t.Run("falls back with leftovers", func(t *testing.T) {
		rxUC, txUC := listen(t, "udp4", lo4), listen(t, "udp4", lo4)
		rx := groReceiver(t, rxUC, 64)
		tx := gsoSender(t, txUC)
		want := runMessages(addrPort(rxUC), 5, 0, run{20, 500})
		if n, err := tx.WriteBatch(want); n != len(want) || err != nil {
			t.Fatalf("WriteBatch = %d, %v", n, err)
		}
		msgs := make([]Message, 3)
		for i := range msgs {
			msgs[i].Buf = make([]byte, 2048)
		}
		if n, err := rx.ReadBatch(msgs); n != 3 || err != nil {
			t.Fatalf("ReadBatch = %d, %v", n, err)
		}
		got := appendCopies(nil, msgs)
		rx.disable(&UnsupportedError{Op: "sendmmsg", Err: syscall.ENOSYS})
		if rx.GRO() {
			t.Fatal("GRO() still on after the fallback")
		}
		rest, perCall := readCounted(t, rx, 64, 2048, len(want)-3)
		if len(perCall) != 1 {
			t.Errorf("the 17 left over took %d calls %v, want 1", len(perCall), perCall)
		}
		checkWhole(t, append(got, rest...), want, addrPort(txUC))

		// UDP_GRO is off: a run sent now is read datagram by datagram, whole.
		more := runMessages(addrPort(rxUC), 5, 20, run{10, 500})
		if n, err := tx.WriteBatch(more); n != len(more) || err != nil {
			t.Fatalf("WriteBatch = %d, %v", n, err)
		}
		got, perCall = readCounted(t, rx, 64, 2048, len(more))
		checkWhole(t, got, more, addrPort(txUC))
		if len(perCall) != len(more) || rx.Coalesced() != 1 {
			t.Errorf("after the fallback: %d calls for %d datagrams, Coalesced() = %d; want one each, 1",
				len(perCall), len(more), rx.Coalesced())
		}
	})
}

// TestGROConcurrent is for the race detector: two senders send runs while
// one goroutine reads with a batch smaller than the runs (WaitRead, then
// TryReadBatch until it comes back short) and another asks WaitRead,
// GRO, Coalesced and Truncated all the while. Each sender's datagrams
// arrive whole and in order.
func TestGROConcurrent(t *testing.T) {
	const senders, batches = 2, 20
	rxUC := listen(t, "udp4", lo4)
	rx := groReceiver(t, rxUC, 64)
	var want [senders][]Message
	from := make(map[netip.AddrPort]int)
	txs := make([]*Conn, senders)
	for s := range senders {
		txs[s] = gsoSender(t, listen(t, "udp4", lo4))
		from[addrPort(txs[s].UDPConn())] = s
		for b := range batches {
			want[s] = append(want[s], runMessages(addrPort(rxUC), s, len(want[s]), run{15, 300 + 10*s + b}, run{1, 100})...)
		}
	}
	total := senders * len(want[0])

	var wg sync.WaitGroup
	errs := make(chan error, senders+1)
	done := make(chan struct{})
	for s, tx := range txs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for b := range batches {
				per := len(want[s]) / batches
				if n, err := tx.WriteBatch(want[s][b*per : (b+1)*per]); n != per || err != nil {
					errs <- fmt.Errorf("sender %d batch %d: WriteBatch = %d, %v", s, b, n, err)
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			if i > 100000 {
				errs <- errors.New("watcher: still running after 100000 rounds")
				return
			}
			_ = rx.GRO()
			_ = rx.Coalesced() + rx.Truncated()
			if err := rx.WaitRead(); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				errs <- fmt.Errorf("watcher: WaitRead: %v", err)
				return
			}
			time.Sleep(100 * time.Microsecond)
		}
	}()

	msgs := make([]Message, 5)
	for i := range msgs {
		msgs[i].Buf = make([]byte, 2048)
	}
	var got [senders][]Message
	received := 0
	for rounds := 0; received < total; rounds++ {
		if rounds > total {
			t.Fatalf("%d rounds for %d of %d datagrams", rounds, received, total)
		}
		if err := rx.WaitRead(); err != nil {
			t.Fatalf("WaitRead after %d of %d datagrams: %v", received, total, err)
		}
		for {
			n, err := rx.TryReadBatch(msgs)
			if err != nil {
				t.Fatalf("TryReadBatch after %d of %d datagrams: %v", received, total, err)
			}
			for _, m := range msgs[:n] {
				s, ok := from[m.Addr]
				if !ok {
					t.Fatalf("a datagram from %v", m.Addr)
				}
				got[s] = appendCopies(got[s], []Message{m})
			}
			received += n
			if n < len(msgs) || received >= total {
				break // nothing more queued, or nothing more to come
			}
		}
	}
	close(done)
	_ = rxUC.SetReadDeadline(time.Now()) // ends a watcher's WaitRead
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for s := range senders {
		checkWhole(t, got[s], want[s], addrPort(txs[s].UDPConn()))
	}
	if rx.Coalesced() == 0 {
		t.Error("Coalesced() = 0: nothing arrived coalesced")
	}
	t.Logf("%d datagrams in %d coalesced messages", total, rx.Coalesced())
}

// TestStopGRO: after StopGRO, the datagrams already split still come,
// and runs sent afterwards arrive datagram by datagram, whole.
func TestStopGRO(t *testing.T) {
	top := topologies[0]
	srvUC, peerUC, srvAt := top.setup(t)
	rx := groReceiver(t, srvUC, 64)
	if !rx.GRO() {
		skipWithoutGRO(t)
	}
	tx := gsoSender(t, peerUC)
	first := runMessages(srvAt, 1, 0, run{40, 1400})
	if n, err := tx.WriteBatch(first); n != len(first) || err != nil {
		t.Fatalf("WriteBatch = %d, %v", n, err)
	}
	got, _ := readCounted(t, rx, 10, 2048, 10) // 30 left over
	rx.StopGRO()
	if rx.GRO() {
		t.Fatal("GRO() still on after StopGRO")
	}
	coalesced := rx.Coalesced()
	more := runMessages(srvAt, 1, len(first), run{40, 1400})
	if n, err := tx.WriteBatch(more); n != len(more) || err != nil {
		t.Fatalf("WriteBatch = %d, %v", n, err)
	}
	rest, _ := readCounted(t, rx, 64, 2048, 70)
	checkWhole(t, append(got, rest...), append(first, more...), addrPort(peerUC))
	if rx.Coalesced() != coalesced {
		t.Fatalf("Coalesced() rose from %d to %d after StopGRO", coalesced, rx.Coalesced())
	}
}
