package integration

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/relay"
)

// counter returns the named counter of a status.
func counter(t *testing.T, st *relay.Status, name string) uint64 {
	t.Helper()
	for _, c := range st.Counters {
		if c.Name == name {
			return c.Value
		}
	}
	t.Fatalf("iketcp %s status has no counter %s", st.Role, name)
	return 0
}

// TestStrangerCannotHijack lets a stranger who sees the carrier's traffic
// replay what it saw to the server from connections of its own, while
// pings cross the tunnel: ESP with the site's real SPI and junk after the
// header, and a copy of the site's last IKE request. The server must hand
// the frames to the backend (which rejects them) and send the stranger
// nothing: not a reply, not the session's traffic. The tunnel must not
// lose a ping, and the IKE SA must stay the one it was.
func TestStrangerCannotHijack(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tun, sa, capture := upTunnel(t, ctx, true)
	l := tun.Lab
	target := net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort))

	// What the stranger sees: the carrier's capture of the client's stream.
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("ping before the attack: %d of 3 (%v)", got, err)
	}
	if err := capture.Stop(); err != nil {
		t.Fatal(err)
	}
	stream, err := lab.ClientStream(capture.Path, lab.ServerPort)
	if err != nil {
		t.Fatal(err)
	}
	frames, err := lab.SplitRFC9329(stream)
	if err != nil {
		t.Fatalf("the client's stream as the carrier saw it: %v", err)
	}
	// The first ESP the site sent, and its last IKE request past
	// IKE_SA_INIT (IKE_AUTH, unless more came).
	var spi uint32
	var replay lab.Frame
	var replayHdr lab.IKEHeader
	for _, f := range frames {
		if s, ok := f.ESPSPI(); ok && spi == 0 {
			spi = s
		}
		if h, ok := f.IKE(); ok && !h.Response && h.Exchange != lab.ExchangeIKESAInit {
			replay, replayHdr = f, h
		}
	}
	if spi == 0 || replay == nil {
		t.Fatalf("the capture of %d bytes (%d frames) holds no ESP (SPI %08x) or no IKE request past IKE_SA_INIT", len(stream), len(frames), spi)
	}
	if want := sa.Children[0].SPIOut; fmt.Sprintf("%08x", spi) != want {
		t.Fatalf("the stranger took SPI %08x from the wire, but the site sends ESP with SPI %s", spi, want)
	}
	t.Logf("the stranger saw %d frames in %d bytes; it replays ESP SPI %08x and the IKE request exchange %d, message ID %d, IKE SA %016x",
		len(frames), len(stream), spi, replayHdr.Exchange, replayHdr.MessageID, replayHdr.InitiatorSPI)

	before, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	session := serverSession(t, ctx, tun)
	// What the daemons log: a new IKE SA; junk ESP that the hub's
	// userspace ESP rejects; the hub answering a replayed request again;
	// the site ignoring that answer, which came to it.
	const siteInit, hubInit, espRejected = "generating IKE_SA_INIT request", "parsed IKE_SA_INIT request", "ESP decryption or ICV verification failed"
	hubAnswered := fmt.Sprintf("received retransmit of request with ID %d, retransmitting response", replayHdr.MessageID)
	siteIgnored := fmt.Sprintf("received message ID %d, expected", replayHdr.MessageID)
	logsBefore := map[string]int{
		siteInit: tun.Site.CountInLog(siteInit), siteIgnored: tun.Site.CountInLog(siteIgnored),
		hubInit: tun.Hub.CountInLog(hubInit), espRejected: tun.Hub.CountInLog(espRejected), hubAnswered: tun.Hub.CountInLog(hubAnswered),
	}
	siteLog := func(s string) int { return tun.Site.CountInLog(s) - logsBefore[s] }
	hubLog := func(s string) int { return tun.Hub.CountInLog(s) - logsBefore[s] }

	// The attack, while pings cross the tunnel.
	const pings, pingInterval = 25, 200 * time.Millisecond
	type pingResult struct {
		n   int
		err error
	}
	pinged := make(chan pingResult, 1)
	go func() {
		n, err := tun.PingThrough(ctx, pings, pingInterval)
		pinged <- pingResult{n, err}
	}()
	time.Sleep(300 * time.Millisecond)
	attack, attackErr := strangerAttack(ctx, l.Carrier, target, spi, replay, 4*time.Second)
	t.Cleanup(func() {
		for _, p := range attack.peers {
			p.Close()
		}
	})
	p := <-pinged
	if attackErr != nil {
		t.Fatalf("the stranger's attack: %v", attackErr)
	}
	// Anything the server would send late still has time to arrive.
	time.Sleep(500 * time.Millisecond)
	received := 0
	for _, peer := range attack.peers {
		n, first, rerr := peer.Received()
		received += n
		if n > 0 {
			t.Errorf("the stranger's connection from %s received %d bytes (%v): %x", peer.LocalAddr(), n, rerr, first[:min(len(first), 64)])
		}
	}
	sent := attack.esp + attack.ike
	t.Logf("the stranger sent %d ESP and %d IKE frames on %d connections; pings through the tunnel meanwhile: %d of %d; bytes the stranger received: %d",
		attack.esp, attack.ike, len(attack.peers), p.n, pings, received)
	if p.err != nil || p.n != pings {
		t.Errorf("pings through the tunnel during the attack: %d of %d (%v)", p.n, pings, p.err)
	}

	// Every frame reached the server, was counted a stray and went on to
	// the backend, which rejected the ESP and answered the replayed
	// requests to the site, not to the stranger.
	var after *relay.Status
	strayBefore := counter(t, before, "stray_frames")
	waitFor(t, "the server to count the stranger's frames and the daemons to log them", func() bool {
		var err error
		after, err = tun.ServerStatus(ctx)
		return err == nil && counter(t, after, "stray_frames") >= strayBefore+uint64(sent) &&
			hubLog(espRejected) >= attack.esp && hubLog(hubAnswered) >= 1 && siteLog(siteIgnored) >= hubLog(hubAnswered)
	})
	stray := counter(t, after, "stray_frames")
	t.Logf("server counters: stray_frames %d -> %d, conns_accepted %d -> %d, unknown_spi %d, rebinds %d; "+
		"hub charon rejected %d ESP packets and answered %d replayed requests, the site's charon received %d such answers",
		strayBefore, stray, counter(t, before, "conns_accepted"), counter(t, after, "conns_accepted"),
		counter(t, after, "unknown_spi"), counter(t, after, "rebinds"), hubLog(espRejected), hubLog(hubAnswered), siteLog(siteIgnored))
	if stray != strayBefore+uint64(sent) {
		t.Errorf("stray_frames rose by %d, want the %d frames the stranger sent", stray-strayBefore, sent)
	}
	if n := hubLog(espRejected); n != attack.esp {
		t.Errorf("the hub's charon rejected %d ESP packets, want the stranger's %d", n, attack.esp)
	}
	if a, b := counter(t, after, "conns_accepted"), counter(t, before, "conns_accepted"); a != b+uint64(len(attack.peers)) {
		t.Errorf("conns_accepted rose by %d, want the stranger's %d connections", a-b, len(attack.peers))
	}
	for _, name := range []string{"sessions_created", "rebinds", "claims_accepted", "unknown_spi"} {
		if a, b := counter(t, after, name), counter(t, before, name); a != b {
			t.Errorf("%s went from %d to %d during the attack", name, b, a)
		}
	}

	// The session, its return path and the IKE SA are as they were.
	s := serverSession(t, ctx, tun)
	if s.ID != session.ID || s.Peer != session.Peer || s.Connections != 1 || s.State != "up" {
		t.Errorf("server session after the attack: id %d peer %s connections %d state %s; before: id %d peer %s",
			s.ID, s.Peer, s.Connections, s.State, session.ID, session.Peer)
	}
	now, err := tun.Site.ListSAs(ctx)
	if err != nil || len(now) != 1 || len(now[0].Children) != 1 {
		t.Fatalf("site SAs after the attack: %+v %v", now, err)
	}
	if now[0].UniqueID != sa.UniqueID || now[0].InitiatorSPI != sa.InitiatorSPI || now[0].ResponderSPI != sa.ResponderSPI ||
		now[0].Children[0].SPIOut != sa.Children[0].SPIOut {
		t.Errorf("site IKE SA changed: was %s %s/%s, now %s %s/%s", sa.UniqueID, sa.InitiatorSPI, sa.ResponderSPI,
			now[0].UniqueID, now[0].InitiatorSPI, now[0].ResponderSPI)
	}
	if hub := hubSA(t, ctx, tun); hub.InitiatorSPI != sa.InitiatorSPI || hub.ResponderSPI != sa.ResponderSPI {
		t.Errorf("hub IKE SA changed: %+v", hub)
	}
	if n := siteLog(siteInit); n != 0 {
		t.Errorf("the site sent %d new IKE_SA_INIT requests", n)
	}
	if n := hubLog(hubInit); n != 0 {
		t.Errorf("the hub's charon parsed %d new IKE_SA_INIT requests", n)
	}
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Errorf("ping after the attack: %d of 3 (%v)", got, err)
	}
}

