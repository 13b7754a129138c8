package integration

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/integration/lab"
)

// The upgrades of servers that own host state: the nftables redirect of
// --ike-tcp-port and the routing of --real-address. Each runs the steady
// stream of TestServerUpgrade through two upgrades (SIGUSR2, then
// `iketcp upgrade`) and checks, beside what that test checks, that the
// host state is exactly what it was before the upgrades, and gone once
// the last server stops.

// upgradeFigures are one upgrade's measurements.
type upgradeFigures struct {
	how              string
	from, to         int
	answering        time.Duration // from the request to the new server's answer on the control socket
	resumed, longest time.Duration // the first echo of a datagram sent after the request; the longest wait between echoes
	handover         string        // the old server's own "took", from its log
}

func (f upgradeFigures) String() string {
	return fmt.Sprintf("%s: pid %d -> %d, hand-over took %s, new server answering %v after the request; a datagram sent after it came back %v after it; longest wait between two echoes %v (one every 10 ms)",
		f.how, f.from, f.to, f.handover, f.answering.Round(time.Millisecond), f.resumed.Round(time.Millisecond), f.longest.Round(time.Millisecond))
}

// upgradeTwice upgrades the tunnel's server twice during s, first with
// SIGUSR2 and then with `iketcp upgrade`, checking each time that the old
// process exits and a new one answers. It returns the last server.
func upgradeTwice(t *testing.T, ctx context.Context, tun *lab.Tunnel, s *stream) (*adoptedProcess, []upgradeFigures) {
	t.Helper()
	pid := tun.Server.PID()
	oldExited := func(d time.Duration) bool {
		select {
		case <-tun.Server.Done():
			return true
		case <-time.After(d):
			return false
		}
	}
	var last *adoptedProcess
	var figs []upgradeFigures
	ups := []struct {
		how string
		do  func() error
	}{
		{"SIGUSR2", func() error { return tun.Server.Signal(unix.SIGUSR2) }},
		{"iketcp upgrade", func() error {
			out, err := tun.Lab.Hub.Run(ctx, iketcpBinary, "upgrade", "--control", tun.ServerControl)
			t.Logf("iketcp upgrade: %s", bytes.TrimSpace(out))
			return err
		}},
	}
	for _, up := range ups {
		doneBefore := strings.Count(tun.Server.Log(), "upgrade done: the new server took over")
		at := s.mark()
		if err := up.do(); err != nil {
			t.Fatalf("%s: %v\nserver log:\n%s", up.how, err, tun.Server.Log())
		}
		var newPID int
		for deadline := time.Now().Add(20 * time.Second); newPID == 0; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: no new server answered within 20 s\nserver log:\n%s", up.how, tun.Server.Log())
			}
			if st, err := tun.ServerStatus(ctx); err == nil && st.PID != pid {
				newPID = st.PID
			}
		}
		answering := time.Since(at)
		p := adoptProcess(t, newPID)
		resumed, err := s.waitResumed(10 * time.Second)
		if err != nil {
			t.Fatalf("%s: %v\nserver log:\n%s", up.how, err, tun.Server.Log())
		}
		if !oldExited(5 * time.Second) {
			t.Fatalf("%s: the old server (pid %d) is still running", up.how, pid)
		}
		time.Sleep(time.Second)
		f := upgradeFigures{how: up.how, from: pid, to: newPID, answering: answering, resumed: resumed, longest: s.gap(), handover: "?"}
		if lines := strings.Split(tun.Server.Log(), "\n"); strings.Count(tun.Server.Log(), "upgrade done: the new server took over") > doneBefore {
			for j := len(lines) - 1; j >= 0; j-- {
				if k := strings.Index(lines[j], "took="); k >= 0 && strings.Contains(lines[j], "upgrade done") {
					f.handover = strings.Fields(lines[j][k+len("took="):])[0]
					break
				}
			}
		}
		t.Log(f)
		figs = append(figs, f)
		pid, last = newPID, p
		oldExited = func(d time.Duration) bool { return p.exited(d) }
	}
	return last, figs
}

