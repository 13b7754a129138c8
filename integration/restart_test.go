package integration

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/relay"
)

// streamPort is where the hub's echo of a steady stream listens.
const streamPort = 5001

// stream is a steady stream of numbered datagrams through the tunnel,
// from the site's inner address to the hub's, which echoes each back. It
// counts what reached the hub and what came back, and keeps the send time
// of each, to tell when traffic flowed again after an event.
type stream struct {
	interval    time.Duration
	tx, echo    *net.UDPConn
	sent, atHub atomic.Uint64
	back        atomic.Uint64
	mu          sync.Mutex    // guards the following
	firstAfter  time.Time     // the event
	resumed     time.Time     // the first echo of a datagram sent after it
	lastBack    time.Time     // the last echo
	maxGap      time.Duration // the longest wait between two echoes since the event
	stop        chan struct{}
	wg          sync.WaitGroup
}

// startStream starts a stream of one datagram every interval.
func startStream(t *testing.T, tun *lab.Tunnel, interval time.Duration) *stream {
	t.Helper()
	l := tun.Lab
	var echo, tx *net.UDPConn
	err := l.Hub.Do(func() (err error) {
		echo, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(lab.HubInner), Port: streamPort})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	err = l.Site.Do(func() (err error) {
		tx, err = net.DialUDP("udp", &net.UDPAddr{IP: net.ParseIP(lab.SiteInner)}, &net.UDPAddr{IP: net.ParseIP(lab.HubInner), Port: streamPort})
		return err
	})
	if err != nil {
		echo.Close()
		t.Fatal(err)
	}
	s := &stream{interval: interval, tx: tx, echo: echo, stop: make(chan struct{})}
	s.wg.Add(3)
	go s.send()
	go s.echoLoop()
	go s.receive()
	t.Cleanup(s.close)
	return s
}

func (s *stream) send() {
	defer s.wg.Done()
	tick := time.NewTicker(s.interval)
	defer tick.Stop()
	buf := make([]byte, 200)
	for {
		select {
		case <-s.stop:
			return
		case now := <-tick.C:
			binary.BigEndian.PutUint64(buf, s.sent.Load())
			binary.BigEndian.PutUint64(buf[8:], uint64(now.UnixNano()))
			s.tx.Write(buf) // an error (no route for a moment) is a loss like any other
			s.sent.Add(1)
		}
	}
}

func (s *stream) echoLoop() {
	defer s.wg.Done()
	buf := make([]byte, 2048)
	for {
		n, from, err := s.echo.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		s.atHub.Add(1)
		s.echo.WriteToUDPAddrPort(buf[:n], from)
	}
}

func (s *stream) receive() {
	defer s.wg.Done()
	buf := make([]byte, 2048)
	for {
		n, err := s.tx.Read(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil || n < 16 {
			continue
		}
		s.back.Add(1)
		sentAt := time.Unix(0, int64(binary.BigEndian.Uint64(buf[8:])))
		now := time.Now()
		s.mu.Lock()
		if !s.firstAfter.IsZero() && !s.lastBack.IsZero() {
			s.maxGap = max(s.maxGap, now.Sub(s.lastBack))
		}
		s.lastBack = now
		if !s.firstAfter.IsZero() && s.resumed.IsZero() && sentAt.After(s.firstAfter) {
			s.resumed = time.Now()
		}
		s.mu.Unlock()
	}
}

// mark notes the event after which resumed measures.
func (s *stream) mark() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.firstAfter, s.resumed, s.maxGap = time.Now(), time.Time{}, 0
	return s.firstAfter
}

// gap returns the longest wait between two echoes since the mark.
func (s *stream) gap() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxGap
}

// waitResumed waits up to d for a datagram sent after the mark to come
// back, and returns how long after the mark it came.
func (s *stream) waitResumed(d time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		at, r := s.firstAfter, s.resumed
		s.mu.Unlock()
		if !r.IsZero() {
			return r.Sub(at), nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return 0, fmt.Errorf("no datagram of the stream came back within %v", d)
}

// finish stops sending, waits for stragglers, and returns the counts.
func (s *stream) finish() (sent, atHub, back uint64) {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	time.Sleep(500 * time.Millisecond)
	return s.sent.Load(), s.atHub.Load(), s.back.Load()
}

func (s *stream) close() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.tx.Close()
	s.echo.Close()
	s.wg.Wait()
}

