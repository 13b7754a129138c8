package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/integration/perf"
	"github.com/iketcp/iketcp/nat/fakenet"
	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/fakelink"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// The encapsulation benchmarks run iketcp's relays in this process (so
// that they can be profiled with -cpuprofile), with
// only their network-facing sockets and devices in the lab's namespaces:
// a "daemon" socket sends to the client (both on this host's loopback),
// the client reaches the server across the carrier, and the server hands
// the datagrams to a "backend" socket (loopback again). The baseline,
// udp-direct, sends the same datagrams from the site to the hub across
// the same carrier with no relay at all.

const (
	floodSPI = 0xc9
	probeSPI = 0xbe
	// bottleneck is the carrier's rate toward the hub in the loaded
	// benchmark, and bottleneckQueue how much delay its queue may hold.
	bottleneck      = 20_000_000
	bottleneckQueue = 30 * time.Millisecond
)

var encaps = []string{"udp-direct", "rfc9329", "fake-tcp"}

// encapPath is one way across the lab: tx is the sending daemon's socket,
// rx the receiving one's. Datagrams written to rx's sender come back to
// tx the same way.
type encapPath struct {
	tx, rx *net.UDPConn
}

// newEncapPath builds the lab (with the carrier limited to rateBits if
// not zero) and a path across it of kind encap.
func newEncapPath(b *testing.B, encap string, rateBits int) encapPath {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	l := lab.NewForTest(b, lab.Options{Logf: func(string, ...any) {}})
	if rateBits > 0 {
		if err := l.LimitRate(ctx, rateBits, bottleneckQueue); err != nil {
			b.Fatal(err)
		}
	}
	if encap == "udp-direct" {
		pc, err := l.Hub.ListenPacket("udp", net.JoinHostPort(lab.HubOuter, "6000"))
		if err != nil {
			b.Fatal(err)
		}
		c, err := l.Site.Dial(ctx, "udp", net.JoinHostPort(lab.HubOuter, "6000"))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { pc.Close(); c.Close() })
		return bigBuffers(encapPath{tx: c.(*net.UDPConn), rx: pc.(*net.UDPConn)})
	}

	rx, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rx.Close() })
	quiet := slog.New(slog.DiscardHandler)
	srv, err := server.New(server.Config{Backend: rx.LocalAddr().(*net.UDPAddr).AddrPort(), Logger: quiet})
	if err != nil {
		b.Fatal(err)
	}
	ccfg := client.Config{Peer: net.JoinHostPort(lab.HubOuter, "4500"), Logger: quiet}
	var serve func(context.Context) error
	switch encap {
	case "rfc9329":
		ln, err := l.Hub.Listen("tcp", net.JoinHostPort(lab.HubOuter, "4500"))
		if err != nil {
			b.Fatal(err)
		}
		links := streamlink.NewListener(ln, streamlink.Config{Counters: srv.Counters(), Logger: quiet})
		serve = func(ctx context.Context) error { return srv.Serve(ctx, links) }
		d := streamlink.NewDialer(streamlink.Config{Logger: quiet})
		d.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			return l.Site.Dial(ctx, network, addr)
		}
		ccfg.Dialer = d
	case "fake-tcp", "fake-tcp-no-offload":
		noOffload := encap == "fake-tcp-no-offload"
		hubStack := fakeTCPStack(b, l.Hub, fakenet.Server, "100.64.251.0/30", 4500, noOffload)
		ln, err := hubStack.Listen(4500)
		if err != nil {
			b.Fatal(err)
		}
		links := fakelink.NewListener(ln, lab.HubOuter+":4500")
		serve = func(ctx context.Context) error { return srv.Serve(ctx, links) }
		ccfg.Dialer = &fakelink.Dialer{Stack: fakeTCPStack(b, l.Site, fakenet.Client, "100.64.250.0/30", 0, noOffload)}
	default:
		b.Fatalf("unknown encapsulation %q", encap)
	}
	cl, err := client.New(ccfg)
	if err != nil {
		b.Fatal(err)
	}
	pc, err := client.ListenUDP("127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); serve(ctx) }()
	go func() { defer wg.Done(); cl.Serve(ctx, pc) }()
	b.Cleanup(func() { cancel(); wg.Wait() })
	tx, err := net.DialUDP("udp", nil, pc.LocalAddr().(*net.UDPAddr))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tx.Close() })
	// An IKE_SA_INIT first, which the backend answers as a daemon would:
	// it makes the server's session and confirms it, and the connection
	// that carries it then teaches it the ESP SPIs.
	ike := make([]byte, framing.MarkerSize+framing.IKEHeaderSize)
	ike[4+7], ike[4+17], ike[4+18], ike[4+19], ike[4+27] = 1, 0x20, byte(framing.IKESAInit), framing.FlagInitiator, framing.IKEHeaderSize
	buf := make([]byte, 2048)
	for try := 0; ; try++ {
		if try == 50 {
			b.Fatalf("%s: the path never carried its first datagram", encap)
		}
		tx.Write(ike)
		rx.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, from, err := rx.ReadFromUDPAddrPort(buf); err == nil {
			resp := bytes.Clone(ike)
			resp[4+15], resp[4+19] = 1, framing.FlagResponse
			rx.WriteToUDPAddrPort(resp, from)
			tx.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := tx.Read(buf); err != nil {
				b.Fatalf("%s: the IKE_SA_INIT response did not come back: %v", encap, err)
			}
			break
		}
	}
	rx.SetReadDeadline(time.Time{})
	tx.SetReadDeadline(time.Time{})
	return bigBuffers(encapPath{tx: tx, rx: rx})
}

