package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/aggregate"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/ticket"
)

// aggMembers are the site's two members, one per carrier, each from its
// own uplink address to the hub's address on that carrier.
var aggMembers = []string{
	"wan1=" + lab.SiteOuter + "->" + net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort)),
	"wan2=" + lab.SiteOuter2 + "->" + net.JoinHostPort(lab.HubOuter2, strconv.Itoa(lab.ServerPort)),
}

// upAggregate builds a two-carrier lab and brings a tunnel up over an
// aggregate of both carriers, MOBIKE on (strongSwan's default), with
// every member joined on both sides.
func upAggregate(t *testing.T, ctx context.Context, opts lab.TunnelOptions, args ...string) (*lab.Tunnel, lab.IKESA) {
	t.Helper()
	return upAggregateIn(t, ctx, lab.NewForTest(t, lab.Options{TwoCarriers: true}), opts, args...)
}

// upAggregateIn is upAggregate in a two-carrier lab that the caller built
// (and may have changed).
func upAggregateIn(t *testing.T, ctx context.Context, l *lab.Lab, opts lab.TunnelOptions, args ...string) (*lab.Tunnel, lab.IKESA) {
	t.Helper()
	opts.Binary = iketcpBinary
	opts.ServerListen = []string{net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort)), net.JoinHostPort(lab.HubOuter2, strconv.Itoa(lab.ServerPort))}
	opts.Members = aggMembers
	opts.ClientArgs = append([]string{"--location-id", "1.1.1.1"}, args...)
	tun, err := l.StartTunnel(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	var sa lab.IKESA
	for _, c := range tun.Conns {
		if sa, err = tun.InitiateConn(ctx, c); err != nil {
			t.Fatalf("initiate %s: %v", c.Name, err)
		}
	}
	waitMembers(t, ctx, tun, len(tun.Conns), "up", "up")
	return tun, sa
}

