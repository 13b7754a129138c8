package fakenet

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/nat/nattest"
)

// TestFakeTCPStacksOffload runs nat/faketcp's stacks on the two Nets of
// the lab, with the offloads on: runs of datagrams leave the client's
// stack as super-segments, cross both hosts' forwarding and NAT and the
// veth pair whole, and reach the server's stack whole, which takes them
// apart: every datagram arrives intact and in order, each way.
func TestFakeTCPStacksOffload(t *testing.T) { checkStacks(t, false) }

// TestFakeTCPStacksNoOffload is the same with Config.NoOffload: one
// segment per packet, as before the offloads.
func TestFakeTCPStacksNoOffload(t *testing.T) { checkStacks(t, true) }

// lockedBuffer is a log destination that several goroutines write.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func checkStacks(t *testing.T, noOffload bool) {
	l := newFakeTCPLab(t)
	var logs lockedBuffer
	ccfg := Config{Role: Client, Name: "ftcli", Net4: ftClientNet4, NoOffload: noOffload,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	scfg := Config{Role: Server, Name: "ftsrv", Net4: ftServerNet4, Port: 4500, NoOffload: noOffload}
	var stacks []*faketcp.Stack
	t.Cleanup(func() {
		for _, s := range stacks {
			<-s.Done() // the reader ends with its Net, which closes before
		}
	})
	client := start(t, ccfg)
	server := startIn(t, l.server, scfg)
	want := "fake-TCP mode: the TUN device moves runs of segments in one system call"
	if noOffload {
		want = "fake-TCP mode: TUN offloads turned off"
	}
	if n := strings.Count(logs.String(), want); n != 1 {
		t.Errorf("the client logged %q %d times:\n%s", want, n, logs.String())
	}
	if (client.Offload() == nil) == noOffload || (server.Offload() == nil) == noOffload {
		t.Fatalf("offloads: client %v, server %v", client.Offload(), server.Offload())
	}
	newStack := func(n *Net) *faketcp.Stack {
		s, err := faketcp.NewStack(n, faketcp.Config{Local: n.Endpoint4(), Logger: nattest.Logger(t)})
		if err != nil {
			t.Fatal(err)
		}
		stacks = append(stacks, s)
		t.Cleanup(func() { s.Close() })
		return s
	}
	cs, ss := newStack(client), newStack(server)
	if cs.Offload() == noOffload {
		t.Fatalf("the client's stack offloads: %v", cs.Offload())
	}
	ln, err := ss.Listen(4500)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cc, err := cs.Dial(ctx, netip.AddrPortFrom(ftServerV4, 4500))
	if err != nil {
		t.Fatal(err)
	}
	sc, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// A datagram each way first, as iketcp's hello and its answer go
	// first: until the server's stack has sent a segment after its
	// SYN-ACK, conntrack (the client's own, whose table drops what it
	// finds invalid) holds the client to the SYN-ACK's window, never
	// scaled, 64240 bytes; a burst past it before the server's first ACK
	// comes back would be lost.
	for _, dir := range []struct{ from, to *faketcp.Conn }{{cc, sc}, {sc, cc}} {
		arrived := make(chan struct{}, 1)
		dir.to.SetHandler(func([]faketcp.Payload) {
			select {
			case arrived <- struct{}{}:
			default:
			}
		})
		if err := dir.from.Send([][]byte{make([]byte, faketcp.Headroom+100)}, faketcp.Headroom); err != nil {
			t.Fatal(err)
		}
		select {
		case <-arrived:
		case <-ctx.Done():
			t.Fatal("the first datagram did not arrive")
		}
	}

	const count, batch, size = 3200, 32, 1400 // count a multiple of batch
	for _, dir := range []struct {
		name     string
		from, to *faketcp.Conn
	}{{"client to server", cc, sc}, {"server to client", sc, cc}} {
		var got atomic.Int64
		var bad atomic.Value
		dir.to.SetHandler(func(b []faketcp.Payload) {
			for _, p := range b {
				d := p.Buf[p.Off : p.Off+p.N]
				n := got.Add(1) - 1
				if p.Off < faketcp.Headroom || len(d) != size || binary.BigEndian.Uint32(d) != uint32(n) || d[size-1] != byte(n) {
					bad.CompareAndSwap(nil, d[:min(len(d), 8)])
				}
			}
		})
		bufs := make([][]byte, batch)
		for k := range bufs {
			bufs[k] = make([]byte, faketcp.Headroom+size)
		}
		deadline := time.Now().Add(30 * time.Second)
		for sent := 0; sent < count; sent += batch {
			for k := range bufs {
				d := bufs[k][faketcp.Headroom:]
				binary.BigEndian.PutUint32(d, uint32(sent+k))
				d[size-1] = byte(sent + k)
			}
			if err := dir.from.Send(bufs, faketcp.Headroom); err != nil {
				t.Fatalf("%s: %v", dir.name, err)
			}
			// At most two batches in flight: the devices' queues hold
			// 500 packets, and nothing here may be lost.
			for got.Load() < int64(sent-batch) && time.Now().Before(deadline) {
				time.Sleep(100 * time.Microsecond)
			}
		}
		for got.Load() < count && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if b := bad.Load(); b != nil {
			t.Fatalf("%s: a datagram arrived damaged or out of order: % x", dir.name, b)
		}
		if got.Load() != count {
			t.Fatalf("%s: %d of %d datagrams arrived", dir.name, got.Load(), count)
		}
	}
	cst, sst := cc.Stats(), sc.Stats()
	t.Logf("client sent %d segments, %d of them in super-segments; the server's stack read %d super-segments whole",
		cst.SegmentsSent, cst.SuperSegmentsSent, ss.Stats().SuperSegments)
	t.Logf("server sent %d segments, %d of them in super-segments; the client's stack read %d super-segments whole",
		sst.SegmentsSent, sst.SuperSegmentsSent, cs.Stats().SuperSegments)
	if cst.Ack != sst.Seq || sst.Ack != cst.Seq {
		t.Errorf("client seq %d ack %d, server seq %d ack %d", cst.Seq, cst.Ack, sst.Seq, sst.Ack)
	}
	supers := cst.SuperSegmentsSent + sst.SuperSegmentsSent + ss.Stats().SuperSegments + cs.Stats().SuperSegments
	switch {
	case noOffload && supers != 0:
		t.Errorf("without offloads, %d super-segments", supers)
	case !noOffload && (cst.SuperSegmentsSent == 0 || ss.Stats().SuperSegments == 0 || sst.SuperSegmentsSent == 0 || cs.Stats().SuperSegments == 0):
		t.Error("with offloads, some way carried no super-segment whole")
	}
}
