package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/antireplay"
	"github.com/iketcp/iketcp/integration/lab"
)

// Each end's fake-TCP device gets a /30 of the lab's 100.64.0.0/10 space.
var (
	siteFakeTCPArgs = []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.250.0/30"}
	hubFakeTCPArgs  = []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.251.0/30"}
)

// smallWindow is the strict middlebox's tolerance for reordering: a
// segment may start this many bytes before the highest one seen in its
// direction. Repeats are dropped whatever the window.
const smallWindow = 64 << 10

// startFakeTCPTunnel builds the lab with a carrier that drops UDP, starts
// the strict middlebox if asked and a capture on the carrier's hub side,
// then the tunnel's pieces in fake-TCP mode with seq ("live" or "frozen").
func startFakeTCPTunnel(t *testing.T, ctx context.Context, strict bool, seq string) (*lab.Tunnel, *lab.Middlebox, *lab.Capture) {
	t.Helper()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	var mb *lab.Middlebox
	if strict {
		var err error
		if mb, err = l.StartStrictMiddlebox(ctx, antireplay.Config{Window: smallWindow}); err != nil {
			t.Fatal(err)
		}
	}
	capture, err := l.Carrier.Capture(ctx, lab.CarrierHubIface, "tcp", filepath.Join(l.Dir, "carrier-hub.pcap"))
	if err != nil {
		t.Fatal(err)
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:     iketcpBinary,
		ServerArgs: append(hubFakeTCPArgs, "--fake-tcp-seq", seq),
		ClientArgs: append(siteFakeTCPArgs, "--fake-tcp-seq", seq),
	})
	if err != nil {
		t.Fatal(err)
	}
	return tun, mb, capture
}

// bulkTransfer sends n random bytes from the site's inner address to the
// hub's, through the tunnel, and checks they arrive intact.
func bulkTransfer(t *testing.T, ctx context.Context, l *lab.Lab, n int) time.Duration {
	t.Helper()
	ln, err := l.Hub.Listen("tcp", net.JoinHostPort(lab.HubInner, "5001"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sum := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			sum <- [32]byte{}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Minute))
		h := sha256.New()
		io.Copy(h, c)
		var s [32]byte
		copy(s[:], h.Sum(nil))
		sum <- s
	}()
	data := make([]byte, n)
	rand.Read(data)
	start := time.Now()
	c, err := l.Site.Dial(ctx, "tcp", net.JoinHostPort(lab.HubInner, "5001"))
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(time.Minute))
	if _, err := c.Write(data); err != nil {
		t.Fatalf("bulk transfer through the tunnel: %v", err)
	}
	c.Close()
	got := <-sum
	took := time.Since(start)
	if want := sha256.Sum256(data); !bytes.Equal(got[:], want[:]) {
		t.Fatalf("bulk transfer of %d bytes arrived damaged or incomplete", n)
	}
	return took
}

func noResets(t *testing.T, capture *lab.Capture) {
	t.Helper()
	if err := capture.Stop(); err != nil {
		t.Fatal(err)
	}
	resets, err := lab.CountTCPFlags(capture.Path, lab.TCPFlagRST)
	if err != nil {
		t.Fatal(err)
	}
	if resets != 0 {
		t.Fatalf("the carrier saw %d TCP resets: a kernel answered the fake-TCP segments", resets)
	}
}

// TestFakeTCPThroughStrictMiddlebox: with live sequence numbers, the
// tunnel comes up through a carrier that drops UDP and checks TCP
// sequence numbers strictly; pings and a bulk transfer cross; the
// middlebox drops nothing; no kernel sends a reset.
func TestFakeTCPThroughStrictMiddlebox(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tun, mb, capture := startFakeTCPTunnel(t, ctx, true, "live")
	// Where the carrier receives from the site, a veth hands the capture
	// each super-segment as the client wrote it, uncut.
	fromSite, err := tun.Lab.Carrier.Capture(ctx, lab.CarrierSiteIface, "tcp", filepath.Join(tun.Lab.Dir, "carrier-site.pcap"))
	if err != nil {
		t.Fatal(err)
	}
	sa, took := initiateTimed(t, ctx, tun)
	t.Logf("IKE SA %s established over fake-TCP in %v", sa.InitiatorSPI, took.Round(time.Millisecond))
	if got, err := tun.PingThrough(ctx, 20, 50*time.Millisecond); err != nil || got != 20 {
		t.Fatalf("ping through the tunnel: %d of 20 (%v)", got, err)
	}
	const size = 2 << 20
	bulk := bulkTransfer(t, ctx, tun.Lab, size)
	t.Logf("bulk transfer of %d bytes through the tunnel in %v", size, bulk.Round(time.Millisecond))
	st := mb.Stats()
	t.Logf("strict middlebox: %d segments accepted, drops %v", st.Accepted, st.Map())
	if st.Dropped() != 0 {
		t.Fatalf("the strict middlebox dropped %d live fake-TCP segments: %v", st.Dropped(), st.Map())
	}
	if st.Accepted < 1000 {
		t.Fatalf("the middlebox saw only %d segments: the tunnel did not go through it", st.Accepted)
	}
	// The client sent runs of datagrams as super-segments (TSO); the
	// middlebox, which sees segments, dropped none of their segments.
	if err := fromSite.Stop(); err != nil {
		t.Fatal(err)
	}
	supers, err := lab.CountTCPLonger(fromSite.Path, 1500)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d super-segments crossed from the site to the carrier whole", supers)
	if supers == 0 {
		t.Fatal("no super-segment left the site: the test did not check the middlebox against segmentation offload")
	}
	srv, err := tun.ServerStatus(ctx)
	if err != nil || srv.Mode != "fake-tcp" || len(srv.Sessions) != 1 || srv.Sessions[0].State != "up" {
		t.Fatalf("server status: %+v %v", srv, err)
	}
	noResets(t, capture)
}

// TestFakeTCPPlainCarrier: through a carrier that only masquerades (and
// drops UDP), both live and frozen sequence numbers carry the tunnel.
// Then the carrier turns anti-replay on, as FortiOS says the NAT box must
// not: the frozen stream's ESP segments are dropped, counted, and traffic
// fails, which is the problem fake-TCP's live sequence numbers solve; the
// live stream's are not (a flow adopted mid-stream, as when a box is
// switched on).
func TestFakeTCPPlainCarrier(t *testing.T) {
	for _, seq := range []string{"live", "frozen"} {
		t.Run(seq, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			tun, _, capture := startFakeTCPTunnel(t, ctx, false, seq)
			_, took := initiateTimed(t, ctx, tun)
			t.Logf("%s: ESTABLISHED over fake-TCP through a plain carrier in %v", seq, took.Round(time.Millisecond))

			mb, err := tun.Lab.StartStrictMiddlebox(ctx, antireplay.Config{Window: smallWindow, AcceptMidstream: true})
			if err != nil {
				t.Fatal(err)
			}
			got, err := tun.PingThrough(ctx, 10, 100*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			st := mb.Stats()
			t.Logf("%s with anti-replay on: %d of 10 pings, middlebox drops %v", seq, got, st.Map())
			switch seq {
			case "live":
				if got != 10 || st.Dropped() != 0 {
					t.Fatalf("live: %d of 10 pings, %d drops", got, st.Dropped())
				}
			case "frozen":
				// The first data segment of each direction sets the
				// reference; every later one repeats its seq.
				if got > 1 || st.DroppedRepeat < 9 {
					t.Fatalf("frozen: %d of 10 pings, %d repeats dropped: anti-replay should stop it", got, st.DroppedRepeat)
				}
			}
			noResets(t, capture)
		})
	}
}
