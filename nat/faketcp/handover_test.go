package faketcp

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/tun/tuntest"
)

// recorder is a handler that records the numbers of the datagrams a conn
// receives.
type recorder struct {
	mu      sync.Mutex
	indices []uint32
	bad     int
}

func (r *recorder) handle(batch []Payload) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, p := range batch {
		index, err := checkDatagram(p.Buf[p.Off : p.Off+p.N])
		if err != nil {
			r.bad++
			continue
		}
		r.indices = append(r.indices, index)
	}
}

// waitFor waits until the datagrams first..last have all come, in order,
// after what came before.
func (r *recorder) waitFor(t *testing.T, what string, first, last uint32) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		r.mu.Lock()
		got := append([]uint32(nil), r.indices...)
		bad := r.bad
		r.mu.Unlock()
		if bad > 0 {
			t.Fatalf("%s: %d damaged datagrams", what, bad)
		}
		want := int(last - first + 1)
		var from []uint32
		for i, index := range got {
			if index == first {
				from = got[i:]
				break
			}
		}
		if len(from) >= want {
			for i, index := range from[:want] {
				if index != first+uint32(i) {
					t.Fatalf("%s: datagram %d arrived as number %d", what, index, first+uint32(i))
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d of datagrams %d..%d arrived", what, len(from), first, last)
		}
	}
}

func sendRange(t *testing.T, c *Conn, first, last uint32) {
	t.Helper()
	var batch [][]byte
	for i := first; i <= last; i++ {
		batch = append(batch, datagram(i, 100+int(i%200)))
	}
	if err := c.Send(batch, Headroom); err != nil {
		t.Fatalf("sending %d..%d: %v", first, last, err)
	}
}

// TestHandOverConn moves an established conn from one stack to a new one
// on the same device, as a server's upgrade does: datagrams the client
// sends while the old stack is paused wait in the device and reach the
// new one's handler; afterwards datagrams cross both ways, in order; the
// client sees no RST, nor anything it finds unacceptable; the new stack
// refuses nothing; and its listener, with the old one's cookie key,
// accepts new conns.
func TestHandOverConn(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    pairOptions
	}{
		{"IPv4", pairOptions{}},
		{"IPv6", pairOptions{v6: true}},
		{"offload", pairOptions{offload: [2]bool{true, true}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPair(t, tc.o)
			atClient, atOld := &recorder{}, &recorder{}
			p.client.SetHandler(atClient.handle)
			p.server.SetHandler(atOld.handle)
			sendRange(t, p.client, 0, 99)
			sendRange(t, p.server, 0, 99)
			atOld.waitFor(t, "before, to the server", 0, 99)
			atClient.waitFor(t, "before, to the client", 0, 99)

			if _, err := p.server.Detach(); !errors.Is(err, errNotPaused) {
				t.Fatalf("Detach on a running stack: %v, want errNotPaused", err)
			}
			st, err := p.b.Pause()
			if err != nil {
				t.Fatal(err)
			}
			if len(st.Listeners) != 1 || st.Listeners[0] != testPort || len(st.CookieKey) != cookieKeyLen {
				t.Fatalf("paused stack's state: %+v", st)
			}
			// While the hand-over runs, the client goes on sending.
			sendRange(t, p.client, 100, 149)
			cs, err := p.server.Detach()
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-p.server.Done():
			default:
				t.Fatal("the detached conn is not done")
			}
			if err := p.server.Send([][]byte{datagram(1, 100)}, Headroom); !errors.Is(err, ErrDetached) {
				t.Fatalf("Send on the detached conn: %v, want ErrDetached", err)
			}
			if n := p.b.Stats().Conns; n != 0 {
				t.Fatalf("the old stack still holds %d conns", n)
			}
			p.b.Close() // the old process exits: nothing goes out
			st.Conns = append(st.Conns, cs)
			raw, err := json.Marshal(st)
			if err != nil {
				t.Fatal(err)
			}
			var st2 StackState
			if err := json.Unmarshal(raw, &st2); err != nil {
				t.Fatal(err)
			}
			_, cb := addrsOf(tc.o.v6)
			b2, lns, conns, err := ResumeStack(p.devB, Config{Local: cb}, st2)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b2.Close() })
			atNew := &recorder{}
			conns[0].SetHandler(atNew.handle)
			atNew.waitFor(t, "sent during the hand-over", 100, 149)
			sendRange(t, conns[0], 100, 299)
			sendRange(t, p.client, 150, 349)
			atClient.waitFor(t, "after, to the client", 100, 299)
			atNew.waitFor(t, "after, to the new server", 150, 349)
			if err := p.client.Err(); err != nil {
				t.Fatalf("the client's conn ended: %v", err)
			}
			if cst := p.client.Stats(); cst.DroppedUnacceptable != 0 || cst.State != "ESTABLISHED" {
				t.Fatalf("the client's conn after the hand-over: %+v", cst)
			}
			if bs := b2.Stats(); bs.Refused != 0 || bs.BadCookies != 0 {
				t.Fatalf("the new stack refused segments: %+v", bs)
			}

			// The listener goes on, a new conn to it too.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c2, err := p.a.Dial(ctx, netip.AddrPortFrom(b2.LocalAddr(), testPort))
			if err != nil {
				t.Fatal(err)
			}
			s2, err := lns[0].Accept(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if s2.RemoteAddr() != c2.LocalAddr() {
				t.Fatalf("accepted %v, dialled from %v", s2.RemoteAddr(), c2.LocalAddr())
			}
		})
	}
}

