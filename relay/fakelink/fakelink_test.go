package fakelink_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/nat/tun/tuntest"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/aggregate"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/fakelink"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeRig is a client and a server joined by fake-TCP stacks over a pipe,
// with the rig's fake daemons on their UDP sides.
type fakeRig struct {
	*relaytest.Rig
	clientStack *faketcp.Stack
	links       *recordingListener
}

var (
	fakeClientAddr = netip.MustParseAddr("100.64.200.2")
	fakeServerAddr = netip.MustParseAddr("100.64.201.2")
)

// newFakeRig starts the rig; each of configure, if any, adjusts the
// client's configuration, given the client's stack, before it starts.
func newFakeRig(t *testing.T, seq faketcp.SeqMode, configure ...func(*client.Config, *faketcp.Stack)) *fakeRig {
	t.Helper()
	// The wire between the stacks: it stands in for their TUN devices and
	// the NAT between them.
	cEnd, sEnd := tuntest.NewPipe(16, 1024)
	t.Cleanup(func() { cEnd.Close(); sEnd.Close() })
	sStack, err := faketcp.NewStack(sEnd, faketcp.Config{Local: fakeServerAddr, Seq: seq, Logger: relaytest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	cStack, err := faketcp.NewStack(cEnd, faketcp.Config{Local: fakeClientAddr, Seq: seq, Logger: relaytest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := sStack.Listen(4500)
	if err != nil {
		t.Fatal(err)
	}
	// The rig's backend daemon, with a server and a client of their own
	// over the stacks.
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	srv, err := server.New(server.Config{Backend: r.Backend.LocalAddr().(*net.UDPAddr).AddrPort(), Logger: relaytest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	r.Srv = srv
	srvDone := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	links := &recordingListener{Listener: fakelink.NewListener(ln, fakeServerAddr.String()+":4500")}
	go func() { srvDone <- srv.Serve(ctx, links) }()
	cfg := client.Config{
		Peer: netip.AddrPortFrom(fakeServerAddr, 4500).String(), Dialer: &fakelink.Dialer{Stack: cStack},
		Logger: relaytest.Logger(t), ReconnectMin: 20 * time.Millisecond,
	}
	for _, c := range configure {
		c(&cfg, cStack)
	}
	cl, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := client.ListenUDP("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	clDone := make(chan error, 1)
	go func() { clDone <- cl.Serve(ctx, pc) }()
	site, err := net.DialUDP("udp", nil, pc.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	r.Cl, r.Site = cl, site
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
	return &fakeRig{Rig: r, clientStack: cStack, links: links}
}

// recordingListener remembers the links the server accepts, so that a
// test can close the server's side of one.
type recordingListener struct {
	relay.Listener
	mu       sync.Mutex
	accepted []relay.Link
}

func (l *recordingListener) Accept(ctx context.Context) (relay.Link, error) {
	link, err := l.Listener.Accept(ctx)
	if err == nil {
		l.mu.Lock()
		l.accepted = append(l.accepted, link)
		l.mu.Unlock()
	}
	return link, err
}

// closeAll closes the server's side of every link accepted so far.
func (l *recordingListener) closeAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, link := range l.accepted {
		link.Close()
	}
}

func TestFakeTCPEndToEnd(t *testing.T) {
	r := newFakeRig(t, faketcp.SeqLive)
	from := r.Establish(0xfa1e, 0xc3, 0xd3)
	// Keepalives stay home, as on TCP.
	r.Site.Write([]byte{0xff})
	relaytest.ExpectNothing(t, r.Backend, "keepalive over fake-TCP")
	for i := range 100 {
		r.Site.Write(relaytest.ESP(0xc3, uint32(i+2), 200+i))
	}
	for i := range 100 {
		if got, _ := relaytest.Recv(t, r.Backend); len(got) != 200+i {
			t.Fatalf("datagram %d: %d bytes, want %d", i, len(got), 200+i)
		}
	}
	st := r.Srv.Status()
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
	from := r.Establish(0xfa2e, 0xc4, 0xd4)
	st := r.Srv.Status()
	if len(st.Sessions) != 1 {
		t.Fatalf("sessions: %+v", st.Sessions)
	}
	// Close the server's side of the conn: its stack sends FIN and forgets.
	r.links.closeAll()
	deadline := time.Now().Add(5 * time.Second)
	buf := make([]byte, 2048)
	for seq := uint32(10); ; seq++ {
		if time.Now().After(deadline) {
			t.Fatal("traffic did not resume over a new fake-TCP conn")
		}
		r.Site.Write(relaytest.ESP(0xc4, seq, 300))
		r.Backend.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, from2, err := r.Backend.ReadFromUDPAddrPort(buf); err == nil {
			if from2 != from {
				t.Fatalf("the session moved to %v from %v", from2, from)
			}
			break
		}
	}
	if got := r.Srv.Status().Sessions[0].Connections; got != 2 {
		t.Fatalf("session carried by %d connections, want 2", got)
	}
}

// TestFakeTCPFrozen checks the frozen mode works end to end where nothing
// checks sequence numbers (the pipe does not).
func TestFakeTCPFrozen(t *testing.T) {
	r := newFakeRig(t, faketcp.SeqFrozen)
	r.Establish(0xf0f0, 0xc5, 0xd5)
	for i := range 20 {
		r.Site.Write(relaytest.ESP(0xc5, uint32(i+2), 600))
		relaytest.Recv(t, r.Backend)
	}
}

// TestFakeTCPHotPathDoesNotAllocate is the fake-TCP twin of
// TestHotPathDoesNotAllocate.
func TestFakeTCPHotPathDoesNotAllocate(t *testing.T) {
	if relaytest.RaceEnabled {
		t.Skip("the race detector allocates on its own; make test runs this check without -race")
	}
	r := newFakeRig(t, faketcp.SeqLive)
	relaytest.CheckHotPath(t, r.Rig, r.Establish(0x4244, 0xc9, 0xd9), 0)
}

// TestFakeTCPGarbageClosesOnlyItsConn: sustained garbage on one fake-TCP
// conn closes that conn, counted, while the relay's own flow carries on.
func TestFakeTCPGarbageClosesOnlyItsConn(t *testing.T) {
	r := newFakeRig(t, faketcp.SeqLive)
	from := r.Establish(0xfa3e, 0xc6, 0xd6)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	bad, err := r.clientStack.Dial(ctx, netip.AddrPortFrom(fakeServerAddr, 4500))
	if err != nil {
		t.Fatal(err)
	}
	bad.SetHandler(func([]faketcp.Payload) {})
	var burst [][]byte
	for i := range server.GarbageBudget + 1 {
		burst = append(burst, append(make([]byte, faketcp.Headroom), relaytest.ESP(0x0bad0000+uint32(i), 1, 60)...))
	}
	if err := bad.Send(burst, faketcp.Headroom); err != nil {
		t.Fatal(err)
	}
	select {
	case <-bad.Done():
	case <-ctx.Done():
		t.Fatal("the server did not close the conn that sent garbage")
	}
	relaytest.Eventually(t, "garbage_closes", func() bool { return relaytest.Counter(r.Srv.Counters(), "garbage_closes") == 1 })
	r.Site.Write(relaytest.ESP(0xc6, 2, 300))
	if got, from2 := relaytest.Recv(t, r.Backend); len(got) != 300 || from2 != from {
		t.Fatal("the relay's own flow was harmed")
	}
}

// TestFakeTCPAggregate: an aggregate of two members over one fake-TCP
// stack, each dialling from a port block of its own (as each leaves by
// its own address once the kernel's NAT rewrites it): both join with
// their Hello and Join, probe, and carry ESP in turn both ways; each
// side sees each member's conn at a port of its block; a member's links
// show its source address.
func TestFakeTCPAggregate(t *testing.T) {
	blocks := []faketcp.PortRange{{First: 40000, Last: 40099}, {First: 40100, Last: 40199}}
	sources := []netip.Addr{netip.MustParseAddr("192.0.2.10"), {}}
	r := newFakeRig(t, faketcp.SeqLive, func(cfg *client.Config, st *faketcp.Stack) {
		cfg.LocationID, cfg.Aggregate = [4]byte{1, 1, 1, 1}, aggregate.RoundRobin
		for i, b := range blocks {
			cfg.Members = append(cfg.Members, client.Member{Name: fmt.Sprintf("wan%d", i+1), Peer: cfg.Peer,
				Dialer: &fakelink.Dialer{Stack: st, Ports: b, Source: sources[i]}})
		}
	})
	r.Site.Write(relaytest.Init(0xa66a))
	_, from := relaytest.Recv(t, r.Backend)
	r.Backend.WriteToUDPAddrPort(relaytest.InitResponse(0xa66a), from)
	relaytest.Recv(t, r.Site)
	up := func(st *relay.Status) bool {
		if len(st.Aggregates) != 1 || len(st.Aggregates[0].Members) != 2 {
			return false
		}
		for _, m := range st.Aggregates[0].Members {
			if m.State != "up" {
				return false
			}
		}
		return true
	}
	relaytest.Eventually(t, "both members joined, on both sides", func() bool { return up(r.Srv.Status()) && up(r.Cl.Status()) })
	const n = 200
	for i := range uint32(n) {
		r.Site.Write(relaytest.ESP(0xc0c0c0c0, i+1, 1000))
		relaytest.Recv(t, r.Backend)
		r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd0d0d0d0, i+1, 1000), from)
		relaytest.Recv(t, r.Site)
	}
	srv, cl := r.Srv.Status().Aggregates[0].Members, r.Cl.Status().Aggregates[0].Members
	for i, m := range srv {
		ap, err := netip.ParseAddrPort(m.Remote)
		if err != nil || ap.Addr() != fakeClientAddr || !blocks[m.Index].Contains(ap.Port()) {
			t.Errorf("server member %d (index %d) at %q: want %s at a port of %v", i, m.Index, m.Remote, fakeClientAddr, blocks[m.Index])
		}
		if m.PacketsIn < n/2-10 || m.PacketsIn > n/2+10 || m.PacketsOut < n/2-10 || m.PacketsOut > n/2+10 {
			t.Errorf("server member %d carried %d in, %d out of %d each way: want about half", i, m.PacketsIn, m.PacketsOut, n)
		}
	}
	for i, m := range cl {
		want := sources[i]
		if !want.IsValid() {
			want = fakeClientAddr
		}
		if ap, err := netip.ParseAddrPort(m.Local); err != nil || ap.Addr() != want || !blocks[i].Contains(ap.Port()) {
			t.Errorf("client member %s leaves from %q: want %s at a port of %v", m.Name, m.Local, want, blocks[i])
		}
	}
	if st := r.Srv.Status(); len(st.Sessions) != 1 {
		t.Errorf("%d server sessions, want the one IKE SA's", len(st.Sessions))
	}
}
