package perf

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// The loaded test: a real strongSwan tunnel through the lab's carrier,
// which passes bottleneckRate toward the hub and queues at most
// bottleneckQueue; a UDP flood at floodRate through the tunnel, and pings
// beside it.
const (
	bottleneckRate  = 20_000_000
	bottleneckQueue = 30 * time.Millisecond
	floodRate       = 40_000_000 // bits/s of inner IP packets
	floodPayload    = 1200       // UDP payload: the ESP packet stays within the tunnel's MTU
	floodPort       = 7000
	floodWarmup     = 1500 * time.Millisecond
	pingInterval    = 50 * time.Millisecond
)

// The loaded test's variants.
const (
	LoadedPlainUDP = "plain UDP (strongSwan alone)"
	LoadedRFC9329  = PathRFC9329
	LoadedFakeTCP  = PathFakeTCP
)

// Loaded is the result of one variant of the loaded test.
type Loaded struct {
	Path string
	// Pings sent, and the round trips of those answered.
	Pings int
	RTTs  RTTs
	// FloodOffered and FloodDelivered are the flood's rates in bits/s of
	// inner IP packets, at the site's sender and the hub's sink.
	FloodOffered, FloodDelivered float64
}

// Loss is the share of pings not answered.
func (r Loaded) Loss() float64 {
	if r.Pings == 0 {
		return 0
	}
	return 1 - float64(len(r.RTTs.Sorted))/float64(r.Pings)
}

// runLoaded builds a lab, brings the tunnel up as variant says, floods it
// and pings through it.
func runLoaded(ctx context.Context, opts lab.Options, bin, variant string, pings int) (res Loaded, err error) {
	res.Path = variant
	setup, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	l, err := lab.New(setup, opts)
	if err != nil {
		return res, err
	}
	defer func() {
		if err != nil {
			l.DumpLogs(opts.Logf, 20)
		}
		if cerr := l.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	switch variant {
	case LoadedPlainUDP:
		hub := lab.IKEConfig{
			Name: lab.TunnelName, RemoteAddrs: "%any",
			LocalID: "hub.iketcp.test", RemoteID: "site.iketcp.test", PSK: lab.TunnelPSK,
			LocalTS: lab.HubInnerNet, RemoteTS: lab.SiteInnerNet,
		}
		site := lab.IKEConfig{
			Name: lab.TunnelName, RemoteAddrs: lab.HubOuter,
			LocalID: "site.iketcp.test", RemoteID: "hub.iketcp.test", PSK: lab.TunnelPSK,
			LocalTS: lab.SiteInnerNet, RemoteTS: lab.HubInnerNet,
		}
		if _, err := l.StartCharon(setup, l.Hub, hub); err != nil {
			return res, err
		}
		sc, err := l.StartCharon(setup, l.Site, site)
		if err != nil {
			return res, err
		}
		if err := sc.Initiate(setup); err != nil {
			return res, err
		}
		if _, err := sc.WaitEstablished(setup); err != nil {
			return res, err
		}
	case LoadedRFC9329, LoadedFakeTCP:
		if err := l.BlockUDP(setup); err != nil {
			return res, err
		}
		topts := lab.TunnelOptions{Binary: bin}
		if variant == LoadedFakeTCP {
			topts.ServerArgs = []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.251.0/30"}
			topts.ClientArgs = []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.250.0/30"}
		}
		tun, err := l.StartTunnel(setup, topts)
		if err != nil {
			return res, err
		}
		if _, err := tun.Initiate(setup); err != nil {
			return res, err
		}
	default:
		return res, fmt.Errorf("unknown loaded variant %q", variant)
	}
	// The tunnel works before the bottleneck and the flood.
	if n, err := l.Ping(setup, l.Site, lab.SiteInner, lab.HubInner, 3, 100*time.Millisecond); err != nil || n == 0 {
		return res, fmt.Errorf("%s: no ping crossed the idle tunnel (%d, %v)", variant, n, err)
	}
	if err := l.LimitRate(setup, bottleneckRate, bottleneckQueue); err != nil {
		return res, err
	}
	sink, err := NewSink(l.Hub, SinkConfig{Local: netip.AddrPortFrom(netip.MustParseAddr(lab.HubInner), floodPort), Mode: IOMode{Batch: 64}})
	if err != nil {
		return res, err
	}
	defer sink.Close()
	bl, err := NewBlaster(l.Site, BlasterConfig{
		Local: netip.AddrPortFrom(netip.MustParseAddr(lab.SiteInner), 0),
		Dst:   netip.AddrPortFrom(netip.MustParseAddr(lab.HubInner), floodPort),
		Mode:  IOMode{Batch: 16}, Size: floodPayload,
	})
	if err != nil {
		return res, err
	}
	defer bl.Close()
	ipBits := float64((floodPayload + 28) * 8)
	floodFor := floodWarmup + time.Duration(pings)*pingInterval + 2*time.Second
	type result struct {
		sent int
		took time.Duration
		err  error
	}
	done := make(chan result, 1)
	fctx, stopFlood := context.WithCancel(ctx)
	defer stopFlood()
	go func() {
		sent, took, err := bl.Blast(fctx, floodRate/ipBits, floodFor)
		done <- result{sent, took, err}
	}()
	select {
	case <-time.After(floodWarmup):
	case r := <-done:
		return res, fmt.Errorf("%s: the flood stopped: %v", variant, r.err)
	}
	c0, t0 := sink.Datagrams(), time.Now()
	res.Pings = pings
	res.RTTs, err = pingRTTs(ctx, l, pings, pingInterval)
	c1, t1 := sink.Datagrams(), time.Now()
	stopFlood()
	r := <-done
	if err != nil {
		return res, err
	}
	if r.err != nil {
		return res, r.err
	}
	res.FloodOffered = float64(r.sent) * ipBits / r.took.Seconds()
	res.FloodDelivered = float64(c1-c0) * ipBits / t1.Sub(t0).Seconds()
	return res, nil
}

var pingReply = regexp.MustCompile(`icmp_seq=(\d+) .*time=([0-9.]+) ms`)

// pingRTTs pings the hub's inner address from the site's, count times,
// interval apart, and returns each reply's round trip (duplicates left
// out).
func pingRTTs(ctx context.Context, l *lab.Lab, count int, interval time.Duration) (RTTs, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(count)*interval+30*time.Second)
	defer cancel()
	// ping exits 1 when replies are missing: the lines tell.
	out, _ := l.Site.Command(ctx, "ping", "-n", "-c", strconv.Itoa(count),
		"-i", strconv.FormatFloat(interval.Seconds(), 'f', -1, 64), "-W", "2",
		"-I", lab.SiteInner, lab.HubInner).CombinedOutput()
	if ctx.Err() != nil {
		return RTTs{}, fmt.Errorf("ping: %w", ctx.Err())
	}
	seen := map[string]bool{}
	var r RTTs
	for _, m := range pingReply.FindAllSubmatch(out, -1) {
		if seen[string(m[1])] {
			continue
		}
		seen[string(m[1])] = true
		ms, err := strconv.ParseFloat(string(m[2]), 64)
		if err != nil {
			return r, fmt.Errorf("ping output %q: %w", m[0], err)
		}
		r.Sorted = append(r.Sorted, time.Duration(ms*float64(time.Millisecond)))
	}
	if len(seen) == 0 && !pingSummary.Match(out) {
		return r, fmt.Errorf("ping printed no summary: %s", tailString(string(out), 500))
	}
	sortDurations(r.Sorted)
	r.Lost = count - len(r.Sorted)
	return r, nil
}

var pingSummary = regexp.MustCompile(`\d+ packets transmitted`)