// strangerReport is what strangerAttack did: its connections, still
// open, and the frames they sent.
type strangerReport struct {
	peers    []*lab.RawPeer
	esp, ike int
}

// strangerAttack connects to target from ns, again and again for d:
// every connection sends the prefix, three ESP frames with spi and junk
// after the header, and the replayed IKE frame; the first one also sends
// an ESP frame every 100 ms all along.
func strangerAttack(ctx context.Context, ns *lab.Namespace, target string, spi uint32, replay lab.Frame, d time.Duration) (a strangerReport, err error) {
	seq := uint32(1 << 20)
	esp := func() []byte {
		b := make([]byte, 8+64)
		binary.BigEndian.PutUint32(b, spi)
		binary.BigEndian.PutUint32(b[4:], seq)
		seq++
		rand.Read(b[8:])
		return b
	}
	start := time.Now()
	for i := 0; i < 100 && time.Since(start) < d; i++ {
		if i%5 == 0 {
			p, err := ns.DialRFC9329(ctx, target)
			if err != nil {
				return a, err
			}
			a.peers = append(a.peers, p)
			if err := p.Send(esp(), esp(), esp(), replay); err != nil {
				return a, err
			}
			a.esp, a.ike = a.esp+3, a.ike+1
		}
		if err := a.peers[0].Send(esp()); err != nil {
			return a, err
		}
		a.esp++
		time.Sleep(100 * time.Millisecond)
	}
	return a, nil
}

