package faketcp

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/iketcp/iketcp/nat/tun/tuntest"
)

const testPort = 4500

// pair is two stacks on the ends of a pipe, with a conn between them:
// the client dialled, the server accepted.
type pair struct {
	devA, devB     *tuntest.PipeEnd // the client's and the server's
	a, b           *Stack
	listener       *Listener
	client, server *Conn
}

type pairOptions struct {
	v6    bool
	batch int // of both devices; 0 means 64
	cfg   func(*Config)
	// offload turns offloads on at the client's end of the pipe (0) and
	// the server's (1): see tuntest.NewOffloadPipe.
	offload [2]bool
}

func addrsOf(v6 bool) (client, server netip.Addr) {
	if v6 {
		return addr6A, addr6B
	}
	return addr4A, addr4B
}

// newStacks makes the pipe and the two stacks, and a listener on the
// server; the test's cleanup closes them.
func newStacks(t testing.TB, o pairOptions) *pair {
	t.Helper()
	batch := o.batch
	if batch == 0 {
		batch = 64
	}
	p := &pair{}
	p.devA, p.devB = tuntest.NewOffloadPipe(batch, 1<<15, o.offload[0], o.offload[1])
	ca, cb := addrsOf(o.v6)
	cfgA, cfgB := Config{Local: ca}, Config{Local: cb}
	if o.cfg != nil {
		o.cfg(&cfgA)
		o.cfg(&cfgB)
	}
	var err error
	if p.a, err = NewStack(p.devA, cfgA); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.a.Close() })
	if p.b, err = NewStack(p.devB, cfgB); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.b.Close() })
	if p.listener, err = p.b.Listen(testPort); err != nil {
		t.Fatal(err)
	}
	return p
}

// newPair is newStacks with a conn dialled and accepted, whose client
// has heard the server's scaled window (see openWindow).
func newPair(t testing.TB, o pairOptions) *pair {
	t.Helper()
	p := newStacks(t, o)
	p.client, p.server = p.connect(t)
	p.openWindow(t)
	return p
}

// openWindow has the server show its scaled window with a pure ACK, as
// its ACK of the client's first data would, and waits until the client
// has it: until then the client holds its data to the SYN-ACK's window,
// never scaled, and a test that sends more at once would see it dropped.
func (p *pair) openWindow(t testing.TB) {
	t.Helper()
	c := p.server
	c.mu.Lock()
	frozen := c.tcb.cfg.mode == SeqFrozen
	e := c.tcb.ackEmit(0, c.tcb.sndNxt)
	c.mu.Unlock()
	if frozen {
		return // nothing holds frozen data back
	}
	p.b.writeControl(c, e)
	for deadline := time.Now().Add(10 * time.Second); p.client.Stats().SendWindow <= int64(DefaultWindow); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the client never heard the server's window: %+v", p.client.Stats())
		}
	}
}

// connect dials from a to b and accepts there.
func (p *pair) connect(t testing.TB) (client, server *Conn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	client, err = p.a.Dial(ctx, netip.AddrPortFrom(p.b.LocalAddr(), testPort))
	if err != nil {
		t.Fatal(err)
	}
	server, err = p.listener.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return client, server
}

// datagram returns the datagram numbered index, size bytes (at least 8):
// its number, its size, then bytes that follow from both.
func datagram(index uint32, size int) []byte {
	b := make([]byte, Headroom+size)
	d := b[Headroom:]
	binary.BigEndian.PutUint32(d[0:4], index)
	binary.BigEndian.PutUint32(d[4:8], uint32(size))
	for i := 8; i < size; i++ {
		d[i] = byte(index) + byte(i*13)
	}
	return b
}

// checkDatagram returns the number of datagram d, or an error if d is not
// intact.
func checkDatagram(d []byte) (uint32, error) {
	if len(d) < 8 {
		return 0, fmt.Errorf("%d-byte datagram", len(d))
	}
	index, size := binary.BigEndian.Uint32(d[0:4]), int(binary.BigEndian.Uint32(d[4:8]))
	if size != len(d) {
		return index, fmt.Errorf("datagram %d: %d bytes, says %d", index, len(d), size)
	}
	for i := 8; i < size; i++ {
		if d[i] != byte(index)+byte(i*13) {
			return index, fmt.Errorf("datagram %d: byte %d differs", index, i)
		}
	}
	return index, nil
}