// waitMembers waits until both the server and the client show n
// aggregates whose members are in the given states, in order.
func waitMembers(t *testing.T, ctx context.Context, tun *lab.Tunnel, n int, states ...string) {
	t.Helper()
	match := func(st *relay.Status) bool {
		if len(st.Aggregates) != n {
			return false
		}
		for _, a := range st.Aggregates {
			if len(a.Members) != len(states) {
				return false
			}
			for i, m := range a.Members {
				if m.State != states[i] {
					return false
				}
			}
		}
		return true
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		srv, err1 := tun.ServerStatus(ctx)
		cl, err2 := tun.ClientStatus(ctx)
		if err1 == nil && err2 == nil && match(srv) && match(cl) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("members not %v within 10s: server %+v (%v), client %+v (%v)", states, srv, err1, cl, err2)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// memberCounts returns, for aggregate i of the server, each member's
// packets in (from the site) and out (toward it).
func memberCounts(t *testing.T, ctx context.Context, tun *lab.Tunnel, i int) (in, out []uint64) {
	t.Helper()
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Aggregates[i].Members {
		in = append(in, m.PacketsIn)
		out = append(out, m.PacketsOut)
	}
	return in, out
}

func diff(a, b []uint64) []uint64 {
	out := make([]uint64, len(a))
	for i := range a {
		out[i] = a[i] - b[i]
	}
	return out
}

// share returns d[0]'s share of d's total.
func share(d []uint64) float64 {
	var total uint64
	for _, v := range d {
		total += v
	}
	if total == 0 {
		return -1
	}
	return float64(d[0]) / float64(total)
}

// TestAggregateSplit: a steady ping flow through one IKE SA carried over
// two carriers is spread by the members as the algorithm says, both ways,
// counted by the server's members.
func TestAggregateSplit(t *testing.T) {
	for _, tc := range []struct {
		name     string
		args     []string
		want     float64 // member 0's share
		min, max float64
	}{
		{"round-robin", []string{"--aggregate", "round-robin"}, 0.5, 0.4, 0.6},
		{"weighted", []string{"--aggregate", "weighted", "--weight", "wan1=3", "--weight", "wan2=1"}, 0.75, 0.65, 0.85},
		{"redundant", []string{"--aggregate", "redundant"}, 1, 0.99, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			tun, _ := upAggregate(t, ctx, lab.TunnelOptions{}, tc.args...)
			in0, out0 := memberCounts(t, ctx, tun, 0)
			got, err := tun.PingThrough(ctx, 200, 10*time.Millisecond)
			if err != nil || got < 195 {
				t.Fatalf("%d of 200 pings: %v", got, err)
			}
			in1, out1 := memberCounts(t, ctx, tun, 0)
			din, dout := diff(in1, in0), diff(out1, out0)
			t.Logf("%s: toward the hub %v (%.1f%% on wan1), toward the site %v (%.1f%% on wan1)",
				tc.name, din, 100*share(din), dout, 100*share(dout))
			for what, s := range map[string]float64{"toward the hub": share(din), "toward the site": share(dout)} {
				if s < tc.min || s > tc.max {
					t.Errorf("%s: wan1 carried %.1f%%, want %.0f%% within [%.0f%%, %.0f%%]", what, 100*s, 100*tc.want, 100*tc.min, 100*tc.max)
				}
			}
			if st, _ := tun.ServerStatus(ctx); len(st.Sessions) != 1 {
				t.Errorf("%d server sessions, want the one IKE SA's", len(st.Sessions))
			}
		})
	}
}

// TestAggregateL4KeepsFlows: two inner flows, each in a child SA of its
// own (the inner headers travel encrypted: the SA is the flow iketcp
// sees), each stay on one member with l4.
func TestAggregateL4KeepsFlows(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tun, _ := upAggregate(t, ctx, lab.TunnelOptions{Connections: 2}, "--aggregate", "l4")
	var before [2][]uint64
	for i := range 2 {
		before[i], _ = memberCounts(t, ctx, tun, i)
	}
	for _, c := range tun.Conns {
		if got, err := tun.PingConn(ctx, c, 100, 10*time.Millisecond); err != nil || got < 97 {
			t.Fatalf("%s: %d of 100 pings: %v", c.Name, got, err)
		}
	}
	for i := range 2 {
		after, _ := memberCounts(t, ctx, tun, i)
		d := diff(after, before[i])
		t.Logf("flow %d: toward the hub %v per member", i+1, d)
		if s := share(d); s > 0.01 && s < 0.99 {
			t.Errorf("flow %d spread over both members: %v", i+1, d)
		}
	}
}

var pingSeq = regexp.MustCompile(`icmp_seq=(\d+) `)

// pingGaps pings every interval, count times, and returns how many
// replies came and the longest time between two replies (counting the
// requests lost between them).
func pingGaps(ctx context.Context, l *lab.Lab, count int, interval time.Duration) (int, time.Duration, error) {
	out, _ := l.Site.Command(ctx, "ping", "-n", "-c", strconv.Itoa(count), "-i", strconv.FormatFloat(interval.Seconds(), 'f', 3, 64),
		"-W", "1", "-I", lab.SiteInner, lab.HubInner).CombinedOutput()
	seen := map[int]bool{}
	for _, m := range pingSeq.FindAllStringSubmatch(string(out), -1) {
		n, _ := strconv.Atoi(m[1])
		seen[n] = true
	}
	last, worst := 0, 0
	for seq := 1; seq <= count; seq++ {
		if seen[seq] {
			worst = max(worst, seq-last)
			last = seq
		}
	}
	worst = max(worst, count+1-last)
	return len(seen), time.Duration(worst) * interval, nil
}

// TestAggregateFailover: pings cross every 20 ms while the second carrier
// drops everything, then heals. The pings keep crossing with a gap under
// a second, the IKE SA is the same one, and the member rejoins and carries
// traffic again.
func TestAggregateFailover(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	tun, sa := upAggregate(t, ctx, lab.TunnelOptions{}, "--aggregate", "round-robin")
	l := tun.Lab
	failover(t, ctx, tun, sa)
	text, err := tun.StatusText(ctx, l.Hub, tun.ServerControl)
	if err != nil || !strings.Contains(text, "location-id: 1.1.1.1  algorithm: round-robin") {
		t.Errorf("iketcp status: %v\n%s", err, text)
	}
	t.Logf("iketcp status at the hub:\n%s", text)
}

// failover pings every 20 ms while the second carrier drops everything
// for 2 s, then heals, and checks that the longest gap between replies
// was under a second, that the member rejoined and carries pings again,
// and that the IKE SA is the one the tunnel had (sa, the site's).
func failover(t *testing.T, ctx context.Context, tun *lab.Tunnel, sa lab.IKESA) {
	t.Helper()
	l := tun.Lab
	hubBefore := hubSA(t, ctx, tun)
	type result struct {
		got int
		gap time.Duration
	}
	done := make(chan result, 1)
	const count, interval = 250, 20 * time.Millisecond // 5 s
	go func() {
		got, gap, _ := pingGaps(ctx, l, count, interval)
		done <- result{got, gap}
	}()
	time.Sleep(time.Second)
	if err := l.CutCarrier(ctx, l.Carrier2); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	waitMembers(t, ctx, tun, 1, "up", "down")
	t.Logf("wan2 out of the rotation on both sides %v after its carrier was cut", time.Since(cut).Round(time.Millisecond))
	time.Sleep(time.Until(cut.Add(2 * time.Second)))
	if err := l.HealCarrier(ctx, l.Carrier2); err != nil {
		t.Fatal(err)
	}
	r := <-done
	t.Logf("%d of %d pings every %v crossed; longest gap %v", r.got, count, interval, r.gap)
	if r.gap >= time.Second {
		t.Errorf("longest gap %v, want under 1s", r.gap)
	}
	waitMembers(t, ctx, tun, 1, "up", "up")
	in0, _ := memberCounts(t, ctx, tun, 0)
	if got, err := tun.PingThrough(ctx, 50, 10*time.Millisecond); err != nil || got < 48 {
		t.Fatalf("after healing: %d of 50 pings: %v", got, err)
	}
	in1, _ := memberCounts(t, ctx, tun, 0)
	if d := diff(in1, in0); d[1] < 15 {
		t.Errorf("wan2 carried %d of the pings after healing (members %v)", d[1], d)
	}
	hubAfter := hubSA(t, ctx, tun)
	sas, err := tun.Site.ListSAs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if hubAfter.InitiatorSPI != hubBefore.InitiatorSPI || len(sas) != 1 || sas[0].InitiatorSPI != sa.InitiatorSPI {
		t.Errorf("IKE SA changed: hub %s -> %s, site %+v", hubBefore.InitiatorSPI, hubAfter.InitiatorSPI, sas)
	}
	if n := tun.Hub.CountInLog("IKE_SA_INIT"); n > 2 {
		t.Errorf("the hub's log names IKE_SA_INIT %d times: a new IKE SA was made", n)
	}
}

// pushFor sends as much as it can from the site's inner address to the
// hub's through the tunnel for d, and returns how many bytes the hub got.
func pushFor(t *testing.T, ctx context.Context, l *lab.Lab, d time.Duration) int64 {
	t.Helper()
	ln, err := l.Hub.Listen("tcp", net.JoinHostPort(lab.HubInner, "5002"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- 0
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(d + 10*time.Second))
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	c, err := l.Site.Dial(ctx, "tcp", net.JoinHostPort(lab.HubInner, "5002"))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	c.SetWriteDeadline(time.Now().Add(d))
	for {
		if _, err := c.Write(buf); err != nil {
			break
		}
	}
	c.Close()
	return <-got
}

// TestAggregateUnequalPaths: the second carrier is a 4 Mbit/s bottleneck
// whose queue adds up to 100 ms, the first is not limited. A bulk
// transfer through the tunnel for 3 s: least-latency delivers more than
// round-robin; with the hub's reorder buffer, least-latency's daemon sees
// no ESP out of order, and round-robin's less than without it. Every run reports what the hub's
// daemon got out of order, and how far behind at most: the replay window
// it needs.
func TestAggregateUnequalPaths(t *testing.T) {
	type run struct {
		name       string
		args       []string
		serverArgs []string
	}
	// The buffer's cap covers the slow carrier's worst delay: its 100 ms
	// queue, and a TCP retransmission on it now and then, which can take
	// longer than the default 200 ms.
	reorderOn := []string{"--reorder-max", "400ms"}
	runs := []run{
		{"round-robin, reorder off", []string{"--aggregate", "round-robin"}, []string{"--reorder-max", "0"}},
		{"round-robin, reorder on", []string{"--aggregate", "round-robin"}, reorderOn},
		{"least-latency, reorder off", []string{"--aggregate", "least-latency"}, []string{"--reorder-max", "0"}},
		{"least-latency, reorder on", []string{"--aggregate", "least-latency"}, reorderOn},
	}
	delivered := map[string]int64{}
	reordered := map[string]relay.ReorderStatus{}
	for _, r := range runs {
		t.Run(strings.ReplaceAll(r.name, ", ", "/"), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			tun, _ := upAggregate(t, ctx, lab.TunnelOptions{ServerArgs: r.serverArgs}, r.args...)
			l := tun.Lab
			if err := l.LimitCarrierRate(ctx, l.Carrier2, 4_000_000, 100*time.Millisecond); err != nil {
				t.Fatal(err)
			}
			before, err := tun.ServerStatus(ctx)
			if err != nil {
				t.Fatal(err)
			}
			n := pushFor(t, ctx, l, 3*time.Second)
			after, err := tun.ServerStatus(ctx)
			if err != nil {
				t.Fatal(err)
			}
			rb, ra := before.Aggregates[0].Reorder, after.Aggregates[0].Reorder
			ro := relay.ReorderStatus{
				HoldMs: ra.HoldMs, Delivered: ra.Delivered - rb.Delivered, Held: ra.Held - rb.Held, Expired: ra.Expired - rb.Expired,
				Passed: ra.Passed - rb.Passed, OutOfOrder: ra.OutOfOrder - rb.OutOfOrder, MaxBehind: ra.MaxBehind,
			}
			in := diff(memberIn(after), memberIn(before))
			delivered[r.name], reordered[r.name] = n, ro
			t.Logf("%s: %d bytes in 3s (%.1f Mbit/s); ESP toward the hub per member %v; at the hub's daemon: %d ESP, %d out of order, at most %d behind; held %d, gaps given up %d at their hold time and %d once every member was past them, hold %.1f ms",
				r.name, n, float64(n)*8/3e6, in, ro.Delivered, ro.OutOfOrder, ro.MaxBehind, ro.Held, ro.Expired, ro.Passed, ro.HoldMs)
			if n == 0 {
				t.Fatal("nothing crossed")
			}
			if strings.HasSuffix(r.name, "reorder off") && ro.Held != 0 {
				t.Errorf("the buffer held %d with --reorder-max 0", ro.Held)
			}
		})
	}
	if t.Failed() || len(delivered) < len(runs) {
		return
	}
	if ll, rr := delivered["least-latency, reorder on"], delivered["round-robin, reorder on"]; ll <= rr {
		t.Errorf("least-latency delivered %d bytes, round-robin %d: want more", ll, rr)
	}
	// With the buffer, least-latency's reordering never reaches the
	// daemon: what the slow member carries is waited for (the hold follows
	// its delay, up to the cap), and a gap every member is past goes at
	// once.
	if on := reordered["least-latency, reorder on"]; on.OutOfOrder != 0 {
		t.Errorf("least-latency: the daemon got %d out of order (at most %d behind) with the buffer, want none", on.OutOfOrder, on.MaxBehind)
	}
	// Round-robin over these paths reorders most: the buffer must take
	// it away before the daemon, or nearly (a TCP retransmission on the
	// slow carrier can take longer than the cap).
	if on, off := reordered["round-robin, reorder on"], reordered["round-robin, reorder off"]; off.OutOfOrder == 0 || on.OutOfOrder >= off.OutOfOrder {
		t.Errorf("round-robin: the daemon got %d out of order (at most %d behind) with the buffer, %d (%d) without",
			on.OutOfOrder, on.MaxBehind, off.OutOfOrder, off.MaxBehind)
	}
}

// memberIn returns the server's first aggregate's members' packets in.
func memberIn(st *relay.Status) []uint64 {
	var in []uint64
	for _, m := range st.Aggregates[0].Members {
		in = append(in, m.PacketsIn)
	}
	return in
}

// TestAggregateStrangerCannotJoin: someone on the site's own network who
// knows the location ID, the session and its SPIs opens a link of its own
// to the hub, runs the key exchange, and asks to join the aggregate: the
// join is refused, the aggregate keeps its two members, and the session's
// traffic never comes to the stranger, while pings keep crossing.
func TestAggregateStrangerCannotJoin(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tun, _ := upAggregate(t, ctx, lab.TunnelOptions{}, "--aggregate", "round-robin")
	// The tunnel works (a precondition: one ping may meet a member being
	// probed on a loaded machine); what the stranger must not harm is
	// checked strictly below.
	if got, err := tun.PingThrough(ctx, 5, 20*time.Millisecond); err != nil || got < 4 {
		t.Fatalf("%d of 5 pings: %v", got, err)
	}
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sessID := st.Aggregates[0].Session
	if len(st.Sessions) != 1 || len(st.Sessions[0].ESPIn) == 0 {
		t.Fatalf("want one session with ESP: %+v", st.Sessions)
	}
	spi, err := strconv.ParseUint(st.Sessions[0].ESPIn[0], 16, 32)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tun.Lab.Site.Dial(ctx, "tcp", net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(framing.Prefix)); err != nil {
		t.Fatal(err)
	}
	d := framing.NewDecoder(c, 0, false)
	ex, err := ticket.NewExchange()
	if err != nil {
		t.Fatal(err)
	}
	relaytest.Frame(t, c, framing.AppendControl(nil, framing.ControlHello, ex.Public()))
	var m framing.Message
	if reply := relaytest.ReadFrame(t, c, d); m.Decode(reply) != nil || m.Control.Type != framing.ControlHelloReply {
		t.Fatalf("no hello reply: %x", reply)
	}
	server := bytes.Clone(m.Control.Body)
	linkKey, err := ex.LinkKey(server, ex.Public(), server)
	if err != nil {
		t.Fatal(err)
	}
	loc := [4]byte{1, 1, 1, 1}
	mac := ticket.JoinMAC(linkKey, sessID, loc, uint8(aggregate.RoundRobin), 1, 2, ex.Public(), server)
	relaytest.Frame(t, c, framing.AppendControl(nil, framing.ControlJoin, loc[:], binary.BigEndian.AppendUint64(nil, sessID),
		[]byte{uint8(aggregate.RoundRobin), 1, 2}, mac[:]))
	if got := relaytest.ReadFrame(t, c, d); m.Decode(got) != nil || m.Control.Type != framing.ControlJoined || m.Control.Body[9] != framing.JoinRefused {
		t.Fatalf("the stranger's join: %x, want refused", got)
	}
	// ESP with the session's SPI: the hub's daemon checks it and drops it;
	// the session's answers go to its members, not here.
	relaytest.Frame(t, c, relaytest.ESP(uint32(spi), 1, 200))
	if got, err := tun.PingThrough(ctx, 20, 20*time.Millisecond); err != nil || got != 20 {
		t.Fatalf("%d of 20 pings beside the stranger: %v", got, err)
	}
	c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, err := c.Read(make([]byte, 64)); err == nil || n > 0 {
		t.Fatalf("the stranger's link got %d bytes of the session", n)
	}
	st, err = tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	refused := uint64(0)
	for _, ctr := range st.Counters {
		if ctr.Name == "joins_refused" {
			refused = ctr.Value
		}
	}
	if len(st.Aggregates) != 1 || len(st.Aggregates[0].Members) != 2 || refused != 1 {
		t.Fatalf("aggregates %+v, joins_refused %d: want one of two members, and one refusal", st.Aggregates, refused)
	}
}