// checkNoReconnect fails the test if the stream lost datagrams, the client
// dialed a new connection, or the IKE SA or the session changed.
func checkNoReconnect(t *testing.T, ctx context.Context, tun *lab.Tunnel, s *stream, dialedBefore uint64, sa lab.IKESA, inits int) {
	t.Helper()
	checkNoReconnectLosing(t, ctx, tun, s, dialedBefore, sa, inits, 0)
}

// checkNoReconnectLosing is checkNoReconnect for a flow that loses up to
// allowed datagrams without any upgrade (one with no retransmission).
func checkNoReconnectLosing(t *testing.T, ctx context.Context, tun *lab.Tunnel, s *stream, dialedBefore uint64, sa lab.IKESA, inits int, allowed uint64) {
	t.Helper()
	sent, atHub, back := s.finish()
	t.Logf("over both upgrades: %d datagrams sent, %d reached the hub (%d lost), %d came back (%d lost)",
		sent, atHub, sent-atHub, back, sent-back)
	st, err := tun.ClientStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := counter(t, st, "conns_dialed"); d != dialedBefore {
		t.Fatalf("the client dialed %d new connections: it reconnected", d-dialedBefore)
	}
	t.Logf("the client's conns_dialed stayed %d: no reconnect", dialedBefore)
	sameIKESA(t, ctx, tun, sa, inits)
	if sent-atHub > allowed || sent-back > allowed {
		t.Fatalf("the upgrades lost datagrams: %d toward the hub, %d in all; the same flow without an upgrade lost %d", sent-atHub, sent-back, allowed)
	}
}

// clientDialed is the client's conns_dialed.
func clientDialed(t *testing.T, ctx context.Context, tun *lab.Tunnel) uint64 {
	t.Helper()
	st, err := tun.ClientStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return counter(t, st, "conns_dialed")
}

// TestServerUpgradeRedirect upgrades a server with --ike-tcp-port 443,
// whose nftables table redirects 443 to 11443, during a steady stream,
// while the site dials 443 every 20 ms: the new process adopts the
// running table and the owner socket, the old one exits without removing
// them. No dial is refused, the client does not reconnect, nothing is
// lost, the IKE SA is the same; the hub's ruleset is the same before and
// after, the owner socket is the new server's alone, and stopping it
// removes the table.
func TestServerUpgradeRedirect(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:       iketcpBinary,
		ServerListen: []string{}, // --ike-tcp-port says where
		ServerArgs:   []string{"--ike-tcp-port", "443"},
		Peer:         net.JoinHostPort(lab.HubOuter, "443"),
	})
	if err != nil {
		t.Fatal(err)
	}
	sa := initiateAndPing(t, ctx, tun, 3)
	inits := tun.Site.CountInLog("generating IKE_SA_INIT request")
	dialedBefore := clientDialed(t, ctx, tun)
	rulesetBefore := nftRuleset(t, ctx, l.Hub)
	if strings.Count(rulesetBefore, redirectTable) != 1 {
		t.Fatalf("before the upgrades, want one redirect table:\n%s", rulesetBefore)
	}

	// New connections to 443 all along, from the site: none may be
	// refused while the table changes hands.
	var dials, refused atomic.Int64
	var firstRefusal atomic.Value
	stopDial := make(chan struct{})
	var dialing sync.WaitGroup
	dialing.Add(1)
	go func() {
		defer dialing.Done()
		for {
			select {
			case <-stopDial:
				return
			case <-time.After(20 * time.Millisecond):
			}
			err := l.Site.Do(func() error {
				c, err := net.DialTimeout("tcp", net.JoinHostPort(lab.HubOuter, "443"), 3*time.Second)
				if err == nil {
					c.Close()
				}
				return err
			})
			dials.Add(1)
			if err != nil {
				refused.Add(1)
				firstRefusal.CompareAndSwap(nil, err.Error())
			}
		}
	}()
	s := startStream(t, tun, 10*time.Millisecond)
	time.Sleep(time.Second)
	last, _ := upgradeTwice(t, ctx, tun, s)
	close(stopDial)
	dialing.Wait()
	t.Logf("the site dialed %s:443 %d times during the upgrades, every 20 ms: %d failed", lab.HubOuter, dials.Load(), refused.Load())
	if refused.Load() > 0 {
		t.Fatalf("%d of %d dials to 443 failed during the upgrades, the first: %v", refused.Load(), dials.Load(), firstRefusal.Load())
	}
	checkNoReconnect(t, ctx, tun, s, dialedBefore, sa, inits)

	// The host: the same ruleset, the owner socket the new server's alone.
	if after := nftRuleset(t, ctx, l.Hub); after != rulesetBefore {
		t.Fatalf("the hub's ruleset changed in the upgrades:\n--- before\n%s\n--- after\n%s", rulesetBefore, after)
	}
	ss, err := l.Hub.Run(ctx, "ss", "-xap")
	if err != nil {
		t.Fatal(err)
	}
	var owners []string
	for _, line := range strings.Split(string(ss), "\n") {
		if strings.Contains(line, "@iketcp/nftables/iketcp_redirect ") {
			owners = append(owners, strings.Join(strings.Fields(line), " "))
		}
	}
	if len(owners) != 1 || !strings.Contains(owners[0], fmt.Sprintf("pid=%d,", last.pid)) {
		t.Fatalf("owner sockets of the redirect table: %q, want one, held by the new server (pid %d)", owners, last.pid)
	}
	t.Logf("the owner socket after the upgrades: %s", owners[0])
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("ping after the upgrades: %d of 3 (%v)", got, err)
	}

	// The new server's plain exit removes the table.
	last.stop()
	if _, err := tun.Server.WaitLog(ctx, "port redirect: removed its table", 5*time.Second); err != nil {
		t.Fatalf("%v\nserver log:\n%s", err, tun.Server.Log())
	}
	if rs := nftRuleset(t, ctx, l.Hub); strings.Contains(rs, "iketcp_redirect") {
		t.Fatalf("the redirect table outlived the new server's exit:\n%s", rs)
	}
}