// collector is a handler that checks and records the datagrams a conn
// receives, and says when one numbered until has come.
type collector struct {
	until   uint32
	arrived chan struct{} // closed when datagram until arrives

	// Touched only by the handler, on the reader goroutine; read after
	// arrived is closed.
	indices []uint32
	errs    []error
}

func newCollector(until uint32) *collector {
	return &collector{until: until, arrived: make(chan struct{})}
}

func (c *collector) handle(batch []Payload) {
	for _, p := range batch {
		if p.Off < Headroom {
			c.errs = append(c.errs, fmt.Errorf("payload at %d, less than Headroom", p.Off))
		}
		index, err := checkDatagram(p.Buf[p.Off : p.Off+p.N])
		if err != nil {
			c.errs = append(c.errs, err)
			continue
		}
		c.indices = append(c.indices, index)
		if index == c.until {
			close(c.arrived)
		}
	}
}

func (c *collector) wait(t testing.TB, what string) {
	t.Helper()
	select {
	case <-c.arrived:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: datagram %d never arrived (%d did)", what, c.until, len(c.indices))
	}
}

// sendDatagrams sends datagrams first..last (inclusive) on c in batches,
// of sizes from rng, holding back while the peer's queue is long.
// crossBothWays sends datagrams 0 to count-1 each way at once with send,
// and checks that each end got them all, intact and in order.
func crossBothWays(t *testing.T, p *pair, count int, send func(*Conn, *tuntest.PipeEnd, uint32, uint32, *rand.Rand, int) error) {
	t.Helper()
	atServer, atClient := newCollector(uint32(count-1)), newCollector(uint32(count-1))
	p.server.SetHandler(atServer.handle)
	p.client.SetHandler(atClient.handle)
	mss := p.client.Stats().PeerMSS
	errs := make(chan error, 2)
	go func() { errs <- send(p.client, p.devB, 0, uint32(count-1), rand.New(rand.NewPCG(1, 1)), mss) }()
	go func() { errs <- send(p.server, p.devA, 0, uint32(count-1), rand.New(rand.NewPCG(2, 2)), mss) }()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	atServer.wait(t, "client to server")
	atClient.wait(t, "server to client")
	for who, col := range map[string]*collector{"server": atServer, "client": atClient} {
		if len(col.errs) > 0 {
			t.Fatalf("%s: %d bad datagrams, first: %v", who, len(col.errs), col.errs[0])
		}
		if len(col.indices) != count {
			t.Fatalf("%s got %d datagrams, want %d", who, len(col.indices), count)
		}
		for i, index := range col.indices {
			if index != uint32(i) {
				t.Fatalf("%s: datagram %d arrived as number %d", who, index, i)
			}
		}
	}
}

func sendDatagrams(c *Conn, peerDev *tuntest.PipeEnd, first, last uint32, rng *rand.Rand, maxSize int) error {
	batch := make([][]byte, 0, 32)
	for i := first; i <= last; i++ {
		batch = append(batch, datagram(i, 8+rng.IntN(maxSize-7)))
		if len(batch) == cap(batch) || i == last {
			for peerDev.Queued() > 4096 {
				time.Sleep(100 * time.Microsecond)
			}
			if err := c.Send(batch, Headroom); err != nil {
				return fmt.Errorf("sending datagrams up to %d: %w", i, err)
			}
			batch = batch[:0]
		}
	}
	return nil
}

// wireRecord is a data segment seen on the wire.
type wireRecord struct {
	seq, ack uint32
	flags    uint8
	len      int
}

// captureData records the data segments dev writes to dst. An
// offloading dev's packets leave their checksums to the kernel, and may
// be super-segments, each recorded as one.
func captureData(dev *tuntest.PipeEnd, dst netip.Addr) func() []wireRecord {
	var mu sync.Mutex
	var records []wireRecord
	partial := dev.Offload() == nil
	dev.SetCapture(func(pkt []byte) {
		var in inbound
		if parseTrusted(pkt, dst, dst.Is4(), &in, partial) != packetOK || in.seg.payloadLen == 0 {
			return
		}
		mu.Lock()
		records = append(records, wireRecord{in.seg.seq, in.seg.ack, in.seg.flags, in.seg.payloadLen})
		mu.Unlock()
	})
	return func() []wireRecord {
		mu.Lock()
		defer mu.Unlock()
		return append([]wireRecord(nil), records...)
	}
}