// bigBuffers gives the harness's own sockets the buffers the relay gives
// its sockets, so that what a benchmark counts as lost is lost on the
// path, not in the harness.
func bigBuffers(p encapPath) encapPath {
	for _, c := range []*net.UDPConn{p.tx, p.rx} {
		c.SetReadBuffer(4 << 20)
		c.SetWriteBuffer(4 << 20)
	}
	return p
}

// fakeTCPStack sets up fake-TCP's device and rules in ns and a stack on
// them, for the benchmark's life; with noOffload, without the TUN
// device's offloads (one segment per system call).
func fakeTCPStack(b *testing.B, ns *lab.Namespace, role fakenet.Role, net4 string, port uint16, noOffload bool) *faketcp.Stack {
	b.Helper()
	var fnet *fakenet.Net
	err := ns.Do(func() (err error) {
		fnet, err = fakenet.Setup(fakenet.Config{Role: role, Net4: netip.MustParsePrefix(net4), Port: port,
			NoOffload: noOffload, Logger: slog.New(slog.DiscardHandler)})
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	stack, err := faketcp.NewStack(fnet, faketcp.Config{Local: fnet.Endpoint4(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		fnet.Close()
		b.Fatal(err)
	}
	if stack.Offload() == noOffload {
		stack.Close()
		fnet.Close()
		b.Fatalf("fake-TCP offloads: asked %v, got %v (%v)", !noOffload, stack.Offload(), fnet.Offload())
	}
	b.Cleanup(func() {
		stack.Close()
		fnet.Close()
		<-stack.Done()
	})
	return stack
}

// BenchmarkEncapThroughput moves 1400-byte ESP packets across the carrier
// as fast as they go: udp-direct is the baseline, rfc9329 and fake-tcp
// the relays. Every variant uses the same endpoints, those of the
// process-level harness (integration/perf): sendmmsg with UDP GSO at the
// sender, recvmmsg with UDP GRO at the receiver. Across the veths TCP
// travels in 64 KiB segments (TSO/GRO); with GSO the direct UDP baseline
// does too, so it is the best this path does rather than one datagram per
// skb (which once made it slower than the relay it is the baseline of).
// `iketcp-lab bench` measures the same with iketcp as whole processes.
// fake-tcp-no-offload is fake-TCP with one segment per system call, as
// where the kernel refuses the TUN device's offloads.
func BenchmarkEncapThroughput(b *testing.B) {
	for _, encap := range append(encaps, "fake-tcp-no-offload") {
		b.Run(encap, func(b *testing.B) {
			p := newEncapPath(b, encap, 0)
			measureFlow(b, p.tx, p.rx, perf.IOMode{Batch: 64, GSO: true, GRO: true})
		})
	}
}

// measureFlow sends b.N 1400-byte datagrams on tx and receives them on
// rx with the harness's blaster and sink in mode, with at most window
// datagrams in flight so that the kernel and the client's flow queue do
// not drop them for want of room. Datagrams still missing when nothing has
// arrived for 200 ms count as lost (reported per op), and the flow goes
// on, so a drop cannot hang it. Besides datagrams/s and lost/op it
// reports this process's CPU time per datagram (cpu-us/op) and per second
// (cores): the relays', the blaster's and the sink's, with the kernel's
// work on their system calls; a relay path's figure less udp-direct's is
// about what the relays add.
func measureFlow(b *testing.B, tx, rx *net.UDPConn, mode perf.IOMode) {
	const window = 256 // no more than a client flow queue holds by default
	sink, err := perf.NewSinkOn(rx, perf.SinkConfig{Mode: mode})
	if err != nil {
		b.Fatal(err)
	}
	defer sink.Close()
	bl, err := perf.NewBlasterOn(tx, perf.BlasterConfig{Dst: tx.RemoteAddr().(*net.UDPAddr).AddrPort(), Mode: mode, SPI: floodSPI})
	if err != nil {
		b.Fatal(err)
	}
	base := sink.Datagrams()
	received := func() int { return int(sink.Datagrams() - base) }
	lost := 0
	b.SetBytes(perf.DatagramSize)
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := processCPU()
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	timer := func(d time.Duration) <-chan time.Time { t.Reset(d); return t.C }
	stalls := 0
	for sent := 0; sent < b.N; {
		got := received() + lost
		if room := window - (sent - got); room > 0 {
			n := min(room, b.N-sent, bl.Capacity())
			if err := bl.Send(n); err != nil {
				b.Fatal(err)
			}
			sent += n
			continue
		}
		// The window is full: wait for the receiver, and give up on
		// what has not come after 200 ms without progress.
		select {
		case <-sink.Progress():
		case <-timer(200 * time.Millisecond):
			if received()+lost == got {
				if stalls++; stalls > 50 {
					b.Fatalf("the receiver stalled 50 times: %d of %d sent, %d received", sent, b.N, received())
				}
				lost += sent - got
			}
		}
	}
	for deadline := time.Now().Add(2 * time.Second); received()+lost < b.N && time.Now().Before(deadline); {
		select {
		case <-sink.Progress():
		case <-timer(10 * time.Millisecond):
		}
	}
	lost = max(lost, b.N-received())
	b.StopTimer()
	cpu := processCPU() - cpu0
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "datagrams/s")
	b.ReportMetric(float64(lost)/float64(b.N), "lost/op")
	b.ReportMetric(float64(cpu.Nanoseconds())/1e3/float64(b.N), "cpu-us/op")
	b.ReportMetric(cpu.Seconds()/b.Elapsed().Seconds(), "cores")
}

// processCPU is the CPU time (user and system) this process has used so
// far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkEncapRTT measures the round trip of 1400-byte ESP packets on
// an idle path, one at a time: what each encapsulation adds to the
// latency of direct UDP. ns/op is the mean round trip; rtt-p50-ms the
// median.
func BenchmarkEncapRTT(b *testing.B) {
	for _, encap := range encaps {
		b.Run(encap, func(b *testing.B) {
			p := newEncapPath(b, encap, 0)
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() { defer wg.Done(); echoProbes(p.rx, stop) }()
			defer func() { close(stop); wg.Wait() }()
			pkt := relaytest.ESP(probeSPI, 0, 1400)
			buf := make([]byte, 2048)
			rtts := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				binary.BigEndian.PutUint32(pkt[4:], uint32(i))
				start := time.Now()
				p.tx.Write(pkt)
				p.tx.SetReadDeadline(start.Add(time.Second))
				for {
					n, err := p.tx.Read(buf)
					if err != nil {
						b.Fatalf("%s: no echo for packet %d: %v", encap, i, err)
					}
					if n == len(pkt) && binary.BigEndian.Uint32(buf[4:]) == uint32(i) {
						break
					}
				}
				rtts = append(rtts, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(rtts)
			b.ReportMetric(float64(rtts[len(rtts)/2])/float64(time.Millisecond), "rtt-p50-ms")
		})
	}
}

// BenchmarkEncapLoadedRTT measures the round trip of small probes while a
// flood in the same flow saturates a bottleneck (the carrier passes 20
// Mbit/s and queues at most 30 ms). Over TCP the probes wait behind
// everything the flood has queued in the stream; over fake-TCP, as over
// UDP, the bottleneck drops what does not fit and nothing waits. Each op
// is a window of probesPerOp probes, one every 20 ms whether or not the
// one before came back; reported over all windows: the median and 99th
// percentile round trip, and probe loss.
func BenchmarkEncapLoadedRTT(b *testing.B) {
	const probesPerOp = 100
	for _, encap := range encaps {
		b.Run(encap, func(b *testing.B) {
			p := newEncapPath(b, encap, bottleneck)
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(2)
			go func() { defer wg.Done(); flood(p.tx, stop) }()
			go func() { defer wg.Done(); echoProbes(p.rx, stop) }()
			defer func() { close(stop); wg.Wait() }()
			time.Sleep(1500 * time.Millisecond) // let the queues fill
			b.ResetTimer()

			var rtts []time.Duration
			lost := 0
			for range b.N {
				r, l, err := probe(p.tx, probesPerOp, 20*time.Millisecond)
				if err != nil {
					b.Fatal(err)
				}
				rtts, lost = append(rtts, r...), lost+l
			}
			b.ReportMetric(float64(lost)/float64(b.N*probesPerOp), "probe-loss")
			if len(rtts) == 0 {
				b.Logf("%s: all %d probes were lost at the bottleneck", encap, b.N*probesPerOp)
				return
			}
			slices.Sort(rtts)
			ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
			b.ReportMetric(ms(rtts[len(rtts)/2]), "rtt-p50-ms")
			b.ReportMetric(ms(rtts[min(len(rtts)*99/100, len(rtts)-1)]), "rtt-p99-ms")
		})
	}
}

// flood sends 1400-byte ESP packets on tx at twice the bottleneck's rate
// until stop.
func flood(tx *net.UDPConn, stop <-chan struct{}) {
	pkt := relaytest.ESP(floodSPI, 1, 1400)
	const perTick = 2 * bottleneck / 8 / 1400 / 1000 // packets a millisecond
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			for range max(perTick, 1) {
				tx.Write(pkt)
			}
		}
	}
}

// echoProbes sends every probe rx receives back to its sender, and drops
// the flood, until stop.
func echoProbes(rx *net.UDPConn, stop <-chan struct{}) {
	buf := make([]byte, 2048)
	for {
		select {
		case <-stop:
			return
		default:
		}
		rx.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		n, from, err := rx.ReadFromUDPAddrPort(buf)
		if err != nil || n < 16 || binary.BigEndian.Uint32(buf) != probeSPI {
			continue
		}
		rx.WriteToUDPAddrPort(buf[:n], from)
	}
}

// probe sends n probes on tx every interval, each carrying its number and
// send time, and collects the round trips of those that come back within
// 3 s of the last one sent.
func probe(tx *net.UDPConn, n int, interval time.Duration) (rtts []time.Duration, lost int, err error) {
	sent := make([]time.Time, n)
	got := make([]bool, n)
	deadline := time.Now().Add(time.Duration(n)*interval + 3*time.Second)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for received := 0; received < n; {
			tx.SetReadDeadline(deadline)
			m, err := tx.Read(buf)
			if err != nil {
				return
			}
			if m < 16 || binary.BigEndian.Uint32(buf) != probeSPI {
				continue
			}
			i := int(binary.BigEndian.Uint32(buf[4:]))
			if i >= n || got[i] {
				continue
			}
			got[i] = true
			rtts = append(rtts, time.Since(time.Unix(0, int64(binary.BigEndian.Uint64(buf[8:])))))
			received++
		}
	}()
	pkt := relaytest.ESP(probeSPI, 0, 100)
	t := time.NewTicker(interval)
	defer t.Stop()
	for i := range n {
		binary.BigEndian.PutUint32(pkt[4:], uint32(i))
		sent[i] = time.Now()
		binary.BigEndian.PutUint64(pkt[8:], uint64(sent[i].UnixNano()))
		if _, err := tx.Write(pkt); err != nil && !errors.Is(err, net.ErrClosed) {
			return nil, 0, fmt.Errorf("probe %d: %w", i, err)
		}
		<-t.C
	}
	<-done
	for _, ok := range got {
		if !ok {
			lost++
		}
	}
	return rtts, lost, nil
}