// TestServerUpgradeRealAddress upgrades a server with --real-address
// during a steady stream: the new process takes the session's transparent
// backend socket and adopts the policy rules, the routes of table 4501
// and the nftables table with the session's element; the old one exits
// without removing them. The client does not reconnect, nothing is lost,
// the IKE SA is the same, the hub's charon still sees the client's
// carrier address; the hub's rules, routes and ruleset are the same before
// and after, and as before the server started once the new one stops.
func TestServerUpgradeRealAddress(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tun, pristine := startRealAddress(t, ctx)
	l := tun.Lab
	sa := initiateAndPing(t, ctx, tun, 3)
	inits := tun.Site.CountInLog("generating IKE_SA_INIT request")
	dialedBefore := clientDialed(t, ctx, tun)
	before := serverSession(t, ctx, tun)
	s := startStream(t, tun, 10*time.Millisecond)
	time.Sleep(time.Second)
	during, err := hubHostState(ctx, l.Hub)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"fwmark 0x4501 lookup " + realAddrTable, "local default dev lo", "table inet iketcp_realaddr", before.Local[:strings.LastIndex(before.Local, ":")] + " . "} {
		if !strings.Contains(during, want) {
			t.Fatalf("before the upgrades, the hub lacks %q:\n%s", want, during)
		}
	}
	last, _ := upgradeTwice(t, ctx, tun, s)
	checkNoReconnect(t, ctx, tun, s, dialedBefore, sa, inits)
	sameSession(t, ctx, tun, before)
	hub := hubSA(t, ctx, tun)
	if hub.RemoteHost != before.Local {
		t.Fatalf("after the upgrades the hub's charon sees its peer at %s, want the session's socket %s", hub.RemoteHost, before.Local)
	}
	after, err := hubHostState(ctx, l.Hub)
	if err != nil {
		t.Fatal(err)
	}
	if after != during {
		t.Fatalf("the hub's rules, routes or ruleset changed in the upgrades:\n--- before\n%s\n--- after\n%s", during, after)
	}
	t.Logf("the hub's state, the same before and after the upgrades:\n%s", after)
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("ping after the upgrades: %d of 3 (%v)", got, err)
	}

	last.stop()
	if _, err := tun.Server.WaitLog(ctx, "real-address mode: removed its table, rules and routes", 5*time.Second); err != nil {
		t.Fatalf("%v\nserver log:\n%s", err, tun.Server.Log())
	}
	end, err := hubHostState(ctx, l.Hub)
	if err != nil {
		t.Fatal(err)
	}
	if end != pristine {
		t.Fatalf("the hub after the new server's exit differs from before the first one started:\n--- before\n%s\n--- after\n%s", pristine, end)
	}
}