// checkWire checks the sequence numbers of the data segments one side
// wrote: in live mode each follows the previous by its length; in frozen
// mode all carry one seq and one ack, and no PSH.
func checkWire(t *testing.T, who string, mode SeqMode, records []wireRecord, wantCount int) {
	t.Helper()
	if len(records) != wantCount {
		t.Errorf("%s: %d data segments on the wire, want %d", who, len(records), wantCount)
	}
	for i := 1; i < len(records); i++ {
		prev, cur := records[i-1], records[i]
		switch mode {
		case SeqLive:
			if cur.seq != prev.seq+uint32(prev.len) {
				t.Fatalf("%s: segment %d has seq %d, previous %d + %d", who, i, cur.seq, prev.seq, prev.len)
			}
			if seqBefore(cur.ack, prev.ack) {
				t.Fatalf("%s: segment %d's ack %d went back from %d", who, i, cur.ack, prev.ack)
			}
			if cur.flags != flagACK|flagPSH {
				t.Fatalf("%s: segment %d has flags %s", who, i, flagString(cur.flags))
			}
		case SeqFrozen:
			if cur.seq != records[0].seq || cur.ack != records[0].ack || cur.flags != flagACK {
				t.Fatalf("%s: segment %d has seq %d ack %d flags %s, the first %d %d", who, i, cur.seq, cur.ack, flagString(cur.flags), records[0].seq, records[0].ack)
			}
		}
	}
}

// TestDatagramsBothWays sends 10000 datagrams of mixed sizes each way at
// once, over IPv4 and IPv6, live and frozen: all arrive intact and in
// order, and the sequence numbers on the wire are as the mode says.
func TestDatagramsBothWays(t *testing.T) {
	const count = 10000
	for _, v6 := range []bool{false, true} {
		for _, mode := range []SeqMode{SeqLive, SeqFrozen} {
			t.Run(fmt.Sprintf("v6=%v/%v", v6, mode), func(t *testing.T) {
				p := newPair(t, pairOptions{v6: v6, cfg: func(c *Config) { c.Seq = mode }})
				wireA := captureData(p.devA, p.b.LocalAddr())
				wireB := captureData(p.devB, p.a.LocalAddr())
				crossBothWays(t, p, count, sendDatagrams)
				checkWire(t, "client", mode, wireA(), count)
				checkWire(t, "server", mode, wireB(), count)
				if o := p.devA.Overflowed() + p.devB.Overflowed(); o != 0 {
					t.Errorf("the pipe overflowed %d times", o)
				}
				cs, ss := p.client.Stats(), p.server.Stats()
				if cs.SegmentsSent != count || ss.SegmentsReceived != count || ss.SegmentsSent != count || cs.SegmentsReceived != count {
					t.Errorf("stats: client %+v, server %+v", cs, ss)
				}
				if cs.BytesSent != ss.BytesReceived || ss.BytesSent != cs.BytesReceived {
					t.Errorf("bytes: client sent %d, server got %d; server sent %d, client got %d", cs.BytesSent, ss.BytesReceived, ss.BytesSent, cs.BytesReceived)
				}
				if mode == SeqLive && (cs.Ack != ss.Seq || ss.Ack != cs.Seq) {
					t.Errorf("after the exchange: client seq %d ack %d, server seq %d ack %d", cs.Seq, cs.Ack, ss.Seq, ss.Ack)
				}
			})
		}
	}
}

// TestLoss sends 10000 datagrams each way with 5% of the packets lost
// both ways: the others arrive intact, in order, once, and the conn goes
// on (no retransmission, nothing waits for the lost ones).
func TestLoss(t *testing.T) {
	const count = 10000
	p := newPair(t, pairOptions{})
	wireA := captureData(p.devA, p.b.LocalAddr())
	atServer, atClient := newCollector(count), newCollector(count)
	p.server.SetHandler(atServer.handle)
	p.client.SetHandler(atClient.handle)
	p.devA.SetFaults(0.05, 0, 0)
	p.devB.SetFaults(0.05, 0, 0)

	errs := make(chan error, 2)
	go func() { errs <- sendDatagrams(p.client, p.devB, 0, count-1, rand.New(rand.NewPCG(3, 3)), 1400) }()
	go func() { errs <- sendDatagrams(p.server, p.devA, 0, count-1, rand.New(rand.NewPCG(4, 4)), 1400) }()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	// One more each way without loss: it arrives after all the others
	// (the pipe keeps order), so the conn did not stall.
	p.devA.SetFaults(0, 0, 0)
	p.devB.SetFaults(0, 0, 0)
	if err := p.client.Send([][]byte{datagram(count, 100)}, Headroom); err != nil {
		t.Fatal(err)
	}
	if err := p.server.Send([][]byte{datagram(count, 100)}, Headroom); err != nil {
		t.Fatal(err)
	}
	atServer.wait(t, "client to server")
	atClient.wait(t, "server to client")
	for who, col := range map[string]*collector{"server": atServer, "client": atClient} {
		if len(col.errs) > 0 {
			t.Fatalf("%s: %d bad datagrams, first: %v", who, len(col.errs), col.errs[0])
		}
		got := len(col.indices) - 1
		if got < count*90/100 || got > count*99/100 {
			t.Errorf("%s got %d of %d datagrams through 5%% loss", who, got, count)
		}
		for i := 1; i < len(col.indices); i++ {
			if col.indices[i] <= col.indices[i-1] {
				t.Fatalf("%s: datagram %d after %d", who, col.indices[i], col.indices[i-1])
			}
		}
	}
	checkWire(t, "client", SeqLive, wireA(), count+1)
	if err := p.client.Err(); err != nil {
		t.Errorf("client conn ended: %v", err)
	}
}