// TestTwoIKESAsTwoConnections runs two IKE SAs from one site daemon
// through one iketcp client: each gets a TCP connection of its own and a
// session of its own at the server, and a rekeyed IKE SA stays on its
// predecessor's connection and session.
func TestTwoIKESAsTwoConnections(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary, Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	a, b := tun.Conns[0], tun.Conns[1]
	sas := make(map[string]lab.IKESA)
	// One after the other, each pinged before the next comes up: the
	// client gives a new ESP SPI to the link whose child SA came first.
	for _, c := range tun.Conns {
		sa, err := tun.InitiateConn(ctx, c)
		if err != nil {
			t.Fatalf("initiate %s: %v", c.Name, err)
		}
		sas[c.Name] = sa
		if got, err := tun.PingConn(ctx, c, 3, 100*time.Millisecond); err != nil || got != 3 {
			t.Fatalf("ping %s -> %s through %s: %d of 3 (%v)", c.SiteInner, c.HubInner, c.Name, got, err)
		}
		t.Logf("%s: IKE SA %s/%s, ESP out %s, pings 3 of 3", c.Name, sa.InitiatorSPI, sa.ResponderSPI, sa.Children[0].SPIOut)
	}
	if sas[a.Name].InitiatorSPI == sas[b.Name].InitiatorSPI {
		t.Fatalf("both connections share IKE SA %s", sas[a.Name].InitiatorSPI)
	}
	if hub, err := tun.Hub.ListSAs(ctx); err != nil || len(hub) != 2 {
		t.Fatalf("hub IKE SAs: %+v %v", hub, err)
	}
	siteConns, hubConns := serverConnections(t, ctx, tun)
	if len(siteConns) != 2 || len(hubConns) != 2 {
		t.Fatalf("%d TCP connections from the site and %d at the hub, want 2 and 2: %v, %v", len(siteConns), len(hubConns), siteConns, hubConns)
	}
	before := carriersOf(t, ctx, tun, sas)
	checkEnds(t, before, siteConns, hubConns)

	// Rekey one IKE SA. Its SPIs show in headers once an exchange runs in
	// it: rekeying its child SA makes one, from the site, and new ESP.
	old := sas[b.Name]
	nb, err := tun.Site.RekeyIKE(ctx, b.Name)
	if err != nil {
		t.Fatal(err)
	}
	if nb, err = tun.Site.RekeyChild(ctx, b.Name); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s rekeyed: IKE SA %s/%s -> %s/%s, ESP out %s -> %s", b.Name, old.InitiatorSPI, old.ResponderSPI,
		nb.InitiatorSPI, nb.ResponderSPI, old.Children[0].SPIOut, nb.Children[0].SPIOut)
	for _, c := range tun.Conns {
		if got, err := tun.PingConn(ctx, c, 3, 100*time.Millisecond); err != nil || got != 3 {
			t.Fatalf("ping through %s after the rekey: %d of 3 (%v)", c.Name, got, err)
		}
	}
	hubNow, err := tun.Hub.ListSAs(ctx)
	if err != nil || len(hubNow) != 2 || !slices.ContainsFunc(hubNow, func(sa lab.IKESA) bool { return sa.InitiatorSPI == nb.InitiatorSPI }) {
		t.Fatalf("hub IKE SAs after the rekey: %+v %v", hubNow, err)
	}

	// The same two TCP connections carry both IKE SAs.
	siteNow, hubNowConns := serverConnections(t, ctx, tun)
	if !sameConns(siteNow, siteConns) || !sameConns(hubNowConns, hubConns) {
		t.Fatalf("TCP connections changed with the rekey: site %v -> %v, hub %v -> %v", siteConns, siteNow, hubConns, hubNowConns)
	}
	sas[b.Name] = nb
	after := carriersOf(t, ctx, tun, sas)
	checkEnds(t, after, siteNow, hubNowConns)
	ca, cb := after[a.Name], after[b.Name]
	if ca.link.ID != before[a.Name].link.ID || ca.session.ID != before[a.Name].session.ID {
		t.Errorf("%s moved: link %d -> %d, session %d -> %d", a.Name, before[a.Name].link.ID, ca.link.ID, before[a.Name].session.ID, ca.session.ID)
	}
	if cb.link.ID != before[b.Name].link.ID || cb.link.Local != before[b.Name].link.Local || cb.session.ID != before[b.Name].session.ID || cb.session.Peer != before[b.Name].session.Peer {
		t.Errorf("the rekeyed %s is not where its predecessor was: link %d from %s -> %d from %s, session %d from %s -> %d from %s",
			b.Name, before[b.Name].link.ID, before[b.Name].link.Local, cb.link.ID, cb.link.Local,
			before[b.Name].session.ID, before[b.Name].session.Peer, cb.session.ID, cb.session.Peer)
	}
	for _, spis := range [][]relay.IKESAInfo{cb.link.IKESAs, cb.session.IKESAs} {
		for _, sa := range spis {
			if sa.InitiatorSPI != old.InitiatorSPI && sa.InitiatorSPI != nb.InitiatorSPI {
				t.Errorf("%s's link or session lists IKE SA %s, neither the old %s nor the new %s", b.Name, sa.InitiatorSPI, old.InitiatorSPI, nb.InitiatorSPI)
			}
		}
	}
	t.Logf("after the rekey: %s on link %d (%s, IKE SAs %v) and session %d (from %s, IKE SAs %v)", b.Name,
		cb.link.ID, cb.link.Local, cb.link.IKESAs, cb.session.ID, cb.session.Peer, cb.session.IKESAs)

	cst, err := tun.ClientStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sst, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		st   *relay.Status
		name string
		want uint64
	}{
		{cst, "conns_dialed", 2}, {sst, "conns_accepted", 2}, {sst, "sessions_created", 2},
		{sst, "rebinds", 0}, {sst, "stray_frames", 0}, {sst, "unknown_spi", 0},
	} {
		if got := counter(t, c.st, c.name); got != c.want {
			t.Errorf("%s counter %s = %d, want %d", c.st.Role, c.name, got, c.want)
		}
	}
}