// TestServerUpgradeFakeTCP upgrades a fake-TCP server (both sides
// --encap fake-tcp) twice during a steady stream, SIGUSR2 then `iketcp
// upgrade`: the old process pauses its userspace TCP stack, hands each
// connection over as its TCP state, with the stack's SYN cookie key and
// its TUN device's descriptor, and exits without removing the device or
// its nftables table; the new one adopts them and resumes the connection
// ESTABLISHED, where the old one left it. What the client sends meanwhile
// waits in the device. The client does not reconnect, loses no more than
// the same flow loses without an upgrade, the IKE SA is the same, no
// TCP reset crosses the carrier, and afterwards the hub has exactly one
// fake-TCP device and table, which the new server's exit removes.
func TestServerUpgradeFakeTCP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tun, _, capture := startFakeTCPTunnel(t, ctx, false, "live")
	l := tun.Lab
	sa := initiateAndPing(t, ctx, tun, 3)
	inits := tun.Site.CountInLog("generating IKE_SA_INIT request")
	dialedBefore := clientDialed(t, ctx, tun)
	before := serverSession(t, ctx, tun)
	if n, table := fakeTCPHubState(t, ctx, l); n != 1 || table != 1 {
		t.Fatalf("before the upgrades the hub has %d fake-TCP devices and %d tables, want one of each", n, table)
	}

	// The same flow, as long as the upgrades take, without an upgrade:
	// fake-TCP retransmits nothing, so this is what it loses anyway.
	base := startStream(t, tun, 10*time.Millisecond)
	time.Sleep(4 * time.Second)
	bsent, _, bback := base.finish()
	base.close()
	baseline := bsent - bback
	t.Logf("without an upgrade: %d datagrams sent, %d lost", bsent, baseline)

	s := startStream(t, tun, 10*time.Millisecond)
	time.Sleep(time.Second)
	last, _ := upgradeTwice(t, ctx, tun, s)
	checkNoReconnectLosing(t, ctx, tun, s, dialedBefore, sa, inits, baseline)
	sameSession(t, ctx, tun, before)
	if n, table := fakeTCPHubState(t, ctx, l); n != 1 || table != 1 {
		t.Fatalf("after the upgrades the hub has %d fake-TCP devices and %d tables, want one of each", n, table)
	}
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("ping after the upgrades: %d of 3 (%v)", got, err)
	}
	noResets(t, capture)

	last.stop()
	if _, err := tun.Server.WaitLog(ctx, "fake-TCP mode: removed its table and device", 5*time.Second); err != nil {
		t.Fatalf("%v\nserver log:\n%s", err, tun.Server.Log())
	}
	if n, table := fakeTCPHubState(t, ctx, l); n != 0 || table != 0 {
		t.Fatalf("after the new server's exit the hub has %d fake-TCP devices and %d tables, want none", n, table)
	}
}

// fakeTCPHubState counts the hub's fake-TCP devices (named as
// --fake-tcp-name's default, iketcpft0; charon's libipsec has a TUN
// device of its own) and fake-TCP tables.
func fakeTCPHubState(t *testing.T, ctx context.Context, l *lab.Lab) (devices, tables int) {
	t.Helper()
	out, err := l.Hub.Run(ctx, "ip", "-o", "link", "show", "type", "tun")
	if err != nil {
		t.Fatalf("ip link: %v: %s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], "iketcpft") {
			devices++
		}
	}
	rs := nftRuleset(t, ctx, l.Hub)
	return devices, strings.Count(rs, "table inet iketcp_faketcp_")
}
