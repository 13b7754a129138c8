// Package relaytest holds what tests and benchmarks of iketcp's relays
// share: fake IKE and ESP datagrams, a rig of a client and a server
// between two fake daemons on loopback, a victim session that attack tests
// must leave untouched, the hot-path allocation check, and a harness that
// measures how many datagrams a path moves.
package relaytest

import (
	"encoding/binary"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iketcp/iketcp/relay/udpbatch"
)

// ESP returns an ESP packet of size bytes with the given SPI and sequence
// number, its body a pattern that depends on both.
func ESP(spi, seq uint32, size int) []byte {
	b := make([]byte, size)
	binary.BigEndian.PutUint32(b, spi)
	binary.BigEndian.PutUint32(b[4:], seq)
	for i := 8; i < size; i++ {
		b[i] = byte(seq) + byte(i)
	}
	return b
}

// MeasureFlow sends b.N datagrams on tx and receives them on rx, both in
// batches (sendmmsg/recvmmsg) so that the endpoints are faster than what
// they measure, with at most window datagrams in flight so that the kernel
// does not drop them for want of buffer. A datagram still missing after a
// read timeout counts as lost (reported per op) and the flow goes on, so a
// drop cannot hang it.
func MeasureFlow(b *testing.B, tx, rx *net.UDPConn) {
	const chunk, window = 64, 256 // datagrams per batch, and in flight at most
	payload := ESP(0xc9, 1, 1400)
	txb := udpbatch.New(tx, udpbatch.Options{BatchSize: chunk})
	// The receiver asks for GRO, and the sender sends runs with GSO
	// (udpbatch does where the kernel can): the baseline is the best
	// this machine does from one socket to another.
	rxb := udpbatch.New(rx, udpbatch.Options{BatchSize: chunk, GRO: true})
	out := make([]udpbatch.Message, chunk)
	for i := range out {
		out[i].Buf = payload
	}
	credits := make(chan struct{}, window/chunk+1)
	for range window / chunk {
		credits <- struct{}{}
	}
	var lost atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		in := make([]udpbatch.Message, chunk)
		for i := range in {
			in[i].Buf = make([]byte, 2048)
		}
		for got, stalls := 0, 0; got < b.N; {
			rx.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, err := rxb.ReadBatch(in)
			if err != nil {
				if stalls++; stalls > 50 {
					b.Error("receiver stalled 50 times")
					return
				}
				skip := min(chunk-got%chunk, b.N-got) // the rest of this chunk is not coming
				got += skip
				lost.Add(int64(skip))
				credits <- struct{}{}
				continue
			}
			for range n {
				if got++; got%chunk == 0 {
					credits <- struct{}{}
				}
			}
		}
	}()
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	b.ResetTimer()
	for sent := 0; sent < b.N; sent += chunk {
		select {
		case <-credits:
		case <-done:
			b.Fatal("receiver gave up")
		}
		if _, err := txb.WriteBatch(out[:min(chunk, b.N-sent)]); err != nil {
			b.Fatal(err)
		}
	}
	<-done
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "datagrams/s")
	b.ReportMetric(float64(lost.Load())/float64(b.N), "lost/op")
}