// sameIKESA fails the test unless both charons still hold the IKE SA sa
// (same unique ID at the site, same SPIs at both ends), and the site sent
// no new IKE_SA_INIT since inits.
func sameIKESA(t *testing.T, ctx context.Context, tun *lab.Tunnel, sa lab.IKESA, inits int) {
	t.Helper()
	now, err := tun.Site.ListSAs(ctx)
	if err != nil || len(now) != 1 {
		t.Fatalf("site SAs: %+v %v", now, err)
	}
	if now[0].UniqueID != sa.UniqueID || now[0].InitiatorSPI != sa.InitiatorSPI || now[0].ResponderSPI != sa.ResponderSPI {
		t.Fatalf("IKE SA changed: was #%s %s/%s, now #%s %s/%s", sa.UniqueID, sa.InitiatorSPI, sa.ResponderSPI,
			now[0].UniqueID, now[0].InitiatorSPI, now[0].ResponderSPI)
	}
	if n := tun.Site.CountInLog("generating IKE_SA_INIT request"); n != inits {
		t.Fatalf("site sent %d new IKE_SA_INIT requests", n-inits)
	}
	if hub := hubSA(t, ctx, tun); hub.InitiatorSPI != sa.InitiatorSPI || hub.ResponderSPI != sa.ResponderSPI || hub.State != "ESTABLISHED" {
		t.Fatalf("hub IKE SA changed: %+v", hub)
	}
	t.Logf("same IKE SA: #%s %s/%s at the site, %s/%s at the hub", now[0].UniqueID, now[0].InitiatorSPI, now[0].ResponderSPI,
		sa.InitiatorSPI, sa.ResponderSPI)
}

// TestServerCrashRestart kills `iketcp server --state` with SIGKILL
// during a steady stream (100 datagrams a second, each echoed back by
// the hub), starts it again at once, and checks that traffic flows again
// on the same IKE SA (MOBIKE on): the restarted server rebinds the
// session's backend port from the state file, and the client's reconnect
// claims the session. It reports the time until the stream flowed again
// and the datagrams lost.
func TestServerCrashRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(l.Dir, "server.state")
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary, ServerArgs: []string{"--state", state}})
	if err != nil {
		t.Fatal(err)
	}
	sa, err := tun.Initiate(ctx)
	if err != nil || sa.State != "ESTABLISHED" || !sa.HasInstalledChild() {
		t.Fatalf("initiate: %+v %v", sa, err)
	}
	inits := tun.Site.CountInLog("generating IKE_SA_INIT request")
	before := serverSession(t, ctx, tun)
	s := startStream(t, tun, 10*time.Millisecond)
	if _, err := s.waitResumed(0); err == nil {
		t.Fatal("resumed before any event")
	}
	time.Sleep(2 * time.Second) // the ESP SPI is learned and written
	oldPID := tun.Server.PID()
	killedAt := s.mark()
	if err := tun.KillServer(); err != nil {
		t.Fatal(err)
	}
	if err := tun.StartServer(ctx); err != nil {
		t.Fatal(err)
	}
	startedIn := time.Since(killedAt)
	resumed, err := s.waitResumed(20 * time.Second)
	if err != nil {
		t.Fatalf("%v (server restarted in %v)\nserver log:\n%s", err, startedIn, tun.Server.Log())
	}
	time.Sleep(2 * time.Second)
	sent, atHub, back := s.finish()
	t.Logf("server SIGKILLed (pid %d) and started again (pid %d, answering %v after the kill): the stream flowed again after %v; "+
		"longest wait between two echoes %v (one every 10 ms); %d datagrams sent, %d reached the hub (%d lost), %d came back (%d lost)",
		oldPID, tun.Server.PID(), startedIn.Round(time.Millisecond), resumed.Round(time.Millisecond), s.gap().Round(time.Millisecond),
		sent, atHub, sent-atHub, back, sent-back)
	if resumed > 10*time.Second {
		t.Fatalf("traffic took %v to flow again", resumed)
	}
	sameIKESA(t, ctx, tun, sa, inits)
	sameSession(t, ctx, tun, before)
	st := serverStatus(t, ctx, tun)
	if c := counter(t, st, "sessions_restored"); c != 1 {
		t.Fatalf("sessions_restored = %d", c)
	}
	if c := counter(t, st, "claims_accepted"); c != 1 {
		t.Fatalf("claims_accepted = %d: the client did not claim its session with its ticket", c)
	}
	if c := counter(t, st, "sessions_created"); c != 0 {
		t.Fatalf("the restarted server created %d sessions", c)
	}
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("ping after the restart: %d of 3 (%v)", got, err)
	}
}

