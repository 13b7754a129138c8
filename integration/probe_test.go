package integration

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
	probepkg "github.com/iketcp/iketcp/relay/probe"
)

// TestProbeVerdicts runs `iketcp probe` from the site against a real
// strongSwan hub with `iketcp server` beside it, through the lab's open,
// block-udp and cgnat carriers, and checks what it found and its verdict:
// UDP answered and a port-preserving NAT; UDP blocked, with the advice to
// use TCP; a port-changing NAT.
func TestProbeVerdicts(t *testing.T) {
	l := lab.NewForTest(t, lab.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary})
	if err != nil {
		t.Fatal(err)
	}
	run := func(profile string) *probepkg.Report {
		t.Helper()
		if err := l.SetProfile(ctx, profile); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		out, err := l.Site.Run(ctx, iketcpBinary, "probe", "--json", "--wait", "500ms", lab.HubOuter)
		if err != nil {
			t.Fatalf("%s: iketcp probe: %v\n%s", profile, err, out)
		}
		var r probepkg.Report
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("%s: %v\n%s", profile, err, out)
		}
		text, _ := l.Site.Run(ctx, iketcpBinary, "probe", "--wait", "500ms", lab.HubOuter)
		t.Logf("profile %s: probe took %v\n%s", profile, time.Since(start).Round(time.Millisecond), text)
		return &r
	}
	udp := func(r *probepkg.Report, port uint16) probepkg.UDPResult {
		for _, u := range r.UDP {
			if u.Port == port {
				return u
			}
		}
		t.Fatalf("no result for UDP %d", port)
		return probepkg.UDPResult{}
	}
	verdict := func(r *probepkg.Report) string { return strings.Join(r.Verdict, "\n") }

	// open: strongSwan answers on both ports, through a NAT that keeps ports.
	r := run(lab.ProfileOpen)
	for _, port := range []uint16{500, 4500} {
		if u := udp(r, port); u.Answered != u.Sent || u.Sent != 3 || u.Answer != "NO_PROPOSAL_CHOSEN" {
			t.Errorf("open: UDP %d: %+v, want 3 of 3 answered NO_PROPOSAL_CHOSEN", port, u)
		}
	}
	if len(r.TCP) != 1 || !r.TCP[0].Iketcp || len(r.TCP[0].Observed) != 2 {
		t.Fatalf("open: TCP %+v, want the iketcp server's two observations", r.TCP)
	}
	if r.NAT != probepkg.NATPortPreserving || r.PublicAddr.String() != lab.CarrierHub {
		t.Errorf("open: NAT %s at %v, want port-preserving at %s", r.NAT, r.PublicAddr, lab.CarrierHub)
	}
	if !strings.HasPrefix(verdict(r), "UDP 4500 works here") {
		t.Errorf("open: verdict\n%s", verdict(r))
	}

	// block-udp: the carrier drops the probes; TCP is the way.
	dropped, err := l.UDPDropped(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r = run(lab.ProfileBlockUDP)
	for _, port := range []uint16{500, 4500} {
		if u := udp(r, port); u.Answered != 0 {
			t.Errorf("block-udp: UDP %d answered: %+v", port, u)
		}
	}
	if after, _ := l.UDPDropped(ctx); after < dropped+6 {
		t.Errorf("block-udp: the carrier dropped %d UDP packets, want the 6 probes", after-dropped)
	}
	want := "UDP 4500 is blocked here (no answer to 3 IKE_SA_INIT probes); use --transport tcp (iketcp client --peer " + lab.HubOuter + ":4500)."
	if r.Verdict[0] != want || !r.Reachable {
		t.Errorf("block-udp: verdict\n%s\nwant first\n%s", verdict(r), want)
	}

	// cgnat: every flow gets another port.
	r = run(lab.ProfileCGNAT)
	if r.NAT != probepkg.NATPortChanging || !strings.Contains(verdict(r), "port-changing NAT") {
		t.Errorf("cgnat: NAT %s, verdict\n%s", r.NAT, verdict(r))
	}
	for _, o := range r.TCP[0].Observed {
		if o.Observed.Addr().String() != lab.CarrierHub || o.Observed.Port() == o.Local.Port() {
			t.Errorf("cgnat: the hub saw %v for %v, want %s and another port", o.Observed, o.Local, lab.CarrierHub)
		}
	}
	if u := udp(r, 4500); u.Answered != u.Sent {
		t.Errorf("cgnat: UDP 4500 %+v", u)
	}

	// The probes' IKE_SA_INIT offered nothing the hub could accept: it
	// answered each and kept no IKE SA, half-open or other.
	if sas, err := tun.Hub.ListSAs(ctx); err != nil || len(sas) != 0 {
		t.Errorf("the hub's charon holds IKE SAs after the probes: %v %v", sas, err)
	}
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range st.Counters {
		if c.Name == "observes_answered" && c.Value < 6 {
			t.Errorf("the server answered %d observes, want at least 6", c.Value)
		}
	}
}