// TestHandOverCookie: a cookie the old stack sent opens a conn in the new
// one, which has its key.
func TestHandOverCookie(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	local := netip.MustParseAddrPort("192.0.2.2:4500")
	remote := netip.MustParseAddrPort("198.51.100.7:40000")
	syn := &segment{flags: flagSYN, seq: 1000, mss: 1460, windowScale: true}
	p := newStacks(t, pairOptions{})
	st, err := p.b.Pause()
	if err != nil {
		t.Fatal(err)
	}
	old := p.b.rx.cookies.make(now, local, remote, syn, 536)
	j := newCookieJar(st.CookieKey)
	ack := &segment{flags: flagACK, seq: 1001, ack: old.iss + 1}
	if _, ok := j.check(now.Add(time.Second), local, remote, ack); !ok {
		t.Fatal("the exported key does not check the old stack's cookie")
	}
}

// TestResumeRefusesBadState: a state no stack could have had is refused
// whole, and nothing is left running.
func TestResumeRefusesBadState(t *testing.T) {
	now := time.Now()
	good := ConnState{Remote: netip.MustParseAddrPort("192.0.2.9:40000"), LocalPort: testPort, Passive: true,
		PeerMSS: 1460, PeerWScale: true, PeerShift: 7, Opened: now, LastHeard: now}
	key := make([]byte, cookieKeyLen)
	for _, tc := range []struct {
		want string
		edit func(*StackState)
	}{
		{"cookie key", func(s *StackState) { s.CookieKey = s.CookieKey[:5] }},
		{"listener port 0", func(s *StackState) { s.Listeners = []uint16{0} }},
		{"listener port 4500", func(s *StackState) { s.Listeners = []uint16{testPort, testPort} }},
		{"not a IPv4", func(s *StackState) { s.Conns[0].Remote = netip.MustParseAddrPort("[2001:db8::1]:5") }},
		{"not a IPv4", func(s *StackState) { s.Conns[0].Remote = netip.AddrPort{} }},
		{"local port 0", func(s *StackState) { s.Conns[0].LocalPort = 0 }},
		{"twice", func(s *StackState) { s.Conns = append(s.Conns, s.Conns[0]) }},
		{"peer MSS", func(s *StackState) { s.Conns[0].PeerMSS = 0 }},
		{"peer MSS", func(s *StackState) { s.Conns[0].PeerMSS = 65535 }},
		{"window shift", func(s *StackState) { s.Conns[0].PeerShift = 15 }},
		{"window shift", func(s *StackState) { s.Conns[0].PeerWScale = false }},
		{"flow label", func(s *StackState) { s.Conns[0].FlowLabel = 1 << 20 }},
		{"last heard", func(s *StackState) { s.Conns[0].LastHeard = time.Time{} }},
	} {
		st := StackState{CookieKey: key, Listeners: []uint16{testPort}, Conns: []ConnState{good}}
		tc.edit(&st)
		a, _ := tuntest.NewPipe(8, 64)
		_, _, _, err := ResumeStack(a, Config{Local: addr4B}, st)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: ResumeStack said %v", tc.want, err)
		}
	}
	a, _ := tuntest.NewPipe(8, 64)
	s, _, conns, err := ResumeStack(a, Config{Local: addr4B}, StackState{CookieKey: key, Listeners: []uint16{testPort}, Conns: []ConnState{good}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if st := conns[0].Stats(); st.State != "ESTABLISHED" || st.PeerMSS != 1460 {
		t.Fatalf("resumed conn: %+v", st)
	}
}