// adoptedProcess is a server the test did not start (an upgrade's new
// process, re-parented when the old one exited), ended by the test by
// its pidfd, so never a recycled PID.
type adoptedProcess struct {
	pid   int
	pidfd int
	once  sync.Once
}

func adoptProcess(t *testing.T, pid int) *adoptedProcess {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatalf("pidfd of the new server (pid %d): %v", pid, err)
	}
	p := &adoptedProcess{pid: pid, pidfd: fd}
	t.Cleanup(p.stop)
	return p
}

// stop sends SIGTERM, waits up to 5 s for the exit, then SIGKILL. It
// runs once; later calls do nothing.
func (p *adoptedProcess) stop() { p.once.Do(p.stopOnce) }

func (p *adoptedProcess) stopOnce() {
	defer unix.Close(p.pidfd)
	if p.exited(0) {
		return
	}
	for _, sig := range []unix.Signal{unix.SIGTERM, unix.SIGKILL} {
		if err := unix.PidfdSendSignal(p.pidfd, sig, nil, 0); err != nil {
			return // gone already
		}
		fds := []unix.PollFd{{Fd: int32(p.pidfd), Events: unix.POLLIN}}
		if n, _ := unix.Poll(fds, 5000); n == 1 {
			return
		}
	}
}

// exited reports whether the process has exited, waiting up to d.
func (p *adoptedProcess) exited(d time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(p.pidfd), Events: unix.POLLIN}}
	n, _ := unix.Poll(fds, int(d/time.Millisecond))
	return n == 1
}

// TestServerUpgrade upgrades `iketcp server` twice during a steady
// stream, first with SIGUSR2 and then with `iketcp upgrade`: each time a
// new process takes over the listening socket, the session's backend
// socket and the client's live TCP connection. The client must not
// reconnect, the IKE SA must stay the same (MOBIKE on), and the PID must
// change; the test reports the datagrams lost and the longest gap.
func TestServerUpgrade(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	const metricsAddr = "127.0.0.1:9452"
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary, ServerArgs: []string{"--metrics", metricsAddr}})
	if err != nil {
		t.Fatal(err)
	}
	sa, err := tun.Initiate(ctx)
	if err != nil || sa.State != "ESTABLISHED" || !sa.HasInstalledChild() {
		t.Fatalf("initiate: %+v %v", sa, err)
	}
	inits := tun.Site.CountInLog("generating IKE_SA_INIT request")
	before := serverSession(t, ctx, tun)
	// The metrics port moves with the server: the new one serves it.
	scrape := func() string {
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: l.Hub.Dial}}
		resp, err := hc.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			t.Fatalf("scrape the server's metrics: %v", err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	dialedBefore := clientDialed(t, ctx, tun)
	s := startStream(t, tun, 10*time.Millisecond)
	time.Sleep(time.Second)
	upgradeTwice(t, ctx, tun, s)
	if m := scrape(); !strings.Contains(m, "iketcp_sessions{") || !strings.Contains(m, `role="server"`) {
		t.Fatalf("the newest server's metrics have no sessions gauge:\n%s", tail(m, 2000))
	}
	checkNoReconnect(t, ctx, tun, s, dialedBefore, sa, inits)
	sameSession(t, ctx, tun, before)
}

