package tuntest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/nat/nattest"
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
