package relay_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/aggregate"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/streamlink"
	"github.com/iketcp/iketcp/relay/ticket"
)

// aggRig is a server and a client whose IKE SA is carried by an aggregate
// of two members, each through a carrier of its own.
type aggRig struct {
	*relaytest.Rig
	cl       *client.Client
	site     *net.UDPConn
	carriers []*relaytest.Carrier
	from     netip.AddrPort // the session's backend socket
}

const aggISPI = 0xa66a

func newAggRig(t *testing.T, alg aggregate.Algorithm, weights ...int) *aggRig {
	t.Helper()
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	a := &aggRig{Rig: r}
	counters := new(relay.Counters)
	cfg := client.Config{
		Peer: r.SrvAddr, LocationID: [4]byte{1, 1, 1, 1}, Aggregate: alg,
		Logger: relaytest.Logger(t), Counters: counters, ReconnectMin: 20 * time.Millisecond, ReconnectMax: 200 * time.Millisecond,
	}
	for i, w := range weights {
		c := relaytest.NewCarrier(t, "127.0.0.1", r.SrvAddr)
		a.carriers = append(a.carriers, c)
		d := streamlink.NewDialer(streamlink.Config{Counters: counters, Logger: cfg.Logger})
		d.Dial = c.Dial
		cfg.Members = append(cfg.Members, client.Member{Name: "m" + string(rune('a'+i)), Peer: c.Addr(), Dialer: d, Weight: w})
	}
	cl, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.cl = cl
	pc, err := client.ListenUDP("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cl.Serve(ctx, pc) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("client: %v", err)
		}
	})
	site, err := net.DialUDP("udp", nil, pc.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { site.Close() })
	a.site = site

	site.Write(relaytest.Init(aggISPI))
	_, a.from = relaytest.Recv(t, r.Backend)
	r.Backend.WriteToUDPAddrPort(relaytest.InitResponse(aggISPI), a.from)
	relaytest.Recv(t, site)
	relaytest.Eventually(t, "both members joined, on both sides", func() bool {
		return membersUp(r.Srv.Status(), len(weights)) && membersUp(cl.Status(), len(weights))
	})
	return a
}

// membersUp reports whether st has one aggregate of n members, all up.
func membersUp(st *relay.Status, n int) bool {
	if len(st.Aggregates) != 1 || len(st.Aggregates[0].Members) != n {
		return false
	}
	for _, m := range st.Aggregates[0].Members {
		if m.State != "up" {
			return false
		}
	}
	return true
}

func members(st *relay.Status) []relay.MemberStatus { return st.Aggregates[0].Members }

// exchange sends n ESP packets each way, paced, and checks that every
// one arrives.
func (a *aggRig) exchange(t *testing.T, n int) {
	t.Helper()
	const chunk = 32
	for seq := uint32(0); seq < uint32(n); seq += chunk {
		k := min(chunk, uint32(n)-seq)
		for i := range k {
			a.site.Write(relaytest.ESP(0xc0c0c0c0, seq+i+1, 1000))
			a.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd0d0d0d0, seq+i+1, 1000), a.from)
		}
		for range k {
			relaytest.Recv(t, a.Backend)
			relaytest.Recv(t, a.site)
		}
	}
}

// within reports whether got is want within ±pct percent of total.
func within(got, want uint64, total uint64, pct float64) bool {
	d := float64(got) - float64(want)
	return d <= pct/100*float64(total) && -d <= pct/100*float64(total)
}