// TestFaultyPipe runs datagrams through duplication and reordering: each
// arrives intact; the conn survives.
func TestFaultyPipe(t *testing.T) {
	const count = 2000
	p := newPair(t, pairOptions{})
	atServer := newCollector(count)
	p.server.SetHandler(atServer.handle)
	p.devA.SetFaults(0.02, 0.05, 0.05)
	if err := sendDatagrams(p.client, p.devB, 0, count-1, rand.New(rand.NewPCG(5, 5)), 1400); err != nil {
		t.Fatal(err)
	}
	p.devA.SetFaults(0, 0, 0)
	if err := p.client.Send([][]byte{datagram(count, 100)}, Headroom); err != nil {
		t.Fatal(err)
	}
	atServer.wait(t, "client to server")
	if len(atServer.errs) > 0 {
		t.Fatal(atServer.errs[0])
	}
	if len(atServer.indices) < count*90/100 {
		t.Errorf("%d of %d arrived", len(atServer.indices), count)
	}
	if err := p.server.Err(); err != nil {
		t.Errorf("server conn ended: %v", err)
	}
}

// waitDone waits for c to end and returns why.
func waitDone(t testing.TB, c *Conn, what string) error {
	t.Helper()
	select {
	case <-c.Done():
		return c.Err()
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: the conn did not end", what)
		return nil
	}
}

func TestConnAddrsAndHandshakeOptions(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		p := newPair(t, pairOptions{v6: v6})
		ca, sa := addrsOf(v6)
		if p.client.RemoteAddr() != netip.AddrPortFrom(sa, testPort) || p.server.LocalAddr() != netip.AddrPortFrom(sa, testPort) {
			t.Errorf("server side: %v, %v", p.client.RemoteAddr(), p.server.LocalAddr())
		}
		if p.client.LocalAddr() != p.server.RemoteAddr() || p.client.LocalAddr().Addr() != ca {
			t.Errorf("client side: %v, %v", p.client.LocalAddr(), p.server.RemoteAddr())
		}
		if port := p.client.LocalAddr().Port(); port < ephemeralFirst || port > ephemeralLast {
			t.Errorf("local port %d outside the ephemeral range", port)
		}
		want := DefaultIPv4MSS
		if v6 {
			want = DefaultIPv6MSS
		}
		if got := p.client.Stats().PeerMSS; got != want {
			t.Errorf("peer MSS %d, want %d", got, want)
		}
		if s := p.server.Stats(); s.State != "ESTABLISHED" {
			t.Errorf("server conn %s", s.State)
		}
	}
}

