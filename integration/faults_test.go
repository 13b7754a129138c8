package integration

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// The fault tests' steady stream: a datagram every streamEvery, from the
// site's inner address to the hub's, through the tunnel.
const (
	streamEvery = 10 * time.Millisecond
	streamMax   = 2 * time.Minute
)

// requireFaultTools fails (under CI) or skips when a fault test's tool is
// missing.
func requireFaultTools(t *testing.T) {
	t.Helper()
	lab.Require(t)
	if missing := lab.MissingFaultTools(); len(missing) > 0 {
		msg := "the fault tests need " + strings.Join(missing, ", ") + " (run make deps)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
}

// faultRig is a tunnel over iketcp with a steady stream across it, and
// what a fault must leave as it was.
type faultRig struct {
	t      *testing.T
	ctx    context.Context
	tun    *lab.Tunnel
	sa     lab.IKESA
	inits  int // the site's IKE_SA_INIT requests so far
	stream *lab.Stream
}

// initLine is what the site's charon logs for each new IKE SA it starts.
const initLine = "generating IKE_SA_INIT request"

func newFaultRig(t *testing.T, ctx context.Context) *faultRig {
	t.Helper()
	requireFaultTools(t)
	tun, sa, _ := upTunnel(t, ctx, false)
	f := &faultRig{t: t, ctx: ctx, tun: tun, sa: sa, inits: tun.Site.CountInLog(initLine)}
	return f
}

// startStream starts the steady stream and waits until it flows.
func (f *faultRig) startStream() {
	t := f.t
	t.Helper()
	s, err := lab.StartStream(f.tun.Lab.Site, lab.SiteInner, f.tun.Lab.Hub, lab.HubInner, streamEvery, streamMax)
	if err != nil {
		t.Fatal(err)
	}
	f.stream = s
	t.Cleanup(func() { s.Stop(0) })
	start := time.Now()
	f.waitFlowing(start, 5*time.Second, "before the fault")
	time.Sleep(time.Second)
}

// waitFlowing waits until a datagram sent at from or later has arrived,
// and returns how long after from it did.
func (f *faultRig) waitFlowing(from time.Time, max time.Duration, what string) time.Duration {
	f.t.Helper()
	deadline := time.Now().Add(max)
	for {
		if d, ok := f.stream.FlowsAgain(from); ok {
			return d
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("no datagram of the stream arrived %s, %v after", what, max)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sameIKESA reports whether both charons still have the one IKE SA they
// had, with no new IKE_SA_INIT sent.
func (f *faultRig) sameIKESA() bool {
	t := f.t
	t.Helper()
	site, err := f.tun.Site.ListSAs(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	hub, err := f.tun.Hub.ListSAs(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	same := len(site) == 1 && len(hub) == 1 && site[0].UniqueID == f.sa.UniqueID &&
		site[0].InitiatorSPI == f.sa.InitiatorSPI && site[0].ResponderSPI == f.sa.ResponderSPI &&
		hub[0].InitiatorSPI == f.sa.InitiatorSPI && f.tun.Site.CountInLog(initLine) == f.inits
	if !same {
		t.Logf("IKE SAs now: site %+v, hub %+v; IKE_SA_INIT requests %d -> %d", site, hub, f.inits, f.tun.Site.CountInLog(initLine))
	}
	return same
}

// faultRow is one measured scenario, as RELIABILITY.md shows it.
type faultRow struct {
	scenario, done string
	flowsAgain     time.Duration
	sameSA         bool
	lost, sent     int
	command        string
}

func (r faultRow) log(t *testing.T) {
	t.Logf("RELIABILITY | %s | %s | %v | %s | %d of %d | `%s` |", r.scenario, r.done, r.flowsAgain.Round(time.Millisecond),
		yesNo(r.sameSA), r.lost, r.sent, r.command)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// finish stops the stream once traffic has flowed for a while after the
// fault, checks the IKE SA and that nothing was lost outside the fault,
// and returns the row. The fault ran from faultStart to faultEnd; traffic
// flowed again flowsAgain after faultEnd.
func (f *faultRig) finish(scenario, done, command string, faultStart, faultEnd time.Time, flowsAgain time.Duration) faultRow {
	t := f.t
	t.Helper()
	time.Sleep(2 * time.Second)
	stop := time.Now()
	f.stream.Stop(time.Second)
	sent, received := f.stream.Counts()
	gap := f.stream.LongestGap(faultStart.Add(-time.Second), stop)
	done += fmt.Sprintf("; longest pause in arrivals %v", gap.Round(time.Millisecond))
	row := faultRow{scenario: scenario, done: done, flowsAgain: flowsAgain, sameSA: f.sameIKESA(), lost: sent - received, sent: sent, command: command}
	row.log(t)
	if !row.sameSA {
		t.Errorf("%s: the IKE SA did not survive", scenario)
	}
	// Nothing is lost but in the fault and the recovery from it (with a
	// few round trips' slack each side).
	before := f.stream.LostBetween(time.Time{}, faultStart.Add(-100*time.Millisecond))
	after := f.stream.LostBetween(faultEnd.Add(flowsAgain+500*time.Millisecond), stop)
	if before > 0 || after > 0 {
		t.Errorf("%s: %d datagrams lost before the fault, %d after traffic flowed again", scenario, before, after)
	}
	return row
}

// instantFault is a fault that happens at once, measured on a tunnel
// with a steady stream across it.
type instantFault struct {
	name, scenario, done, command string
	fault                         func() error
	check                         func()
}

// measureInstant runs each fault in turn on f's tunnel; each time traffic
// must flow again within seconds, on the same IKE SA and the same server
// session, MOBIKE on.
func (f *faultRig) measureInstant(faults []instantFault) {
	t := f.t
	before := serverSession(t, f.ctx, f.tun)
	for _, c := range faults {
		t.Run(c.name, func(t *testing.T) {
			f.t = t
			f.startStream()
			start := time.Now()
			if err := c.fault(); err != nil {
				t.Fatal(err)
			}
			end := time.Now()
			flows := f.waitFlowing(end, 20*time.Second, "after "+c.scenario)
			if fromStart, ok := f.stream.FlowsAgain(start); ok {
				t.Logf("%s took %v; traffic flowed again %v after it began", c.scenario, end.Sub(start).Round(time.Millisecond), fromStart.Round(time.Millisecond))
			}
			if c.check != nil {
				c.check()
			}
			f.finish(c.scenario, c.done, c.command, start, end, flows)
			if flows > 5*time.Second {
				t.Errorf("traffic flowed again %v after %s, want within 5 s", flows, c.scenario)
			}
			s := serverSession(t, f.ctx, f.tun)
			if s.ID != before.ID || s.Local != before.Local {
				t.Errorf("server session moved: was %d from %s, now %d from %s", before.ID, before.Local, s.ID, s.Local)
			}
		})
	}
}

// TestFaultsKilledRestarted measures the client's own faults, one after
// the other on one tunnel: its TCP connection killed (ss -K), and the
// client SIGKILLed and restarted.
func TestFaultsKilledRestarted(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f := newFaultRig(t, ctx)
	l := f.tun.Lab
	f.measureInstant([]instantFault{
		{"killed", "TCP connection killed", "`ss -K` on the client's connection, mid-stream", "CI=true go test -race ./integration -run 'TestFaultsKilledRestarted/killed' -count=1 -v",
			func() error {
				_, err := l.Site.Run(ctx, "ss", "-K", "dst", lab.HubOuter, "dport", "=", strconv.Itoa(lab.ServerPort))
				return err
			}, nil},
		{"restart", "client SIGKILL and restart", "`kill -9` of `iketcp client`, started again at once", "CI=true go test -race ./integration -run 'TestFaultsKilledRestarted/restart' -count=1 -v",
			func() error {
				if err := f.tun.KillClient(); err != nil {
					return err
				}
				return f.tun.StartClient(ctx)
			}, nil},
	})
}

// TestFaultNATRebind: the carrier's NAT forgets its mappings (conntrack
// flushed) and maps anew from another port range, so the client's
// connection reappears at the hub from a new public port.
func TestFaultNATRebind(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f := newFaultRig(t, ctx)
	l := f.tun.Lab
	f.measureInstant([]instantFault{
		{"rebind", "NAT rebinding", "the carrier's conntrack flushed and its masquerade moved to ports " + lab.RebindPorts + ": the connection reappears from a new public port", "CI=true go test -race ./integration -run 'TestFaultNATRebind' -count=1 -v",
			func() error { return l.RebindNAT(ctx) },
			func() {
				var peer string
				waitFor(t, "the server to see the client from a port of "+lab.RebindPorts, func() bool {
					peer = serverSession(t, ctx, f.tun).Peer
					port, err := strconv.Atoi(peer[strings.LastIndexByte(peer, ':')+1:])
					return err == nil && port >= 61000
				})
				t.Logf("the server sees the client at %s after the rebinding", peer)
			}},
	})
}

// TestFaultBlackout: the carrier drops everything, both ways, for 10 s.
// Both TCP connections stay open and hear nothing; the client takes its
// link for dead after --liveness-timeout (in-band pings), redials with
// backoff until the carrier is back, claims its session, and the IKE SA
// lives on.
func TestFaultBlackout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f := newFaultRig(t, ctx)
	l := f.tun.Lab
	f.startStream()
	start := time.Now()
	if err := l.Blackout(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Second)
	dropped, err := l.BlackoutDropped(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.ClearFaults(ctx); err != nil {
		t.Fatal(err)
	}
	end := time.Now()
	flows := f.waitFlowing(end, 20*time.Second, "after the blackout")
	cst, err := f.tun.ClientStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dead := counterValue(t, cst.Counters, "links_dead")
	t.Logf("blackout: the carrier dropped %d packets; the client took %d links for dead", dropped, dead)
	f.finish("carrier blackout 10 s", "the carrier drops every packet, both ways, for 10 s; both ends' connections stay open",
		"CI=true go test -race ./integration -run 'TestFaultBlackout' -count=1 -v", start, end, flows)
	if dead == 0 {
		t.Error("the client never took its link for dead: liveness did not notice the blackout")
	}
	if flows > 8*time.Second {
		t.Errorf("traffic flowed again %v after the blackout, want within 8 s", flows)
	}
}

// TestFaultResets: the carrier resets every TCP connection every 3 s for
// 30 s. After each reset traffic flows again within seconds, and the IKE
// SA lives through all ten.
func TestFaultResets(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f := newFaultRig(t, ctx)
	l := f.tun.Lab
	f.startStream()
	start := time.Now()
	var resets []time.Time
	var answered uint64
	for at := start; time.Since(start) < 30*time.Second; at = at.Add(3 * time.Second) {
		time.Sleep(time.Until(at))
		resets = append(resets, time.Now())
		n, err := l.ResetOnce(ctx, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		answered += n
	}
	end := time.Now()
	var worst, sum time.Duration
	for i, at := range resets {
		d := f.waitFlowing(at, 20*time.Second, fmt.Sprintf("after reset %d", i+1))
		worst = max(worst, d)
		sum += d
	}
	t.Logf("%d resets, %d segments answered with RST; traffic flowed again after each in %v on average, %v at worst",
		len(resets), answered, (sum / time.Duration(len(resets))).Round(time.Millisecond), worst.Round(time.Millisecond))
	flows := f.waitFlowing(end, 10*time.Second, "after the last reset")
	f.finish("connection resets every 3 s for 30 s", fmt.Sprintf("the carrier answers the next segment of every connection with a RST, every 3 s, %d times; worst recovery after one reset %v", len(resets), worst.Round(time.Millisecond)),
		"CI=true go test -race ./integration -run 'TestFaultResets' -count=1 -v", start, end, flows)
	if answered < uint64(len(resets)) {
		t.Errorf("%d resets sent for %d reset moments: some found no connection to reset", answered, len(resets))
	}
	if worst > 3*time.Second {
		t.Errorf("traffic took %v to flow again after a reset, want within 3 s", worst)
	}
	cst, err := f.tun.ClientStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if dialed := counterValue(t, cst.Counters, "conns_dialed"); dialed < uint64(len(resets)) {
		t.Errorf("the client dialled %d connections through %d resets", dialed, len(resets))
	}
}
