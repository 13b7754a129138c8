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

// stackPair sets up the lab's two Nets (with offloads unless noOffload)
// and faketcp stacks on them, connects the client's to the server's, and
// sends a datagram each way, as iketcp's hello and its answer go first:
// until the server's stack has sent a segment after its SYN-ACK, the
// client holds its data to the SYN-ACK's window, never scaled. The
// client's log lines go to logs.
func stackPair(t *testing.T, noOffload bool, logs *lockedBuffer) (cs, ss *faketcp.Stack, cc, sc *faketcp.Conn) {
	t.Helper()
	l := newFakeTCPLab(t)
	ccfg := Config{Role: Client, Name: "ftcli", Net4: ftClientNet4, NoOffload: noOffload,
		Logger: slog.New(slog.NewTextHandler(logs, nil))}
	scfg := Config{Role: Server, Name: "ftsrv", Net4: ftServerNet4, Port: 4500, NoOffload: noOffload}
	var stacks []*faketcp.Stack
	t.Cleanup(func() {
		for _, s := range stacks {
			<-s.Done() // the reader ends with its Net, which closes before
		}
	})
	client := start(t, ccfg)
	server := startIn(t, l.server, scfg)
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
	cs, ss = newStack(client), newStack(server)
	if cs.Offload() == noOffload {
		t.Fatalf("the client's stack offloads: %v", cs.Offload())
	}
	ln, err := ss.Listen(4500)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if cc, err = cs.Dial(ctx, netip.AddrPortFrom(ftServerV4, 4500)); err != nil {
		t.Fatal(err)
	}
	if sc, err = ln.Accept(ctx); err != nil {
		t.Fatal(err)
	}
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
	return cs, ss, cc, sc
}

func checkStacks(t *testing.T, noOffload bool) {
	var logs lockedBuffer
	cs, ss, cc, sc := stackPair(t, noOffload, &logs)
	want := "fake-TCP mode: the TUN device moves runs of segments in one system call"
	if noOffload {
		want = "fake-TCP mode: TUN offloads turned off"
	}
	if n := strings.Count(logs.String(), want); n != 1 {
		t.Errorf("the client logged %q %d times:\n%s", want, n, logs.String())
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

// TestFakeTCPSenderOutrunsReceiver has the client send 64 MiB as fast as
// it can to a server whose stack reads slower (its handler takes 1 ms a
// batch), so that the server's device fills: its 500 packets are, with
// super-segments, more than the 8 MiB window the server advertised. A
// sender that ran past that window would send only segments that the
// client's own conntrack finds invalid (the table drops them); the server
// would hear nothing more, acknowledge nothing more, and the conn would
// carry nothing ever after. The client's stack holds to the window
// instead, dropping what does not fit, and what it sends after the burst
// arrives.
func TestFakeTCPSenderOutrunsReceiver(t *testing.T) {
	var logs lockedBuffer
	_, _, cc, sc := stackPair(t, false, &logs)
	var got atomic.Int64
	final := make(chan struct{})
	var once sync.Once
	sc.SetHandler(func(b []faketcp.Payload) {
		time.Sleep(time.Millisecond)
		for _, p := range b {
			got.Add(1)
			if p.N == 7 {
				once.Do(func() { close(final) })
			}
		}
	})
	const batch, size = 32, 1400
	bufs := make([][]byte, batch)
	for k := range bufs {
		bufs[k] = make([]byte, faketcp.Headroom+size)
	}
	for range 64 << 20 / (batch * size) {
		if err := cc.Send(bufs, faketcp.Headroom); err != nil {
			t.Fatal(err)
		}
	}
	st := cc.Stats()
	t.Logf("the client sent %d datagrams and held back %d at the window's end", st.SegmentsSent, st.DroppedWindow)
	if st.DroppedWindow == 0 {
		t.Error("the client ran 64 MiB into a slow reader without holding back at the window's end")
	}
	// The server reads what its device held and acknowledges it; then
	// the client's window moves on, and what it sends arrives.
	deadline := time.Now().Add(20 * time.Second)
	for {
		if err := cc.Send([][]byte{make([]byte, faketcp.Headroom+7)}, faketcp.Headroom); err != nil {
			t.Fatal(err)
		}
		select {
		case <-final:
			t.Logf("the server got %d datagrams, then one sent after the burst", got.Load())
			return
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing sent after the burst arrived in 20 s: the conn stalled (server got %d datagrams; client %+v)", got.Load(), cc.Stats())
		}
	}
}