// carrier is what carries one IKE SA (and its rekeyed successors): the
// client's link and the server's session.
type carrier struct {
	link    relay.LinkStatus
	session relay.SessionStatus
}

// carriersOf finds each connection's link and session by its IKE SA (sas
// maps the connection names to their current IKE SAs) and checks that
// each IKE SA has a link and a session of its own, up on one TCP
// connection, with its ESP, and that the link holds the server's ticket
// for its session.
func carriersOf(t *testing.T, ctx context.Context, tun *lab.Tunnel, sas map[string]lab.IKESA) map[string]carrier {
	t.Helper()
	cst, err := tun.ClientStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sst, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(cst.Sessions) != 1 {
		t.Fatalf("client has %d flows, want 1: %+v", len(cst.Sessions), cst.Sessions)
	}
	links := cst.Sessions[0].Links
	if len(links) != len(sas) || len(sst.Sessions) != len(sas) {
		t.Fatalf("%d IKE SAs, client links %d, server sessions %d, want one each: links %+v, sessions %+v",
			len(sas), len(links), len(sst.Sessions), links, sst.Sessions)
	}
	out := make(map[string]carrier, len(sas))
	seenLinks, seenSessions := map[uint64]string{}, map[uint64]string{}
	for name, sa := range sas {
		var c carrier
		var nl, ns int
		for _, l := range links {
			if slices.ContainsFunc(l.IKESAs, func(i relay.IKESAInfo) bool { return i.InitiatorSPI == sa.InitiatorSPI }) {
				c.link = l
				nl++
			}
		}
		for _, s := range sst.Sessions {
			if hasIKESA(s, sa.InitiatorSPI) {
				c.session = s
				ns++
			}
		}
		if nl != 1 || ns != 1 {
			t.Fatalf("IKE SA %s of %s is on %d client links and %d server sessions, want 1 and 1: links %+v, sessions %+v",
				sa.InitiatorSPI, name, nl, ns, links, sst.Sessions)
		}
		if other, ok := seenLinks[c.link.ID]; ok {
			t.Fatalf("%s and %s share client link %d: %+v", name, other, c.link.ID, c.link)
		}
		if other, ok := seenSessions[c.session.ID]; ok {
			t.Fatalf("%s and %s share server session %d: %+v", name, other, c.session.ID, c.session)
		}
		seenLinks[c.link.ID], seenSessions[c.session.ID] = name, name
		espOut := sa.Children[0].SPIOut
		if c.link.State != "up" || c.link.Connections != 1 || c.link.Session != c.session.ID || !slices.Contains(c.link.ESPOut, espOut) {
			t.Errorf("%s's client link: %+v; want up, 1 connection, the ticket of session %d, ESP out %s", name, c.link, c.session.ID, espOut)
		}
		if c.session.State != "up" || c.session.Connections != 1 || !slices.Contains(c.session.ESPIn, espOut) {
			t.Errorf("%s's server session: %+v; want up, 1 connection, ESP in %s", name, c.session, espOut)
		}
		out[name] = c
	}
	return out
}

