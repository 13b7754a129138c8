package lab

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/iketcp/iketcp/integration/antireplay"
)

// A Profile is a kind of carrier a user can rehearse against (`iketcp-lab
// up --profile NAME`) and tests set up with [Lab.SetProfile]. Every
// profile masquerades the site behind the carrier's address.
type Profile struct {
	Name string
	// About says what the carrier does, for people.
	About string
	// Advice is how iketcp gets through, for people.
	Advice string

	apply func(ctx context.Context, l *Lab) error
}

// Profile names.
const (
	ProfileOpen      = "open"
	ProfileBlockUDP  = "block-udp"
	ProfileCGNAT     = "cgnat"
	ProfileStrictTCP = "strict-tcp"
	ProfileSlow      = "slow"
)

// SlowRate and SlowLatency are the slow profile's bottleneck: a token
// bucket from the site toward the hub.
const (
	SlowRate    = 2_000_000 // bits per second
	SlowLatency = 100 * time.Millisecond
)

// Profiles are the carrier profiles, in the order a user meets them.
var Profiles = []Profile{
	{
		Name:   ProfileOpen,
		About:  "a plain NAT: UDP and TCP pass, source ports kept (port-preserving)",
		Advice: "UDP works; iketcp is a reserve: --transport auto",
		apply:  func(ctx context.Context, l *Lab) error { return nil },
	},
	{
		Name:   ProfileBlockUDP,
		About:  "NAT that drops every UDP packet, as some mobile carriers and hotel networks do",
		Advice: "--transport tcp (or auto, which falls back)",
		apply:  func(ctx context.Context, l *Lab) error { return l.BlockUDP(ctx) },
	},
	{
		Name:   ProfileCGNAT,
		About:  "carrier-grade NAT that gives every flow a random source port (port-changing)",
		Advice: "UDP works while keepalives hold each mapping; --transport auto keeps TCP in reserve",
		apply:  func(ctx context.Context, l *Lab) error { return l.PortChangingNAT(ctx) },
	},
	{
		Name:   ProfileStrictTCP,
		About:  "drops UDP, and an anti-replay middlebox drops TCP segments whose sequence numbers repeat or go backwards",
		Advice: "--encap fake-tcp (live sequence numbers) or RFC 9329 over TCP; FortiOS's fortinet-esp fails here",
		apply: func(ctx context.Context, l *Lab) error {
			if err := l.BlockUDP(ctx); err != nil {
				return err
			}
			_, err := l.StartStrictMiddlebox(ctx, antireplay.Config{Window: 64 << 10})
			return err
		},
	},
	{
		Name:   ProfileSlow,
		About:  fmt.Sprintf("a %d Mbit/s bottleneck toward the hub with a %v queue (tbf); UDP passes", SlowRate/1_000_000, SlowLatency),
		Advice: "anything works, slowly: watch queue_late and queue_full in iketcp status",
		apply:  func(ctx context.Context, l *Lab) error { return l.LimitRate(ctx, SlowRate, SlowLatency) },
	},
}

// ProfileNames lists the profiles' names, comma-separated.
func ProfileNames() string {
	names := make([]string, len(Profiles))
	for i, p := range Profiles {
		names[i] = p.Name
	}
	return strings.Join(names, ", ")
}

// FindProfile returns the profile of that name.
func FindProfile(name string) (Profile, error) {
	for _, p := range Profiles {
		if p.Name == name {
			return p, nil
		}
	}
	return Profile{}, fmt.Errorf("no carrier profile %q: want one of %s", name, ProfileNames())
}

// SetProfile makes the carrier behave as the named profile, from the lab's
// plain state: it lets UDP through, restores port-preserving NAT and
// removes any rate limit first, so profiles can follow each other in one
// lab (all but strict-tcp, whose middlebox stays until Close). Flows the
// carrier already tracks keep their NAT mappings.
func (l *Lab) SetProfile(ctx context.Context, name string) error {
	p, err := FindProfile(name)
	if err != nil {
		return err
	}
	if l.Carrier == nil {
		return errNoCarrier
	}
	if err := l.AllowUDP(ctx); err != nil {
		return err
	}
	if err := l.setMasquerade(ctx, ""); err != nil {
		return err
	}
	// No qdisc of ours yet is fine: "del" then fails, and nothing is left.
	l.Carrier.Run(ctx, "tc", "qdisc", "del", "dev", CarrierHubIface, "root")
	if err := p.apply(ctx, l); err != nil {
		return fmt.Errorf("profile %s: %w", name, err)
	}
	l.logf("lab %s: carrier profile %s: %s", l.Name, p.Name, p.About)
	return nil
}

// PortChangingNAT makes the carrier's NAT pick a random source port for
// every new flow (masquerade fully-random), as carrier-grade NATs do: a
// peer sees the site at other ports than it sent from, and each flow at
// its own. Flows it already tracks keep their mappings.
func (l *Lab) PortChangingNAT(ctx context.Context) error {
	return l.setMasquerade(ctx, "fully-random")
}

// setMasquerade replaces the carrier's masquerade rule, with flags.
func (l *Lab) setMasquerade(ctx context.Context, flags string) error {
	if l.Carrier == nil {
		return errNoCarrier
	}
	rule := fmt.Sprintf("flush chain inet %s postrouting\nadd rule inet %s postrouting oifname %q masquerade %s\n",
		CarrierTable, CarrierTable, CarrierHubIface, flags)
	path := l.filePath("carrier-masquerade", ".nft")
	if err := os.WriteFile(path, []byte(rule), 0o644); err != nil {
		return err
	}
	if _, err := l.Carrier.Run(ctx, l.nftPath, "-f", path); err != nil {
		return fmt.Errorf("carrier masquerade %q: %w", flags, err)
	}
	return nil
}
