package lab

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestProfiles moves one lab's carrier through every profile and reads
// back what each left in the carrier: the UDP block, the masquerade's
// flags, the token bucket, the middlebox; each profile undoes the one
// before, but the middlebox, which stays until Close.
func TestProfiles(t *testing.T) {
	t.Parallel()
	l := NewForTest(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	carrier := func(args ...string) string {
		t.Helper()
		out, err := l.Carrier.Run(ctx, args[0], args[1:]...)
		if err != nil {
			t.Fatal(err)
		}
		return string(out)
	}
	state := func() (blocked, random, tbf, queued bool) {
		set := carrier(l.nftPath, "list", "set", "inet", CarrierTable, "blocked_l4")
		nat := carrier(l.nftPath, "list", "chain", "inet", CarrierTable, "postrouting")
		if !strings.Contains(nat, "masquerade") {
			t.Fatalf("the carrier does not masquerade:\n%s", nat)
		}
		qdisc := carrier("tc", "qdisc", "show", "dev", CarrierHubIface)
		ipt := carrier(toolPath("iptables-legacy"), "-S", "FORWARD")
		return strings.Contains(set, "udp"), strings.Contains(nat, "fully-random"), strings.Contains(qdisc, "tbf"), strings.Contains(ipt, "NFQUEUE")
	}
	for _, tc := range []struct {
		profile                      string
		blocked, random, tbf, queued bool
	}{
		{ProfileSlow, false, false, true, false},
		{ProfileCGNAT, false, true, false, false},
		{ProfileBlockUDP, true, false, false, false},
		{ProfileOpen, false, false, false, false},
		{ProfileStrictTCP, true, false, false, true},
	} {
		if err := l.SetProfile(ctx, tc.profile); err != nil {
			t.Fatal(err)
		}
		blocked, random, tbf, queued := state()
		if blocked != tc.blocked || random != tc.random || tbf != tc.tbf || queued != tc.queued {
			t.Errorf("%s: UDP blocked %v, fully-random %v, tbf %v, NFQUEUE %v; want %v %v %v %v",
				tc.profile, blocked, random, tbf, queued, tc.blocked, tc.random, tc.tbf, tc.queued)
		}
	}
	if _, err := FindProfile("lossy"); err == nil || !strings.Contains(err.Error(), ProfileNames()) {
		t.Errorf("an unknown profile: %v", err)
	}
}
