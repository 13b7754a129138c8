package udpbatch

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	benchSize = 1400 // an ESP datagram that fits a 1500-byte path
	benchBulk = 64   // datagrams per batch, and per credit of the flow control
	// benchCredits bounds the datagrams in flight to benchCredits×benchBulk,
	// well within the receive buffer, so that the kernel has no reason to
	// drop any.
	benchCredits = 2
	// benchStall is how long the receiver waits for progress before it
	// counts what is missing as lost and frees the sender.
	benchStall = 200 * time.Millisecond
)

// BenchmarkLoopback moves 1400-byte datagrams over loopback from one socket
// to another, one op per datagram: "single" uses WriteMsgUDPAddrPort and
// ReadMsgUDPAddrPort, one system call per datagram; "batch" uses WriteBatch
// and ReadBatch with batches of 64 (the sender with segmentation offload
// where the kernel has it, the receiver without receive offload, so the
// kernel splits each run on arrival); "gro" is "batch" with receive offload
// on, so each run arrives as one message. All run the same credit-based
// flow control, so their ns/op compare directly.
func BenchmarkLoopback(b *testing.B) {
	b.Run("single", func(b *testing.B) { benchLoopback(b, false, false) })
	b.Run("batch", func(b *testing.B) { benchLoopback(b, true, false) })
	b.Run("gro", func(b *testing.B) { benchLoopback(b, true, true) })
}

func benchLoopback(b *testing.B, batch, gro bool) {
	rx, tx := listen(b, "udp4", lo4), listen(b, "udp4", lo4)
	_ = rx.SetReadBuffer(4 << 20)
	_ = tx.SetWriteBuffer(4 << 20)
	if err := tx.SetWriteDeadline(time.Now().Add(time.Minute)); err != nil {
		b.Fatal(err)
	}
	to := addrPort(rx)
	var brx, btx *Conn
	if batch {
		brx, btx = New(rx, Options{BatchSize: benchBulk, GRO: gro}), New(tx, Options{BatchSize: benchBulk})
		if why := brx.Fallback(); why != nil {
			b.Skipf("no batch system calls: %v", why)
		}
		if gro && (!brx.GRO() || !btx.GSO()) {
			b.Skipf("needs UDP_SEGMENT and UDP_GRO: GSO %v, GRO %v", btx.GSO(), brx.GRO())
		}
	}

	// The sender waits for a credit before each bulk of benchBulk; the
	// receiver gives one back for each bulk received (or lost).
	credits := make(chan struct{}, benchCredits+1)
	for range benchCredits {
		credits <- struct{}{}
	}
	done := make(chan struct{})
	var sent atomic.Int64
	var sendErr error
	var wg sync.WaitGroup

	payload := make([]byte, benchSize)
	out := make([]Message, benchBulk)
	for i := range out {
		out[i] = Message{Buf: payload, Addr: to}
	}
	in := make([]Message, benchBulk)
	for i := range in {
		in[i].Buf = make([]byte, 2048)
	}
	buf := in[0].Buf

	b.SetBytes(benchSize)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()

	wg.Add(1)
	go func() {
		defer wg.Done()
		for total := b.N; int(sent.Load()) < total; {
			select {
			case <-credits:
			case <-done:
				return
			}
			k := min(benchBulk, total-int(sent.Load()))
			if batch {
				n, err := btx.WriteBatch(out[:k])
				sent.Add(int64(n))
				if err != nil {
					sendErr = err
					return
				}
				continue
			}
			for range k {
				if _, _, err := tx.WriteMsgUDPAddrPort(payload, nil, to); err != nil {
					sendErr = err
					return
				}
				sent.Add(1)
			}
		}
	}()

	var received, lost, stalls int
	given := 0 // credits given back
	fail := func(format string, args ...any) {
		close(done)
		wg.Wait()
		b.Fatalf(format, args...)
	}
	if err := rx.SetReadDeadline(time.Now().Add(benchStall)); err != nil {
		fail("%v", err)
	}
	for received+lost < b.N {
		var n int
		var err error
		if batch {
			n, err = brx.ReadBatch(in)
		} else {
			n, _, _, _, err = rx.ReadMsgUDPAddrPort(buf, nil)
			if err == nil {
				n = 1
			}
		}
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			// No progress for benchStall: what was sent and has not
			// arrived is lost.
			if stalls++; stalls > 20 {
				fail("stalled %d times: sent %d, received %d", stalls, sent.Load(), received)
			}
			lost = int(sent.Load()) - received
		case err != nil:
			fail("read: %v", err)
		}
		received += n
		if (received+lost)/benchBulk > given {
			for (received+lost)/benchBulk > given {
				given++
				select {
				case credits <- struct{}{}:
				default:
				}
			}
			if err := rx.SetReadDeadline(time.Now().Add(benchStall)); err != nil {
				fail("%v", err)
			}
		} else if err != nil {
			if err := rx.SetReadDeadline(time.Now().Add(benchStall)); err != nil {
				fail("%v", err)
			}
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	close(done)
	wg.Wait()
	if sendErr != nil {
		b.Fatalf("send: %v", sendErr)
	}
	b.ReportMetric(float64(received)/elapsed.Seconds(), "datagrams/s")
	b.ReportMetric(float64(lost)/float64(b.N), "lost/op")
	if gro {
		// Datagrams per coalesced message: 0 if none came coalesced.
		perMessage := 0.0
		if c := brx.Coalesced(); c > 0 {
			perMessage = float64(received) / float64(c)
		}
		b.ReportMetric(perMessage, "datagrams/coalesced")
	}
}
