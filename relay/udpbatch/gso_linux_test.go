package udpbatch

import (
	"bytes"
	"net/netip"
	"testing"
	"time"
)

// gsoBatch is a batch that exercises how WriteBatch cuts runs for
// segmentation offload: a long run to one peer (cut at the segment
// limit), a shorter datagram that ends a run, a longer one that starts
// another, an empty datagram, and alternating peers.
func gsoBatch(a, b netip.AddrPort) []Message {
	var msgs []Message
	add := func(to netip.AddrPort, size int) {
		p := bytes.Repeat([]byte{byte(len(msgs))}, size)
		if size >= 4 {
			p[0], p[1] = byte(len(msgs)>>8), byte(len(msgs))
		}
		msgs = append(msgs, Message{Buf: p, Addr: to})
	}
	for range 70 {
		add(a, 1400)
	}
	add(a, 500)
	add(a, 1400)
	add(a, 1400)
	add(a, 0)
	add(a, 1400)
	for i := range 6 {
		if i%2 == 0 {
			add(b, 1000)
		} else {
			add(a, 1000)
		}
	}
	for range 50 {
		add(b, 1300) // 50×1300 passes the IP limit: cut by bytes
	}
	add(b, 1301)
	return msgs
}

// TestGSO: datagrams sent in segmentation-offload runs arrive one by one,
// each whole and in order, at the peer each was for; and when the kernel
// refuses a run (failGSO), the Conn says so, sends the rest datagram by
// datagram, and sends nothing twice.
func TestGSO(t *testing.T) {
	for _, fail := range []bool{false, true} {
		name := "offload"
		if fail {
			name = "refused"
		}
		t.Run(name, func(t *testing.T) {
			src := listen(t, "udp4", lo4)
			ra, rb := listen(t, "udp4", lo4), listen(t, "udp4", lo4)
			for _, rx := range []interface{ SetReadBuffer(int) error }{ra, rb} {
				rx.SetReadBuffer(4 << 20)
			}
			c := New(src, Options{BatchSize: 256, failGSO: fail})
			if c.Fallback() != nil {
				t.Skipf("no batch system calls: %v", c.Fallback())
			}
			if !c.GSO() {
				t.Skip("this kernel has no UDP_SEGMENT")
			}
			msgs := gsoBatch(addrPort(ra), addrPort(rb))
			if n, err := c.WriteBatch(msgs); n != len(msgs) || err != nil {
				t.Fatalf("WriteBatch = %d, %v; want %d, nil", n, err, len(msgs))
			}
			if c.GSO() == fail {
				t.Fatalf("GSO() = %v after the batch, want %v", c.GSO(), !fail)
			}
			ca, cb := newConn(t, ra, false, 64), newConn(t, rb, false, 64)
			var wantA, wantB []Message
			for _, m := range msgs {
				if m.Addr == addrPort(ra) {
					wantA = append(wantA, m)
				} else {
					wantB = append(wantB, m)
				}
			}
			for _, side := range []struct {
				c    *Conn
				want []Message
			}{{ca, wantA}, {cb, wantB}} {
				got, _ := readAll(t, side.c, len(side.want))
				for i, m := range got {
					if !bytes.Equal(m.Buf[:m.N], side.want[i].Buf) {
						t.Fatalf("datagram %d: %d bytes, want %d (%x... vs %x...)", i, m.N, len(side.want[i].Buf),
							m.Buf[:min(m.N, 4)], side.want[i].Buf[:min(len(side.want[i].Buf), 4)])
					}
				}
			}
			// Nothing more: a run refused and resent would show twice.
			ra.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if n, _, err := ra.ReadFromUDPAddrPort(make([]byte, 2048)); err == nil {
				t.Fatalf("an extra %d-byte datagram arrived", n)
			}
		})
	}
}

// TestGSOConnected: on a connected socket, with Addr zero, runs form too.
func TestGSOConnected(t *testing.T) {
	rx := listen(t, "udp4", lo4)
	rx.SetReadBuffer(4 << 20)
	tx := dial(t, "udp4", lo4, addrPort(rx))
	c := New(tx, Options{})
	if !c.GSO() {
		t.Skip("no UDP_SEGMENT here")
	}
	msgs := make([]Message, 64)
	for i := range msgs {
		msgs[i].Buf = payload(3, 40)
		msgs[i].Buf[len(msgs[i].Buf)-1] = byte(i)
	}
	if n, err := c.WriteBatch(msgs); n != len(msgs) || err != nil {
		t.Fatalf("WriteBatch = %d, %v", n, err)
	}
	got, _ := readAll(t, newConn(t, rx, false, 64), len(msgs))
	for i, m := range got {
		if !bytes.Equal(m.Buf[:m.N], msgs[i].Buf) {
			t.Fatalf("datagram %d differs", i)
		}
	}
}

// TestSmallBatchSendsWhole: a Conn that reads 8 at a time (a server's
// backend socket) still sends a burst of 64 in one system call, with a
// send scratch it shares with other such Conns; what arrives is whole and
// in order.
func TestSmallBatchSendsWhole(t *testing.T) {
	rx := listen(t, "udp4", lo4)
	rx.SetReadBuffer(4 << 20)
	var conns []*Conn
	for range 2 {
		c := New(dial(t, "udp4", lo4, addrPort(rx)), Options{BatchSize: 8})
		if c.Fallback() != nil {
			t.Skipf("no batch system calls: %v", c.Fallback())
		}
		conns = append(conns, c)
	}
	msgs := make([]Message, sharedSendBatch)
	for i := range msgs {
		msgs[i].Buf = payload(4, 1400)
		msgs[i].Buf[len(msgs[i].Buf)-1] = byte(i)
	}
	for _, c := range conns {
		before := c.sendCalls.Load()
		if n, err := c.WriteBatch(msgs); n != len(msgs) || err != nil {
			t.Fatalf("WriteBatch = %d, %v", n, err)
		}
		if calls := c.sendCalls.Load() - before; calls != 1 {
			t.Errorf("%d datagrams took %d system calls on a Conn of batch 8, want 1", len(msgs), calls)
		}
	}
	rc := newConn(t, rx, false, 64)
	got, _ := readAll(t, rc, 2*len(msgs))
	for i, m := range got {
		if want := msgs[i%len(msgs)].Buf; !bytes.Equal(m.Buf[:m.N], want) {
			t.Fatalf("datagram %d: %d bytes, differs from what was sent", i, m.N)
		}
	}
}