// TestAggregateSpreadsBothWays: one IKE SA over two members; both ends
// spread ESP as the algorithm says, counted on each member.
func TestAggregateSpreadsBothWays(t *testing.T) {
	for _, tc := range []struct {
		alg     aggregate.Algorithm
		weights []int
		share0  float64 // of member 0
	}{
		{aggregate.RoundRobin, []int{1, 1}, 0.5},
		{aggregate.Weighted, []int{3, 1}, 0.75},
		{aggregate.Redundant, []int{1, 1}, 1},
	} {
		t.Run(tc.alg.String(), func(t *testing.T) {
			a := newAggRig(t, tc.alg, tc.weights...)
			srv0, cl0 := members(a.Srv.Status()), members(a.cl.Status())
			const n = 2000
			a.exchange(t, n)
			srv, cl := members(a.Srv.Status()), members(a.cl.Status())
			want0 := uint64(tc.share0 * n)
			// Site to hub: the client's members sent, the server's received.
			if got := cl[0].PacketsOut - cl0[0].PacketsOut; !within(got, want0, n, 2) {
				t.Errorf("client member 0 sent %d of %d, want %d", got, n, want0)
			}
			if got := srv[0].PacketsIn - srv0[0].PacketsIn; !within(got, want0, n, 2) {
				t.Errorf("server member 0 received %d of %d, want %d", got, n, want0)
			}
			// Hub to site: the server's members sent.
			if got := srv[0].PacketsOut - srv0[0].PacketsOut; !within(got, want0, n, 2) {
				t.Errorf("server member 0 sent %d of %d, want %d", got, n, want0)
			}
			if got := cl[1].PacketsIn - cl0[1].PacketsIn; !within(got, uint64(n)-want0, n, 2) {
				t.Errorf("client member 1 received %d of %d, want %d", got, n, uint64(n)-want0)
			}
			st := a.Srv.Status()
			if len(st.Sessions) != 1 {
				t.Fatalf("%d sessions, want one IKE SA's", len(st.Sessions))
			}
			var text strings.Builder
			st.WriteText(&text, time.Now())
			if !strings.Contains(text.String(), "location-id: 1.1.1.1  algorithm: "+tc.alg.String()) {
				t.Errorf("status text lacks the aggregate:\n%s", text.String())
			}
		})
	}
}

// TestAggregateFailover: one member's carrier stops carrying anything
// while ESP crosses every 10 ms each way. The member leaves the rotation
// on both sides within a second, the gap in arrivals stays under a
// second, the backend port is the same; released, the member rejoins and
// carries traffic again.
func TestAggregateFailover(t *testing.T) {
	a := newAggRig(t, aggregate.RoundRobin, 1, 1)
	gaps := func(c *net.UDPConn, out chan<- time.Duration, stop <-chan struct{}) {
		buf := make([]byte, 2048)
		last := time.Now()
		var worst time.Duration
		for {
			select {
			case <-stop:
				out <- worst
				return
			default:
			}
			c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if _, err := c.Read(buf); err != nil {
				continue
			}
			now := time.Now()
			worst = max(worst, now.Sub(last))
			last = now
		}
	}
	stop := make(chan struct{})
	hubGap, siteGap := make(chan time.Duration, 1), make(chan time.Duration, 1)
	go gaps(a.Backend, hubGap, stop)
	go gaps(a.site, siteGap, stop)
	send := func(d time.Duration, seq *uint32) {
		for end := time.Now().Add(d); time.Now().Before(end); {
			*seq++
			a.site.Write(relaytest.ESP(0xc0c0c0c0, *seq, 200))
			a.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd0d0d0d0, *seq, 200), a.from)
			time.Sleep(10 * time.Millisecond)
		}
	}
	var seq uint32
	send(300*time.Millisecond, &seq)
	held := time.Now()
	a.carriers[1].Hold()
	var downAfter time.Duration
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end) && downAfter == 0; {
		send(20*time.Millisecond, &seq)
		if m := members(a.Srv.Status()); m[1].State == "down" && members(a.cl.Status())[1].State == "down" {
			downAfter = time.Since(held)
		}
	}
	if downAfter == 0 || downAfter > time.Second {
		t.Fatalf("the held member left the rotation after %v, want within 1s", downAfter)
	}
	send(500*time.Millisecond, &seq)
	before := members(a.Srv.Status())
	a.carriers[1].Release()
	relaytest.Eventually(t, "the member back in the rotation", func() bool {
		send(20*time.Millisecond, &seq)
		return membersUp(a.Srv.Status(), 2) && membersUp(a.cl.Status(), 2)
	})
	send(300*time.Millisecond, &seq)
	close(stop)
	hg, sg := <-hubGap, <-siteGap
	t.Logf("held member out after %v; largest gap: toward the hub %v, toward the site %v", downAfter.Round(time.Millisecond),
		hg.Round(time.Millisecond), sg.Round(time.Millisecond))
	if hg >= time.Second || sg >= time.Second {
		t.Errorf("gap %v toward the hub, %v toward the site: want under 1s", hg, sg)
	}
	after := members(a.Srv.Status())
	if after[1].PacketsIn <= before[1].PacketsIn || after[1].PacketsOut <= before[1].PacketsOut {
		t.Errorf("the member carries nothing after it came back: in %d->%d, out %d->%d",
			before[1].PacketsIn, after[1].PacketsIn, before[1].PacketsOut, after[1].PacketsOut)
	}
	if st := a.Srv.Status(); len(st.Sessions) != 1 || st.Sessions[0].Local != a.from.String() {
		t.Errorf("sessions %d; want one, on the same backend socket %v", len(st.Sessions), a.from)
	}
	if a.Srv.Counters().MembersDown.Load() == 0 || a.cl.Counters().MembersDown.Load() == 0 {
		t.Error("members_down not counted")
	}
}