// checkEnds checks that the carriers' links and sessions are the TCP
// connections the site and the hub have: each link's local end is a site
// connection's, each session's peer a hub connection's remote end, and no
// two carriers share one.
func checkEnds(t *testing.T, carriers map[string]carrier, site, hub []lab.TCPConn) {
	t.Helper()
	locals, peers := map[string]bool{}, map[string]bool{}
	for name, c := range carriers {
		if !slices.ContainsFunc(site, func(tc lab.TCPConn) bool { return tc.Local.String() == c.link.Local }) || locals[c.link.Local] {
			t.Errorf("%s's link is from %s: not one of the site's connections %v, or shared", name, c.link.Local, site)
		}
		if !slices.ContainsFunc(hub, func(tc lab.TCPConn) bool { return tc.Remote.String() == c.session.Peer }) || peers[c.session.Peer] {
			t.Errorf("%s's session is from %s: not one of the hub's connections %v, or shared", name, c.session.Peer, hub)
		}
		locals[c.link.Local], peers[c.session.Peer] = true, true
	}
}

// serverConnections returns the established TCP connections to the
// server's port, as the site and the hub see them.
func serverConnections(t *testing.T, ctx context.Context, tun *lab.Tunnel) (site, hub []lab.TCPConn) {
	t.Helper()
	server := netip.AddrPortFrom(netip.MustParseAddr(lab.HubOuter), lab.ServerPort)
	site, err := tun.Lab.Site.EstablishedTCP(ctx, lab.ServerPort)
	if err != nil {
		t.Fatal(err)
	}
	hub, err = tun.Lab.Hub.EstablishedTCP(ctx, lab.ServerPort)
	if err != nil {
		t.Fatal(err)
	}
	site = slices.DeleteFunc(site, func(c lab.TCPConn) bool { return c.Remote != server })
	hub = slices.DeleteFunc(hub, func(c lab.TCPConn) bool { return c.Local != server })
	t.Logf("TCP connections to the server: site %v, hub %v", site, hub)
	return site, hub
}