// waitNewServer waits until a server other than pid answers on the
// tunnel's control socket, and returns it, ended by the test's cleanup.
func waitNewServer(t *testing.T, ctx context.Context, tun *lab.Tunnel, pid int) *adoptedProcess {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if st, err := tun.ServerStatus(ctx); err == nil && st.PID != pid {
			return adoptProcess(t, st.PID)
		}
	}
	t.Fatalf("no new server answered within 20 s\nserver log:\n%s", tun.Server.Log())
	return nil
}

// TestServerUpgradeTLS upgrades a server whose client is connected over
// TLS, whose state cannot leave the old process: the old process keeps
// the TLS connection and relays its stream to the new server over a
// socketpair. Then the new server is upgraded in turn, and hands the
// socketpair's end over as any stream connection. The client must not
// reconnect, the IKE SA and the session must stay the same, the newest
// server serves the stream (it answers on the control socket, no session
// is claimed again), and the stream loses no more than the same flow did
// just before without an upgrade. The first old process stays while the
// client is connected, and exits once the client has gone.
func TestServerUpgradeTLS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	pki := newServerPKI(t, l)
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary, ServerArgs: pki.serverArgs(), ClientArgs: pki.clientArgs()})
	if err != nil {
		t.Fatal(err)
	}
	sa, err := tun.Initiate(ctx)
	if err != nil || sa.State != "ESTABLISHED" || !sa.HasInstalledChild() {
		t.Fatalf("initiate: %+v %v", sa, err)
	}
	inits := tun.Site.CountInLog("generating IKE_SA_INIT request")
	before := serverSession(t, ctx, tun)
	dialed := func() uint64 {
		st, err := tun.ClientStatus(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return counter(t, st, "conns_dialed")
	}

	// The same flow without an upgrade, as long: what it loses is the
	// most the upgrade may.
	const flow = 6 * time.Second
	base := startStream(t, tun, 10*time.Millisecond)
	time.Sleep(flow)
	baseSent, _, baseBack := base.finish()
	base.close()
	t.Logf("TLS client, no upgrade: %d datagrams sent, %d came back (%d lost)", baseSent, baseBack, baseSent-baseBack)

	dialedBefore := dialed()
	s := startStream(t, tun, 10*time.Millisecond)
	began := time.Now()
	time.Sleep(time.Second)
	oldPID := tun.Server.PID()
	at := s.mark()
	if err := tun.Server.Signal(unix.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	first := waitNewServer(t, ctx, tun, oldPID)
	took := time.Since(at)
	resumed, err := s.waitResumed(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tun.Server.WaitLog(ctx, "keeping 1 TLS connections, relayed to the new server", 5*time.Second); err != nil {
		t.Fatalf("the old server kept no TLS connection: %v\nserver log:\n%s", err, tun.Server.Log())
	}
	t.Logf("TLS client, SIGUSR2: pid %d -> %d, new server answering %v after the signal; a datagram sent after it came back %v after it; "+
		"longest wait between echoes %v (one every 10 ms)", oldPID, first.pid, took.Round(time.Millisecond), resumed.Round(time.Millisecond),
		s.gap().Round(time.Millisecond))
	time.Sleep(time.Until(began.Add(3 * time.Second)))

	// The new server's own upgrade hands the socketpair's end over as a
	// stream connection: it keeps nothing and exits; the first old
	// process relays on, to the newest.
	at = s.mark()
	out, err := l.Hub.Run(ctx, iketcpBinary, "upgrade", "--control", tun.ServerControl)
	if err != nil {
		t.Fatalf("iketcp upgrade: %v: %s", err, out)
	}
	p := waitNewServer(t, ctx, tun, first.pid)
	took = time.Since(at)
	if resumed, err = s.waitResumed(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if !first.exited(5 * time.Second) {
		t.Fatalf("the first new server (pid %d) still runs 5 s after its own upgrade: it kept the relayed stream", first.pid)
	}
	t.Logf("TLS client, iketcp upgrade of the new server: pid %d -> %d, answering %v after the request; a datagram sent after it came back %v after it; "+
		"longest wait between echoes %v", first.pid, p.pid, took.Round(time.Millisecond), resumed.Round(time.Millisecond), s.gap().Round(time.Millisecond))
	time.Sleep(time.Until(began.Add(flow)))
	sent, atHub, back := s.finish()
	t.Logf("TLS client, both upgrades: %d datagrams sent, %d reached the hub (%d lost), %d came back (%d lost)",
		sent, atHub, sent-atHub, back, sent-back)
	if d := dialed(); d != dialedBefore {
		t.Fatalf("the client dialed %d new connections: it reconnected", d-dialedBefore)
	}
	if sent-back > baseSent-baseBack {
		t.Fatalf("the upgrades lost %d datagrams, the same flow without them %d", sent-back, baseSent-baseBack)
	}
	sameIKESA(t, ctx, tun, sa, inits)
	sameSession(t, ctx, tun, before)
	st := serverStatus(t, ctx, tun)
	if st.PID != p.pid {
		t.Fatalf("pid %d answers, want the new server's %d", st.PID, p.pid)
	}
	if c := counter(t, st, "claims_accepted"); c != 0 {
		t.Fatalf("claims_accepted = %d at the new server: the TLS client reconnected and claimed its session", c)
	}

	// The old process stays while the client is connected...
	select {
	case <-tun.Server.Done():
		t.Fatalf("the old server (pid %d) exited while its TLS client was connected\nserver log:\n%s", oldPID, tun.Server.Log())
	default:
	}
	// ... and exits once the client has gone.
	gone := time.Now()
	if err := tun.Client.Stop(); err != nil {
		t.Logf("stopping the client: %v", err)
	}
	select {
	case <-tun.Server.Done():
		t.Logf("the old server exited %v after the client stopped", time.Since(gone).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatalf("the old server (pid %d) still runs 10 s after its TLS client stopped\nserver log:\n%s", oldPID, tun.Server.Log())
	}
	if _, err := tun.Server.WaitLog(ctx, "the last TLS connection kept at the hand-over has ended", time.Second); err != nil {
		t.Fatalf("the old server did not say its last TLS connection ended: %v", err)
	}
	if p.exited(0) {
		t.Fatal("the new server exited with the old one")
	}
}

// TestServerUpgradeFails: an upgrade whose binary does not start (here
// /bin/false, which exits at once) leaves the running server serving,
// and iketcp upgrade says the upgrade did not happen.
func TestServerUpgradeFails(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary, ServerArgs: []string{"--upgrade-binary", "/bin/false"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tun.Initiate(ctx); err != nil {
		t.Fatal(err)
	}
	out, err := l.Hub.Run(ctx, iketcpBinary, "upgrade", "--control", tun.ServerControl, "--timeout", "2s")
	if err == nil || !strings.Contains(string(out), "did not happen") {
		t.Fatalf("iketcp upgrade to /bin/false: %v: %s", err, out)
	}
	if _, err := tun.Server.WaitLog(ctx, "upgrade failed, this server keeps running", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	st, err := tun.ServerStatus(ctx)
	if err != nil || st.PID != tun.Server.PID() {
		t.Fatalf("after the failed upgrade the control socket answers %+v (%v), want pid %d", st, err, tun.Server.PID())
	}
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("ping after the failed upgrade: %d of 3 (%v)", got, err)
	}
}

// sameSession fails the test unless the server still has the one session
// it had before, up, with the same backend port.
func sameSession(t *testing.T, ctx context.Context, tun *lab.Tunnel, before relay.SessionStatus) {
	t.Helper()
	after := serverSession(t, ctx, tun)
	if after.ID != before.ID || after.Local != before.Local || after.State != "up" {
		t.Fatalf("server session: was %d from %s, now %d from %s (%s)", before.ID, before.Local, after.ID, after.Local, after.State)
	}
}

// serverStatus is the server's status, or the test fails.
func serverStatus(t *testing.T, ctx context.Context, tun *lab.Tunnel) *relay.Status {
	t.Helper()
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}
