package relay

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/faketcp"
)

// pipeEnd is one end of an in-memory wire between two fake-TCP stacks:
// what one end writes, the other reads. It stands in for the TUN devices
// and the NAT between them.
type pipeEnd struct {
	in     chan []byte
	peer   *pipeEnd
	closed chan struct{}
	once   *sync.Once
	// drop, if set, decides to lose a packet this end writes.
	drop func(pkt []byte) bool
}

func newPipe() (*pipeEnd, *pipeEnd) {
	closed, once := make(chan struct{}), new(sync.Once)
	a := &pipeEnd{in: make(chan []byte, 1024), closed: closed, once: once}
	b := &pipeEnd{in: make(chan []byte, 1024), closed: closed, once: once}
	a.peer, b.peer = b, a
	return a, b
}

func (p *pipeEnd) BatchSize() int { return 16 }

func (p *pipeEnd) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	select {
	case pkt := <-p.in:
		sizes[0] = copy(bufs[0][offset:], pkt)
	case <-p.closed:
		return 0, net.ErrClosed
	}
	n := 1
	for ; n < len(bufs); n++ {
		select {
		case pkt := <-p.in:
			sizes[n] = copy(bufs[n][offset:], pkt)
		default:
			return n, nil
		}
	}
	return n, nil
}

func (p *pipeEnd) Write(bufs [][]byte, offset int) (int, error) {
	for i, b := range bufs {
		if p.drop != nil && p.drop(b[offset:]) {
			continue
		}
		select {
		case p.peer.in <- bytes.Clone(b[offset:]):
		case <-p.closed:
			return i, net.ErrClosed
		}
	}
	return len(bufs), nil
}

func (p *pipeEnd) close() { p.once.Do(func() { close(p.closed) }) }

// Close makes pipeEnd a tun.Device.
func (p *pipeEnd) Close() error { p.close(); return nil }

// fakeRig is a client and a server joined by fake-TCP stacks over a pipe,
// with the rig's fake daemons on their UDP sides.
type fakeRig struct {
	*rig
	clientEnd, serverEnd *pipeEnd
	clientStack          *faketcp.Stack
}

var (
	fakeClientAddr = netip.MustParseAddr("100.64.200.2")
	fakeServerAddr = netip.MustParseAddr("100.64.201.2")
)