// sameConns reports whether a and b hold the same connections.
func sameConns(a, b []lab.TCPConn) bool {
	return len(a) == len(b) && !slices.ContainsFunc(a, func(c lab.TCPConn) bool { return !slices.Contains(b, c) })
}

// TestInterleavedRekeysKeepTheirConnections: one IKE SA is rekeyed, then
// the other one's child SA, then the first one's child SA in its new IKE
// SA. Each IKE SA, old and new, and each child SA's ESP stays on its own
// connection and session.
func TestInterleavedRekeysKeepTheirConnections(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary, Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	a, b := tun.Conns[0], tun.Conns[1]
	sas := make(map[string]lab.IKESA)
	for _, c := range tun.Conns {
		sa, err := tun.InitiateConn(ctx, c)
		if err != nil {
			t.Fatalf("initiate %s: %v", c.Name, err)
		}
		sas[c.Name] = sa
		if got, err := tun.PingConn(ctx, c, 2, 100*time.Millisecond); err != nil || got != 2 {
			t.Fatalf("ping through %s: %d of 2 (%v)", c.Name, got, err)
		}
	}
	before := carriersOf(t, ctx, tun, sas)
	oldB := sas[b.Name]
	if _, err := tun.Site.RekeyIKE(ctx, b.Name); err != nil {
		t.Fatal(err)
	}
	na, err := tun.Site.RekeyChild(ctx, a.Name)
	if err != nil {
		t.Fatal(err)
	}
	nb, err := tun.Site.RekeyChild(ctx, b.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range tun.Conns {
		if got, err := tun.PingConn(ctx, c, 3, 100*time.Millisecond); err != nil || got != 3 {
			t.Fatalf("ping through %s after the rekeys: %d of 3 (%v)", c.Name, got, err)
		}
	}
	sas[a.Name], sas[b.Name] = na, nb
	after := carriersOf(t, ctx, tun, sas)
	for _, name := range []string{a.Name, b.Name} {
		if after[name].link.ID != before[name].link.ID || after[name].session.ID != before[name].session.ID {
			t.Errorf("%s moved: link %d -> %d, session %d -> %d", name, before[name].link.ID, after[name].link.ID,
				before[name].session.ID, after[name].session.ID)
		}
	}
	for _, spis := range [][]relay.IKESAInfo{after[b.Name].link.IKESAs, after[b.Name].session.IKESAs} {
		for _, sa := range spis {
			if sa.InitiatorSPI != oldB.InitiatorSPI && sa.InitiatorSPI != nb.InitiatorSPI {
				t.Errorf("%s's link or session lists IKE SA %s, not its own (%s, %s)", b.Name, sa.InitiatorSPI, oldB.InitiatorSPI, nb.InitiatorSPI)
			}
		}
	}
	for _, sa := range after[a.Name].link.IKESAs {
		if sa.InitiatorSPI != na.InitiatorSPI {
			t.Errorf("%s's link lists IKE SA %s, not its own %s", a.Name, sa.InitiatorSPI, na.InitiatorSPI)
		}
	}
	t.Logf("after the rekeys: %s on link %d (ESP out %v), %s on link %d (IKE SAs %v, ESP out %v)", a.Name, after[a.Name].link.ID,
		after[a.Name].link.ESPOut, b.Name, after[b.Name].link.ID, after[b.Name].link.IKESAs, after[b.Name].link.ESPOut)
}