// TestStrangerCannotJoin: someone who knows the location ID, the session
// ID and its SPIs, with a link of its own and a key exchange, cannot add
// a member: the MAC needs the session's key.
func TestStrangerCannotJoin(t *testing.T) {
	a := newAggRig(t, aggregate.RoundRobin, 1, 1)
	a.exchange(t, 10) // the session's SPIs are known
	sessID := a.Srv.Status().Aggregates[0].Session
	c := a.RawConn(true)
	defer c.Close()
	d := framing.NewDecoder(c, 0, false)
	ex, err := ticket.NewExchange()
	if err != nil {
		t.Fatal(err)
	}
	relaytest.Frame(t, c, framing.AppendControl(nil, framing.ControlHello, ex.Public()))
	reply := relaytest.ReadFrame(t, c, d)
	var m framing.Message
	if m.Decode(reply) != nil || m.Kind != framing.KindControl || m.Control.Type != framing.ControlHelloReply {
		t.Fatalf("no hello reply: %x", reply)
	}
	server := bytes.Clone(m.Control.Body)
	linkKey, err := ex.LinkKey(server, ex.Public(), server)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []ticket.Key{{}, linkKey} { // a guess, and its own link's key
		mac := ticket.JoinMAC(key, sessID, [4]byte{1, 1, 1, 1}, uint8(aggregate.RoundRobin), 1, 2, ex.Public(), server)
		relaytest.Frame(t, c, framing.AppendControl(nil, framing.ControlJoin, []byte{1, 1, 1, 1},
			binary.BigEndian.AppendUint64(nil, sessID), []byte{uint8(aggregate.RoundRobin), 1, 2}, mac[:]))
		got := relaytest.ReadFrame(t, c, d)
		if m.Decode(got) != nil || m.Control.Type != framing.ControlJoined || m.Control.Body[9] != framing.JoinRefused {
			t.Fatalf("join with a key that is not the session's: %x, want refused", got)
		}
	}
	// Its ESP with the session's SPI goes to the backend (which checks
	// it), but nothing comes back to it, and the members stay two.
	relaytest.Frame(t, c, relaytest.ESP(0xc0c0c0c0, 99, 100))
	relaytest.Recv(t, a.Backend)
	a.exchange(t, 50)
	relaytest.ExpectNoFrame(t, c, "the session's traffic on a stranger's link")
	if st := a.Srv.Status(); len(members(st)) != 2 || a.Srv.Counters().JoinsRefused.Load() != 2 {
		t.Fatalf("members %d, joins_refused %d; want 2 and 2", len(members(st)), a.Srv.Counters().JoinsRefused.Load())
	}
}

// TestAggregateHotPathDoesNotAllocate: the scheduler on both ends adds no
// allocation per datagram, with probes running meanwhile.
func TestAggregateHotPathDoesNotAllocate(t *testing.T) {
	if relaytest.RaceEnabled {
		t.Skip("the race detector allocates on its own; make test runs this check without -race")
	}
	for _, alg := range []aggregate.Algorithm{aggregate.RoundRobin, aggregate.LeastLatency} {
		t.Run(alg.String(), func(t *testing.T) {
			a := newAggRig(t, alg, 1, 1)
			a.Site = a.site
			relaytest.CheckHotPath(t, a.Rig, a.from, 0)
			if m := members(a.Srv.Status()); alg == aggregate.RoundRobin && (m[0].PacketsOut == 0 || m[1].PacketsOut == 0) {
				t.Errorf("the check did not cross both members: %+v", m)
			}
		})
	}
}