func newFakeRig(t *testing.T, seq faketcp.SeqMode) *fakeRig {
	t.Helper()
	cEnd, sEnd := newPipe()
	t.Cleanup(cEnd.close)
	sStack, err := faketcp.NewStack(sEnd, faketcp.Config{Local: fakeServerAddr, Seq: seq, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	cStack, err := faketcp.NewStack(cEnd, faketcp.Config{Local: fakeClientAddr, Seq: seq, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := sStack.Listen(4500)
	if err != nil {
		t.Fatal(err)
	}
	// The rig's backend daemon, with a server and a client of their own
	// over the stacks.
	r := newRig(t, rigOptions{noCl: true})
	srv, err := NewServer(ServerConfig{Backend: r.backend.LocalAddr().(*net.UDPAddr).AddrPort(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	r.srv = srv
	srvDone := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { srvDone <- srv.ServeFakeTCP(ctx, ln, fakeServerAddr.String()+":4500") }()
	cl, err := NewClient(ClientConfig{
		Peer: netip.AddrPortFrom(fakeServerAddr, 4500).String(), FakeTCP: cStack,
		Logger: testLogger(t), ReconnectMin: 20 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	pc, err := ListenUDP("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	clDone := make(chan error, 1)
	go func() { clDone <- cl.Serve(ctx, pc) }()
	site, err := net.DialUDP("udp", nil, pc.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	r.cl, r.site = cl, site
	t.Cleanup(func() {
		cancel()
		for _, done := range []chan error{clDone, srvDone} {
			if err := <-done; err != nil {
				t.Errorf("serve: %v", err)
			}
		}
		site.Close()
		cStack.Close()
		sStack.Close()
	})
	return &fakeRig{rig: r, clientEnd: cEnd, serverEnd: sEnd, clientStack: cStack}
}

func TestFakeTCPEndToEnd(t *testing.T) {
	r := newFakeRig(t, faketcp.SeqLive)
	from := r.establish(0xfa1e, 0xc3, 0xd3)
	// Keepalives stay home, as on TCP.
	r.site.Write([]byte{0xff})
	expectNothing(t, r.backend, "keepalive over fake-TCP")
	for i := range 100 {
		r.site.Write(espDatagram(0xc3, uint32(i+2), 200+i))
	}
	for i := range 100 {
		if got, _ := recv(t, r.backend); len(got) != 200+i {
			t.Fatalf("datagram %d: %d bytes, want %d", i, len(got), 200+i)
		}
	}
	st := r.srv.Status()
	if st.Mode != "fake-tcp" || len(st.Sessions) != 1 || st.Sessions[0].Local != from.String() {
		t.Fatalf("server status: mode %q, sessions %+v", st.Mode, st.Sessions)
	}
	if !bytes.HasPrefix([]byte(st.Sessions[0].Peer), []byte(fakeClientAddr.String()+":")) {
		t.Fatalf("server sees the client at %s", st.Sessions[0].Peer)
	}
}

// TestFakeTCPReconnect: the server's stack forgets the client's conn (as
// after a restart of the server's side of the path), the client's next
// segment draws a reset, it dials again, and the session carries on from
// the same backend socket.
func TestFakeTCPReconnect(t *testing.T) {
	r := newFakeRig(t, faketcp.SeqLive)
	from := r.establish(0xfa2e, 0xc4, 0xd4)
	st := r.srv.Status()
	if len(st.Sessions) != 1 {
		t.Fatalf("sessions: %+v", st.Sessions)
	}
	// Close the server's side of the conn: its stack sends FIN and forgets.
	r.srv.mu.Lock()
	for c := range r.srv.conns {
		c.close()
	}
	r.srv.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	buf := make([]byte, 2048)
	for seq := uint32(10); ; seq++ {
		if time.Now().After(deadline) {
			t.Fatal("traffic did not resume over a new fake-TCP conn")
		}
		r.site.Write(espDatagram(0xc4, seq, 300))
		r.backend.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, from2, err := r.backend.ReadFromUDPAddrPort(buf); err == nil {
			if from2 != from {
				t.Fatalf("the session moved to %v from %v", from2, from)
			}
			break
		}
	}
	if got := r.srv.Status().Sessions[0].Connections; got != 2 {
		t.Fatalf("session carried by %d connections, want 2", got)
	}
}

// TestFakeTCPFrozen checks the frozen mode works end to end where nothing
// checks sequence numbers (the pipe does not).
func TestFakeTCPFrozen(t *testing.T) {
	r := newFakeRig(t, faketcp.SeqFrozen)
	r.establish(0xf0f0, 0xc5, 0xd5)
	for i := range 20 {
		r.site.Write(espDatagram(0xc5, uint32(i+2), 600))
		recv(t, r.backend)
	}
}

// TestFakeTCPHotPathDoesNotAllocate is the fake-TCP twin of
// TestHotPathDoesNotAllocate.
func TestFakeTCPHotPathDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates on its own; make test runs this check without -race")
	}
	r := newFakeRig(t, faketcp.SeqLive)
	// The in-memory pipe clones every packet it carries: 2 per round trip.
	checkHotPath(t, r.rig, r.establish(0x4244, 0xc9, 0xd9), 2)
}

// TestFakeTCPGarbageClosesOnlyItsConn: sustained garbage on one fake-TCP
// conn closes that conn, counted, while the relay's own flow carries on.
func TestFakeTCPGarbageClosesOnlyItsConn(t *testing.T) {
	r := newFakeRig(t, faketcp.SeqLive)
	from := r.establish(0xfa3e, 0xc6, 0xd6)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	bad, err := r.clientStack.Dial(ctx, netip.AddrPortFrom(fakeServerAddr, 4500))
	if err != nil {
		t.Fatal(err)
	}
	bad.SetHandler(func([]faketcp.Payload) {})
	var burst [][]byte
	for i := range garbageLimit {
		burst = append(burst, append(make([]byte, faketcp.Headroom), espDatagram(0x0bad0000+uint32(i), 1, 60)...))
	}
	if err := bad.Send(burst, faketcp.Headroom); err != nil {
		t.Fatal(err)
	}
	select {
	case <-bad.Done():
	case <-ctx.Done():
		t.Fatal("the server did not close the conn that sent garbage")
	}
	eventually(t, "garbage_closes", func() bool { return counter(r.srv.Counters(), "garbage_closes") == 1 })
	r.site.Write(espDatagram(0xc6, 2, 300))
	if got, from2 := recv(t, r.backend); len(got) != 300 || from2 != from {
		t.Fatal("the relay's own flow was harmed")
	}
}