func TestCloseSendsFIN(t *testing.T) {
	p := newPair(t, pairOptions{})
	if err := p.client.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.client.Close(); err != nil {
		t.Fatal(err)
	}
	if err := waitDone(t, p.server, "server"); !errors.Is(err, ErrPeerClosed) {
		t.Errorf("server conn ended with %v, want ErrPeerClosed", err)
	}
	if err := p.client.Err(); !errors.Is(err, ErrClosed) {
		t.Errorf("client conn ended with %v, want ErrClosed", err)
	}
	if err := p.client.Send([][]byte{datagram(1, 100)}, Headroom); !errors.Is(err, ErrClosed) {
		t.Errorf("Send after Close: %v", err)
	}
	if err := p.server.Send([][]byte{datagram(1, 100)}, Headroom); !errors.Is(err, ErrPeerClosed) {
		t.Errorf("Send after the peer's FIN: %v", err)
	}
	// Both sides forget the 4-tuple: the server on the ACK of its FIN,
	// the client after its linger.
	deadline := time.Now().Add(10 * time.Second)
	for p.a.Stats().Conns+p.b.Stats().Conns > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("conns left: client stack %d, server stack %d", p.a.Stats().Conns, p.b.Stats().Conns)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestStackCloseEndsConns(t *testing.T) {
	p := newPair(t, pairOptions{})
	if err := p.b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.server.Err(); !errors.Is(err, ErrClosed) {
		t.Errorf("server conn ended with %v, want ErrClosed", err)
	}
	if err := waitDone(t, p.client, "client"); !errors.Is(err, ErrPeerClosed) {
		t.Errorf("client conn ended with %v, want ErrPeerClosed", err)
	}
	if _, err := p.listener.Accept(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Accept after Stack.Close: %v", err)
	}
	if _, err := p.b.Dial(context.Background(), netip.AddrPortFrom(addr4A, 1)); !errors.Is(err, ErrClosed) {
		t.Errorf("Dial after Stack.Close: %v", err)
	}
	if _, err := p.b.Listen(1); !errors.Is(err, ErrClosed) {
		t.Errorf("Listen after Stack.Close: %v", err)
	}
	select {
	case <-p.b.Done():
	default:
		t.Error("the reader goroutine still runs after Close")
	}
}

// TestServerRestart replaces the server's stack, silently, by a new one
// on the same device: the client's next segment is answered with an RST,
// which ends its conn promptly, and dialling again works.
func TestServerRestart(t *testing.T) {
	p := newPair(t, pairOptions{})
	p.devB.SetFaults(1, 0, 0) // the old stack's FINs never leave
	if err := p.b.Close(); err != nil {
		t.Fatal(err)
	}
	p.devB.SetFaults(0, 0, 0)
	var err error
	if p.b, err = NewStack(p.devB, Config{Local: addr4B}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.b.Close() })
	if p.listener, err = p.b.Listen(testPort); err != nil {
		t.Fatal(err)
	}
	if p.client.Err() != nil {
		t.Fatalf("client conn ended before it sent anything: %v", p.client.Err())
	}
	if err := p.client.Send([][]byte{datagram(1, 100)}, Headroom); err != nil {
		t.Fatal(err)
	}
	if err := waitDone(t, p.client, "client"); !errors.Is(err, ErrReset) {
		t.Fatalf("client conn ended with %v, want ErrReset", err)
	}
	if got := p.b.Stats().Refused; got != 1 {
		t.Errorf("new server stack refused %d segments, want 1", got)
	}
	client, server := p.connect(t)
	got := newCollector(7)
	server.SetHandler(got.handle)
	if err := client.Send([][]byte{datagram(7, 300)}, Headroom); err != nil {
		t.Fatal(err)
	}
	got.wait(t, "after the new handshake")
}

func TestDialRefused(t *testing.T) {
	p := newStacks(t, pairOptions{})
	_, err := p.a.Dial(context.Background(), netip.AddrPortFrom(addr4B, testPort+1))
	if !errors.Is(err, ErrReset) {
		t.Errorf("dial to a port without listener: %v, want ErrReset", err)
	}
	if _, err := p.a.Dial(context.Background(), netip.AddrPortFrom(addr6B, testPort)); err == nil {
		t.Error("dial to an IPv6 address from an IPv4 stack worked")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.a.Dial(ctx, netip.AddrPortFrom(addr4B, testPort)); !errors.Is(err, context.Canceled) {
		t.Errorf("dial with a cancelled context: %v", err)
	}
}

// TestDataBeforeHandlerIsKept: a peer may send as soon as the handshake
// ends, before Accept has returned; the conn keeps that data (up to
// maxEarly datagrams) and SetHandler delivers it first, in order.
func TestDataBeforeHandlerIsKept(t *testing.T) {
	p := newPair(t, pairOptions{})
	var early [][]byte
	for i := range uint32(maxEarly + 3) {
		early = append(early, datagram(i, 100))
	}
	if err := p.client.Send(early, Headroom); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for p.server.Stats().DroppedNoHandler < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("server stats %+v", p.server.Stats())
		}
		time.Sleep(time.Millisecond)
	}
	got := newCollector(maxEarly + 3) // the datagram sent after SetHandler
	p.server.SetHandler(got.handle)
	if err := p.client.Send([][]byte{datagram(maxEarly+3, 100)}, Headroom); err != nil {
		t.Fatal(err)
	}
	got.wait(t, "after SetHandler")
	if len(got.indices) != maxEarly+1 {
		t.Fatalf("handler got %d datagrams, want the %d kept and the one after", len(got.indices), maxEarly+1)
	}
	for i, idx := range got.indices[:maxEarly] {
		if idx != uint32(i) {
			t.Fatalf("kept datagram %d is #%d: order lost", i, idx)
		}
	}
	if last := got.indices[maxEarly]; last != maxEarly+3 {
		t.Fatalf("datagram after SetHandler is #%d", last)
	}
	if st := p.server.Stats(); st.DroppedNoHandler != 3 || st.SegmentsReceived != maxEarly+1 {
		t.Fatalf("server stats %+v", st)
	}
}

