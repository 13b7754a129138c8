package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/aggregate"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/reorder"
)

// memberSpec is one --member: NAME=LOCAL_ADDR->HUB:PORT.
type memberSpec struct {
	name  string
	local netip.Addr
	hub   string
}

// parseMember parses NAME=LOCAL_ADDR->HUB:PORT.
func parseMember(v string) (memberSpec, error) {
	name, rest, ok := strings.Cut(v, "=")
	local, hub, ok2 := strings.Cut(rest, "->")
	if !ok || !ok2 || name == "" {
		return memberSpec{}, fmt.Errorf("--member %q: want NAME=LOCAL_ADDR->HUB:PORT, e.g. wan1=100.64.0.2->203.0.113.2:4500", v)
	}
	addr, err := netip.ParseAddr(local)
	if err != nil {
		return memberSpec{}, fmt.Errorf("--member %s: local address %q: %w (the address this member leaves by)", name, local, err)
	}
	if _, _, err := net.SplitHostPort(hub); err != nil {
		return memberSpec{}, fmt.Errorf("--member %s: hub %q: %w (want the iketcp server's host:port)", name, hub, err)
	}
	return memberSpec{name: name, local: addr.Unmap(), hub: hub}, nil
}

// parseLocationID parses a dotted quad, as FortiOS's location-id.
func parseLocationID(v string) ([4]byte, error) {
	a, err := netip.ParseAddr(v)
	if err != nil || !a.Is4() {
		return [4]byte{}, fmt.Errorf("--location-id %q: want a dotted quad, as FortiOS's location-id (e.g. 1.1.1.1)", v)
	}
	return a.As4(), nil
}

// aggregateConfig fills cfg's aggregate from --member, --location-id,
// --aggregate and --weight; newDialer makes each member's dialer, leaving
// by its local address.
func aggregateConfig(c *cli.Context, cfg *client.Config, newDialer func(local netip.Addr) (relay.Dialer, error)) error {
	specs := c.StringSlice("member")
	if len(specs) == 0 {
		for _, f := range []string{"location-id", "aggregate", "weight"} {
			if c.IsSet(f) {
				return fmt.Errorf("--%s goes with --member", f)
			}
		}
		return nil
	}
	if c.IsSet("peer") {
		return errors.New("--peer and --member exclude each other: with members, each --member names its hub")
	}
	if c.Bool("tun") {
		return errors.New("--member works in explicit mode only, not with --tun")
	}
	if !c.IsSet("location-id") {
		return errors.New("--member needs --location-id (a dotted quad, as FortiOS's location-id)")
	}
	loc, err := parseLocationID(c.String("location-id"))
	if err != nil {
		return err
	}
	alg, err := aggregate.ParseAlgorithm(c.String("aggregate"))
	if err != nil {
		return fmt.Errorf("--aggregate %q: %w", c.String("aggregate"), err)
	}
	weights := map[string]int{}
	for _, w := range c.StringSlice("weight") {
		name, n, ok := strings.Cut(w, "=")
		v, err := strconv.Atoi(n)
		if !ok || err != nil || v < 1 || v > 255 {
			return fmt.Errorf("--weight %q: want NAME=N, N from 1 to 255", w)
		}
		weights[name] = v
	}
	seen := map[string]bool{}
	for _, s := range specs {
		m, err := parseMember(s)
		if err != nil {
			return err
		}
		if seen[m.name] {
			return fmt.Errorf("--member %s: named twice", m.name)
		}
		seen[m.name] = true
		d, err := newDialer(m.local)
		if err != nil {
			return err
		}
		cfg.Members = append(cfg.Members, client.Member{Name: m.name, Peer: m.hub, Dialer: d, Weight: max(weights[m.name], 1)})
	}
	for name := range weights {
		if !seen[name] {
			return fmt.Errorf("--weight %s: no --member of that name", name)
		}
	}
	if len(weights) > 0 && alg != aggregate.Weighted {
		return fmt.Errorf("--weight goes with --aggregate weighted, not %s", alg)
	}
	cfg.LocationID, cfg.Aggregate = loc, alg
	cfg.Peer = cfg.Members[0].Peer
	return nil
}

// reorderFlag is --reorder-max, on both roles.
func reorderFlag() cli.Flag {
	return &cli.DurationFlag{Name: "reorder-max", Value: reorder.DefaultMax, Usage: "aggregates: the longest ESP from the members waits for a gap before it to fill, on its way to the IKE daemon (the hold follows the members' delay difference up to this); 0 turns the reorder buffer off", EnvVars: envVar("reorder-max")}
}

// reorderMax is --reorder-max as the roles' configs take it.
func reorderMax(c *cli.Context) time.Duration {
	if d := c.Duration("reorder-max"); d > 0 {
		return d
	}
	return -1
}

// localDial dials from local: a member's own uplink address.
func localDial(local netip.Addr) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := net.Dialer{KeepAliveConfig: relay.TCPKeepAlive, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(local, 0))}
		return d.DialContext(ctx, network, addr)
	}
}

// logAggregate says how the client's aggregate is made.
func logAggregate(log *slog.Logger, cfg *client.Config) {
	if len(cfg.Members) == 0 {
		return
	}
	var names []string
	for _, m := range cfg.Members {
		names = append(names, fmt.Sprintf("%s->%s(w%d)", m.Name, m.Peer, m.Weight))
	}
	log.Info("aggregate", "location_id", netip.AddrFrom4(cfg.LocationID).String(), "algorithm", cfg.Aggregate.String(),
		"members", strings.Join(names, " "))
}