func TestSendRefuses(t *testing.T) {
	p := newPair(t, pairOptions{})
	got := newCollector(2)
	p.server.SetHandler(got.handle)
	big := datagram(1, DefaultIPv4MSS+1)
	empty := make([]byte, Headroom)
	err := p.client.Send([][]byte{datagram(0, 100), big, empty, datagram(2, DefaultIPv4MSS)}, Headroom)
	if !errors.Is(err, ErrTooLarge) {
		t.Errorf("Send with an oversize and an empty datagram: %v", err)
	}
	got.wait(t, "the datagrams that fit")
	if len(got.indices) != 2 || got.indices[0] != 0 {
		t.Errorf("arrived: %v", got.indices)
	}
	s := p.client.Stats()
	if s.RefusedOversize != 1 || s.RefusedEmpty != 1 || s.SegmentsSent != 2 {
		t.Errorf("stats %+v", s)
	}
	if err := p.client.Send([][]byte{datagram(3, 10)}, Headroom-1); err == nil {
		t.Error("Send with too little headroom worked")
	}
}

func TestBadPacketsAreCounted(t *testing.T) {
	p := newPair(t, pairOptions{})
	got := newCollector(1)
	p.server.SetHandler(got.handle)
	// A data segment for the conn, corrupted after its checksum; then
	// one to another address; then a sound one.
	hd := newHeaders(p.client.LocalAddr(), p.client.RemoteAddr(), 0)
	build := func(dst netip.Addr) []byte {
		hd := hd
		hd.remote = netip.AddrPortFrom(dst, hd.remote.Port())
		hd.addrSum = pseudoHeaderSum(hd.local.Addr(), dst)
		b := datagram(0, 100)
		return b[hd.put(b, Headroom, tcpFields{seq: 1, ack: 1, flags: flagACK}, nil, 0):]
	}
	bad := build(addr4B)
	bad[len(bad)-1] ^= 0xff
	if _, err := p.devA.Write([][]byte{bad, build(netip.MustParseAddr("203.0.113.9"))}, 0); err != nil {
		t.Fatal(err)
	}
	if err := p.client.Send([][]byte{datagram(1, 100)}, Headroom); err != nil {
		t.Fatal(err)
	}
	got.wait(t, "the sound datagram")
	s := p.b.Stats()
	if s.BadChecksum != 1 || s.NotLocal != 1 {
		t.Errorf("server stack stats %+v", s)
	}
	if len(got.indices) != 1 {
		t.Errorf("handler got %v", got.indices)
	}
}

func TestListenerClose(t *testing.T) {
	p := newStacks(t, pairOptions{})
	if _, err := p.b.Listen(testPort); err == nil {
		t.Error("a second Listen on one port worked")
	}
	if err := p.listener.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.listener.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.a.Dial(context.Background(), netip.AddrPortFrom(addr4B, testPort)); !errors.Is(err, ErrReset) {
		t.Errorf("dial after Listener.Close: %v, want ErrReset", err)
	}
}

// TestTimers runs the stacks' timers in a bubble of fake time: a lost
// SYN is sent again after a second, a lost SYN-ACK too, an idle conn
// stays up on keepalives, a conn whose peer went silent ends after four
// keepalive intervals, and a handshake that gets no answer times out.
func TestTimers(t *testing.T) {
	t.Run("lost SYN", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newStacks(t, pairOptions{})
			p.devA.SetFaults(1, 0, 0)
			done := make(chan error, 1)
			start := time.Now()
			go func() {
				c, err := p.a.Dial(context.Background(), netip.AddrPortFrom(addr4B, testPort))
				if err == nil {
					c.Close()
				}
				done <- err
			}()
			time.Sleep(500 * time.Millisecond)
			p.devA.SetFaults(0, 0, 0)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took < time.Second || took > 1200*time.Millisecond {
				t.Errorf("dial took %v, want one SYN retry", took)
			}
		})
	})
	t.Run("lost SYN-ACK", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newStacks(t, pairOptions{})
			p.devB.SetFaults(1, 0, 0)
			done := make(chan error, 1)
			go func() {
				_, err := p.a.Dial(context.Background(), netip.AddrPortFrom(addr4B, testPort))
				done <- err
			}()
			time.Sleep(500 * time.Millisecond)
			p.devB.SetFaults(0, 0, 0)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			c, err := p.listener.Accept(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if s := c.Stats(); s.State != "ESTABLISHED" {
				t.Errorf("server conn %s", s.State)
			}
		})
	})
	t.Run("handshake timeout", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newStacks(t, pairOptions{cfg: func(c *Config) { c.HandshakeTimeout = 3 * time.Second }})
			p.devA.SetFaults(1, 0, 0)
			start := time.Now()
			_, err := p.a.Dial(context.Background(), netip.AddrPortFrom(addr4B, testPort))
			if !errors.Is(err, ErrTimeout) {
				t.Errorf("dial: %v, want ErrTimeout", err)
			}
			if took := time.Since(start); took < 3*time.Second || took > 3200*time.Millisecond {
				t.Errorf("dial gave up after %v", took)
			}
			if written := p.devA.Written(); written != 3 {
				t.Errorf("%d SYNs, want 3 (at 0, 1s, 2s)", written)
			}
		})
	})
	t.Run("keepalive", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, pairOptions{cfg: func(c *Config) { c.KeepAlive = time.Second }})
			time.Sleep(20 * time.Second)
			if p.client.Err() != nil || p.server.Err() != nil {
				t.Fatalf("idle conns ended: %v, %v", p.client.Err(), p.server.Err())
			}
			cs, ss := p.client.Stats(), p.server.Stats()
			// One probe from the dialling side and one answer per
			// interval; the listener's side does not probe.
			if cs.ControlSent < 18 || cs.ControlSent > 22 || ss.ControlSent < 18 || ss.ControlSent > 22 {
				t.Errorf("%d and %d keepalive segments in 20 keepalive intervals", cs.ControlSent, ss.ControlSent)
			}
			if cs.Seq != ss.Ack || ss.Seq != cs.Ack {
				t.Errorf("keepalives moved the sequence numbers: client %d/%d, server %d/%d", cs.Seq, cs.Ack, ss.Seq, ss.Ack)
			}
			p.devA.SetFaults(1, 0, 0)
			p.devB.SetFaults(1, 0, 0)
			start := time.Now()
			<-p.client.Done()
			<-p.server.Done()
			if took := time.Since(start); took < 3*time.Second || took > 4200*time.Millisecond {
				t.Errorf("silent peer noticed after %v, want 4 keepalive intervals", took)
			}
			if !errors.Is(p.client.Err(), ErrTimeout) || !errors.Is(p.server.Err(), ErrTimeout) {
				t.Errorf("ended with %v and %v, want ErrTimeout", p.client.Err(), p.server.Err())
			}
		})
	})
	t.Run("delayed ACK", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			p := newPair(t, pairOptions{})
			p.server.SetHandler(func([]Payload) {})
			// The first data is acknowledged at once (it shows the
			// server's scaled window); the delay applies from then on.
			if err := p.client.Send([][]byte{datagram(0, 1000)}, Headroom); err != nil {
				t.Fatal(err)
			}
			time.Sleep(10 * time.Millisecond)
			synctest.Wait()
			if err := p.client.Send([][]byte{datagram(1, 1000)}, Headroom); err != nil {
				t.Fatal(err)
			}
			synctest.Wait()
			before := p.server.Stats().ControlSent
			time.Sleep(350 * time.Millisecond)
			s := p.server.Stats()
			if s.ControlSent != before+1 || s.Ack != p.client.Stats().Seq {
				t.Errorf("server sent %d control segments, ack %d, client seq %d", s.ControlSent-before, s.Ack, p.client.Stats().Seq)
			}
		})
	})
}

// TestManyConns opens conns from several ports at once and checks each
// carries its own datagrams.
func TestManyConns(t *testing.T) {
	p := newStacks(t, pairOptions{})
	const n = 20
	var wg sync.WaitGroup
	var failures atomic.Int32
	clients := make([]*Conn, n)
	for i := range n {
		wg.Go(func() {
			c, err := p.a.Dial(context.Background(), netip.AddrPortFrom(addr4B, testPort))
			if err != nil {
				t.Error(err)
				failures.Add(1)
				return
			}
			clients[i] = c
		})
	}
	servers := map[netip.AddrPort]*Conn{}
	for range n {
		c, err := p.listener.Accept(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		servers[c.RemoteAddr()] = c
	}
	wg.Wait()
	if failures.Load() > 0 {
		t.FailNow()
	}
	for i, c := range clients {
		s := servers[c.LocalAddr()]
		if s == nil {
			t.Fatalf("no server conn for %v", c.LocalAddr())
		}
		got := newCollector(uint32(i))
		s.SetHandler(got.handle)
		if err := c.Send([][]byte{datagram(uint32(i), 50+i)}, Headroom); err != nil {
			t.Fatal(err)
		}
		got.wait(t, c.String())
		if len(got.indices) != 1 {
			t.Errorf("%v got %v", c, got.indices)
		}
	}
}

// noDeadline hides the pipe's SetReadDeadline: a device whose blocked
// Read only its closing ends.
type noDeadline struct{ dev *tuntest.PipeEnd }

func (d noDeadline) BatchSize() int { return d.dev.BatchSize() }
func (d noDeadline) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return d.dev.Read(bufs, sizes, offset)
}
func (d noDeadline) Write(bufs [][]byte, offset int) (int, error) { return d.dev.Write(bufs, offset) }
func (d noDeadline) Close() error                                 { return d.dev.Close() }

// TestDeviceClosed closes a stack's device under it: its reader ends,
// its conns end with ErrClosed, and it takes no new ones. A stack on a
// device without read deadlines ends its reader once the owner closes
// the device after Stack.Close.
func TestDeviceClosed(t *testing.T) {
	p := newPair(t, pairOptions{})
	p.devB.Close()
	if err := waitDone(t, p.server, "server"); !errors.Is(err, ErrClosed) {
		t.Errorf("server conn ended with %v, want ErrClosed", err)
	}
	<-p.b.Done()
	if _, err := p.b.Listen(1); !errors.Is(err, ErrClosed) {
		t.Errorf("Listen on a stack whose device closed: %v", err)
	}

	devA, _ := tuntest.NewPipe(8, 16)
	s, err := NewStack(noDeadline{devA}, Config{Local: addr4A})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Done():
		t.Fatal("the reader ended before the device closed")
	default:
	}
	devA.Close()
	<-s.Done()
}

// TestDialFromPortBlock: DialFrom takes its local port from the block it
// is given, skips the ports that a listener or a conn to the same remote
// holds, says so when the block is full, and refuses an empty block.
func TestDialFromPortBlock(t *testing.T) {
	p := newStacks(t, pairOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	remote := netip.AddrPortFrom(addr4B, testPort)
	block := PortRange{40000, 40003}
	if _, err := p.a.Listen(40001); err != nil {
		t.Fatal(err)
	}
	seen := map[uint16]bool{}
	for range 3 {
		c, err := p.a.DialFrom(ctx, remote, block)
		if err != nil {
			t.Fatal(err)
		}
		port := c.LocalAddr().Port()
		if !block.Contains(port) || port == 40001 || seen[port] {
			t.Fatalf("local port %d: want a free one of %v other than the listener's 40001 (had %v)", port, block, seen)
		}
		seen[port] = true
		if _, err := p.listener.Accept(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.a.DialFrom(ctx, remote, block); err == nil || !strings.Contains(err.Error(), "no free local port in 40000-40003") {
		t.Fatalf("dial from a full block: %v, want it refused", err)
	}
	// Another remote may reuse the block's ports.
	if err := func() error {
		l, err := p.b.Listen(testPort + 1)
		if err != nil {
			return err
		}
		c, err := p.a.DialFrom(ctx, netip.AddrPortFrom(addr4B, testPort+1), PortRange{40000, 40000})
		if err != nil {
			return err
		}
		if c.LocalAddr().Port() != 40000 {
			t.Errorf("local port %d, want 40000", c.LocalAddr().Port())
		}
		_, err = l.Accept(ctx)
		return err
	}(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []PortRange{{0, 10}, {20, 10}} {
		if _, err := p.a.DialFrom(ctx, remote, bad); err == nil || !strings.Contains(err.Error(), "local ports") {
			t.Errorf("DialFrom with %v: %v, want it refused", bad, err)
		}
	}
	if n := EphemeralPorts.Len(); n != ephemeralLast-ephemeralFirst+1 || (PortRange{}).Len() != 0 {
		t.Errorf("EphemeralPorts.Len() %d", n)
	}
}
