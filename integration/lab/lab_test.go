package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

const testPSK = "iketcp-lab-test-psk"

// directUDPConfigs are a site initiator and a hub responder that talk
// straight through the carrier over UDP 500/4500.
func directUDPConfigs() (site, hub IKEConfig) {
	site = IKEConfig{
		Name:        "lab",
		LocalAddrs:  SiteOuter,
		RemoteAddrs: HubOuter,
		LocalID:     "site.lab.test",
		RemoteID:    "hub.lab.test",
		PSK:         testPSK,
		LocalTS:     SiteInnerNet,
		RemoteTS:    HubInnerNet,
	}
	hub = IKEConfig{
		Name:        "lab",
		LocalAddrs:  HubOuter,
		RemoteAddrs: "%any",
		LocalID:     "hub.lab.test",
		RemoteID:    "site.lab.test",
		PSK:         testPSK,
		LocalTS:     HubInnerNet,
		RemoteTS:    SiteInnerNet,
	}
	return site, hub
}

func startDirectCharons(ctx context.Context, t *testing.T, l *Lab) (site, hub *Charon) {
	t.Helper()
	siteCfg, hubCfg := directUDPConfigs()
	hub, err := l.StartCharon(ctx, l.Hub, hubCfg)
	if err != nil {
		t.Fatalf("start hub charon: %v", err)
	}
	site, err = l.StartCharon(ctx, l.Site, siteCfg)
	if err != nil {
		t.Fatalf("start site charon: %v", err)
	}
	for _, c := range []*Charon{site, hub} {
		if comm := processComm(c.PID()); comm != "charon-systemd" {
			t.Fatalf("pid %d of the %s charon is %q, want the daemon itself", c.PID(), c.Namespace.Role, comm)
		}
	}
	return site, hub
}

// TestDirectUDPTunnel runs a site and a hub charon through the masquerading
// carrier over plain UDP and sends pings through the tunnel.
func TestDirectUDPTunnel(t *testing.T) {
	t.Parallel()
	l := NewForTest(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	if got, err := l.Ping(ctx, l.Site, "", HubOuter, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("site -> hub outer ping through the carrier: %d of 3 replies, err %v", got, err)
	}
	// The hub has no route to the site's network: only the carrier's
	// masquerading lets the site reach it.
	if got, _ := l.Ping(ctx, l.Hub, "", SiteOuter, 1, 0); got != 0 {
		t.Fatalf("hub reached %s directly; it must have no route to the site", SiteOuter)
	}

	site, hub := startDirectCharons(ctx, t, l)
	if sas, err := hub.ListSAs(ctx); err != nil || len(sas) != 0 {
		t.Fatalf("hub SAs before initiation: %+v, err %v; want none", sas, err)
	}
	start := time.Now()
	if err := site.Initiate(ctx); err != nil {
		t.Fatalf("initiate: %v", err)
	}
	t.Logf("IKE and child SA up in %s", time.Since(start).Round(time.Millisecond))

	siteSA := establishedSA(ctx, t, site)
	if !siteSA.Initiator || !siteSA.Encap || !siteSA.NATLocal {
		t.Errorf("site SA: initiator %v, encap %v, nat-local %v; want all true", siteSA.Initiator, siteSA.Encap, siteSA.NATLocal)
	}
	if siteSA.LocalHost != net.JoinHostPort(SiteOuter, "4500") || siteSA.RemoteHost != net.JoinHostPort(HubOuter, "4500") {
		t.Errorf("site SA endpoints %s -> %s; want %s:4500 -> %s:4500", siteSA.LocalHost, siteSA.RemoteHost, SiteOuter, HubOuter)
	}
	hubSA, err := hub.WaitEstablished(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := net.JoinHostPort(CarrierHub, "4500"); hubSA.RemoteHost != want {
		t.Errorf("hub sees the site at %s; want the carrier's masquerade address %s", hubSA.RemoteHost, want)
	}
	if hubSA.InitiatorSPI != siteSA.InitiatorSPI || hubSA.ResponderSPI != siteSA.ResponderSPI {
		t.Errorf("SPIs differ: site %s/%s, hub %s/%s", siteSA.InitiatorSPI, siteSA.ResponderSPI, hubSA.InitiatorSPI, hubSA.ResponderSPI)
	}
	before := siteSA.Children[0]

	got, err := l.Ping(ctx, l.Site, SiteInner, HubInner, 3, 100*time.Millisecond)
	if err != nil || got < 3 {
		t.Fatalf("ping %s -> %s through the tunnel: %d of 3 replies, err %v", SiteInner, HubInner, got, err)
	}
	after := establishedSA(ctx, t, site).Children[0]
	if after.SPIOut != before.SPIOut {
		t.Fatalf("child SA changed during the test: %s -> %s", before.SPIOut, after.SPIOut)
	}
	if after.PacketsOut < before.PacketsOut+3 || after.PacketsIn < before.PacketsIn+3 {
		t.Errorf("child SA packets in/out %d/%d -> %d/%d; want both up by at least 3",
			before.PacketsIn, before.PacketsOut, after.PacketsIn, after.PacketsOut)
	}
	if n := site.CountInLog("generating IKE_SA_INIT request"); n != 1 {
		t.Errorf("site sent %d IKE_SA_INIT requests; want 1", n)
	}
	if udp, err := l.UDPForwarded(ctx); err != nil || udp == 0 {
		t.Errorf("carrier forwarded %d UDP packets (err %v); want some", udp, err)
	}
	if dropped, err := l.UDPDropped(ctx); err != nil || dropped != 0 {
		t.Errorf("carrier dropped %d UDP packets (err %v); want none", dropped, err)
	}

	closeAndCheckGone(t, l)
}

// TestBlockedUDP checks that IKE cannot get through a carrier that drops UDP,
// and that allowing UDP again lets a fresh attempt succeed.
func TestBlockedUDP(t *testing.T) {
	t.Parallel()
	l := NewForTest(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	site, hub := startDirectCharons(ctx, t, l)

	initCtx, initCancel := context.WithTimeout(ctx, 10*time.Second)
	start := time.Now()
	err := site.Initiate(initCtx)
	initCancel()
	if err == nil {
		t.Fatal("initiate succeeded while the carrier drops UDP")
	}
	t.Logf("initiate failed after %s as expected: %v", time.Since(start).Round(time.Millisecond), firstLine(err.Error()))
	dropped, err := l.UDPDropped(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if dropped == 0 {
		t.Fatal("carrier counted no dropped UDP packets")
	}
	if n := site.CountInLog("retransmit"); n < 2 {
		t.Errorf("site logged %d retransmits; want at least 2", n)
	}
	if n := hub.CountInLog("received packet"); n != 0 {
		t.Errorf("hub received %d packets through a carrier that drops UDP", n)
	}
	t.Logf("carrier dropped %d UDP packets; site logged %d retransmits", dropped, site.CountInLog("retransmit"))

	// Abandon the half-open SA, allow UDP and start over.
	if err := site.Terminate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.AllowUDP(ctx); err != nil {
		t.Fatal(err)
	}
	retryCtx, retryCancel := context.WithTimeout(ctx, 15*time.Second)
	defer retryCancel()
	if err := site.Initiate(retryCtx); err != nil {
		t.Fatalf("initiate after AllowUDP: %v", err)
	}
	establishedSA(ctx, t, site)
	if got, err := l.UDPDropped(ctx); err != nil || got != dropped {
		t.Errorf("dropped counter moved from %d to %d (err %v) after AllowUDP", dropped, got, err)
	}
	closeAndCheckGone(t, l)
}

// TestProcesses checks Start, Stop and Kill, and that Close also ends
// processes the lab did not start itself.
func TestProcesses(t *testing.T) {
	t.Parallel()
	l := NewForTest(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	sleeper, err := l.Site.Start(ctx, "", "sleep", "300")
	if err != nil {
		t.Fatal(err)
	}
	if comm := processComm(sleeper.PID()); comm != "sleep" {
		t.Fatalf("pid %d is %q; want the program (sleep) itself", sleeper.PID(), comm)
	}
	if pids, err := l.Site.PIDs(ctx); err != nil || !slices.Contains(pids, sleeper.PID()) {
		t.Fatalf("site namespace pids %v (err %v) lack %d", pids, err, sleeper.PID())
	}
	if sleeper.Exited() {
		t.Fatal("sleep exited early")
	}
	if err := sleeper.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := sleeper.Stop(); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if !sleeper.Exited() || pidExists(sleeper.PID()) {
		t.Fatalf("pid %d still exists after Stop", sleeper.PID())
	}

	// A program that ignores SIGTERM needs Kill.
	stubborn, err := l.Hub.Start(ctx, "", "sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, func() bool { return strings.Contains(stubborn.Log(), "ready") })
	if err := stubborn.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stubborn.Done():
	default:
		t.Fatal("Done not closed after Kill")
	}
	var exitErr *exec.ExitError
	if !errors.As(stubborn.ExitErr(), &exitErr) || exitErr.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("exit status %v; want killed by SIGKILL", stubborn.ExitErr())
	}

	// Not started through the lab: Close kills it as a leftover.
	stray := l.Carrier.Command(context.Background(), "sleep", "300")
	if err := stray.Start(); err != nil {
		t.Fatal(err)
	}
	strayDone := make(chan error, 1)
	go func() { strayDone <- stray.Wait() }()

	stillRunning, err := l.Site.Start(ctx, "", "sleep", "300")
	if err != nil {
		t.Fatal(err)
	}
	closeAndCheckGone(t, l)
	select {
	case err := <-strayDone:
		if err == nil {
			t.Fatal("stray sleep exited cleanly; want killed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("stray process not ended by Close")
	}
	if pidExists(stray.Process.Pid) || pidExists(stillRunning.PID()) {
		t.Fatal("processes survived Close")
	}
	if _, err := l.Site.Start(ctx, "", "sleep", "1"); err == nil {
		t.Fatal("Start after Close succeeded")
	}
}

// TestCaptureTCP captures a TCP connection through the carrier and reads
// the client's first bytes and the reset back from the pcap.
func TestCaptureTCP(t *testing.T) {
	t.Parallel()
	l := NewForTest(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const port = 5555
	capture, err := l.Hub.Capture(ctx, HubIface, fmt.Sprintf("tcp port %d", port), "")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := l.Hub.Listen("tcp", net.JoinHostPort(HubOuter, fmt.Sprint(port)))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	received := make(chan string, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			received <- "accept: " + err.Error()
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 64)
		n, _ := readAtLeast(conn, buf, 16)
		received <- string(buf[:n])
	}()

	conn, err := l.Site.Dial(ctx, "tcp", net.JoinHostPort(HubOuter, fmt.Sprint(port)))
	if err != nil {
		t.Fatal(err)
	}
	// Two segments, so that FirstTCPPayload has to join them.
	conn.Write([]byte("hello "))
	time.Sleep(100 * time.Millisecond)
	conn.Write([]byte("iketcp lab"))
	if got := <-received; got != "hello iketcp lab" {
		t.Fatalf("server received %q", got)
	}
	conn.(*net.TCPConn).SetLinger(0) // close with a reset
	conn.Close()
	time.Sleep(100 * time.Millisecond)
	if err := capture.Stop(); err != nil {
		t.Fatal(err)
	}

	payload, err := FirstTCPPayload(capture.Path, port, 16)
	if err != nil {
		t.Fatal(err)
	}
	if string(payload) != "hello iketcp lab" {
		t.Fatalf("FirstTCPPayload = %q", payload)
	}
	if first, err := FirstTCPPayload(capture.Path, port, 5); err != nil || string(first) != "hello" {
		t.Fatalf("FirstTCPPayload(5) = %q, %v", first, err)
	}
	if _, err := FirstTCPPayload(capture.Path, port, 100); err == nil {
		t.Fatal("FirstTCPPayload asked for more bytes than were sent did not fail")
	}
	if rst, err := CountTCPFlags(capture.Path, TCPFlagRST); err != nil || rst < 1 {
		t.Fatalf("RST count %d, err %v; want at least 1", rst, err)
	}
	if syn, err := CountTCPFlags(capture.Path, TCPFlagSYN); err != nil || syn != 2 {
		t.Fatalf("SYN count %d, err %v; want 2 (SYN, SYN-ACK)", syn, err)
	}
	if tcp, err := l.TCPForwarded(ctx); err != nil || tcp < 5 {
		t.Fatalf("carrier forwarded %d TCP packets (err %v); want at least 5", tcp, err)
	}
}

// TestCleanupStale removes a namespace whose lab has no living owner and
// keeps one whose owner is this process.
func TestCleanupStale(t *testing.T) {
	Require(t)
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const prefix = "iktcstale"
	ipPath := toolPath("ip")
	dead, live := prefix+"-dead-site", prefix+"-live-site"
	liveRun := filepath.Join(runRoot, prefix+"-live")
	t.Cleanup(func() {
		runHost(context.Background(), ipPath, "netns", "del", dead)
		runHost(context.Background(), ipPath, "netns", "del", live)
		os.RemoveAll(liveRun)
		os.RemoveAll(filepath.Join(runRoot, prefix+"-dead"))
	})
	for _, ns := range []string{dead, live} {
		if _, err := runHost(ctx, ipPath, "netns", "add", ns); err != nil {
			t.Fatal(err)
		}
	}
	stamp, err := ownerStamp(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(liveRun, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(liveRun, ownerFile), []byte(stamp), 0o644); err != nil {
		t.Fatal(err)
	}
	deadRun := filepath.Join(runRoot, prefix+"-dead")
	if err := os.MkdirAll(deadRun, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(deadRun, ownerFile), []byte("999999999 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	leftover := exec.Command(ipPath, "netns", "exec", dead, "sleep", "300")
	if err := leftover.Start(); err != nil {
		t.Fatal(err)
	}
	leftoverDone := make(chan error, 1)
	go func() { leftoverDone <- leftover.Wait() }()
	waitFor(t, 5*time.Second, func() bool { return processComm(leftover.Process.Pid) == "sleep" })

	removed, err := CleanupStale(ctx, prefix)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(removed, []string{dead}) {
		t.Fatalf("removed %v; want [%s]", removed, dead)
	}
	select {
	case <-leftoverDone:
	case <-time.After(5 * time.Second):
		t.Fatal("process in the stale namespace survived")
	}
	names := netnsNames(t)
	if slices.Contains(names, dead) || !slices.Contains(names, live) {
		t.Fatalf("namespaces after cleanup: %v; want %s gone and %s kept", names, dead, live)
	}
	if _, err := os.Stat(deadRun); !os.IsNotExist(err) {
		t.Fatalf("run directory of the dead lab still there: %v", err)
	}
	if _, err := os.Stat(liveRun); err != nil {
		t.Fatalf("run directory of the live lab removed: %v", err)
	}
}

func TestParseListSAs(t *testing.T) {
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	sas, err := ParseListSAs(read("list-sas-site-established.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if len(sas) != 1 {
		t.Fatalf("got %d SAs; want 1", len(sas))
	}
	sa := sas[0]
	want := IKESA{
		Name: "lab", State: "ESTABLISHED", UniqueID: "1",
		InitiatorSPI: "f3040f969ec5d13b", ResponderSPI: "9b050d2b6709bc28",
		LocalHost: "100.64.0.2:4500", RemoteHost: "203.0.113.2:4500",
		LocalID: "site.lab", RemoteID: "hub.lab",
		Initiator: true, NATLocal: true, NATRemote: true, Encap: true,
	}
	gotHead := sa
	gotHead.Children = nil
	if fmt.Sprintf("%+v", gotHead) != fmt.Sprintf("%+v", want) {
		t.Errorf("IKE SA\n got %+v\nwant %+v", gotHead, want)
	}
	if len(sa.Children) != 1 {
		t.Fatalf("got %d child SAs; want 1", len(sa.Children))
	}
	wantChild := ChildSA{
		Name: "lab", UniqueID: "1", State: "INSTALLED", Mode: "TUNNEL", Protocol: "ESP", Encap: true,
		SPIIn: "0c1d0257", SPIOut: "4c43a6ed",
		PacketsIn: 3, PacketsOut: 3, BytesIn: 252, BytesOut: 252,
		LocalTS: []string{"198.51.100.0/24"}, RemoteTS: []string{"192.0.2.0/24"},
	}
	if fmt.Sprintf("%+v", sa.Children[0]) != fmt.Sprintf("%+v", wantChild) {
		t.Errorf("child SA\n got %+v\nwant %+v", sa.Children[0], wantChild)
	}
	if !sa.HasInstalledChild() {
		t.Error("HasInstalledChild = false")
	}

	hubSAs, err := ParseListSAs(read("list-sas-hub-established.txt"))
	if err != nil || len(hubSAs) != 1 {
		t.Fatalf("hub: %d SAs, err %v", len(hubSAs), err)
	}
	if h := hubSAs[0]; h.Initiator || h.NATLocal || !h.NATRemote || h.RemoteHost != "203.0.113.1:4500" || h.Children[0].SPIIn != "4c43a6ed" {
		t.Errorf("hub SA %+v", h)
	}

	connecting, err := ParseListSAs(read("list-sas-site-connecting.txt"))
	if err != nil || len(connecting) != 1 {
		t.Fatalf("connecting: %d SAs, err %v", len(connecting), err)
	}
	if c := connecting[0]; c.State != "CONNECTING" || c.UniqueID != "2" || len(c.Children) != 0 || c.HasInstalledChild() || c.LocalHost != "100.64.0.2:500" {
		t.Errorf("connecting SA %+v", c)
	}

	// Two SAs in one listing, as swanctl prints them: one event each.
	both := append(read("list-sas-site-connecting.txt"), read("list-sas-site-established.txt")...)
	if two, err := ParseListSAs(both); err != nil || len(two) != 2 || two[0].State != "CONNECTING" || two[1].State != "ESTABLISHED" {
		t.Errorf("two SAs: %+v, err %v", two, err)
	}

	if none, err := ParseListSAs([]byte("list-sas reply {\n}\n")); err != nil || len(none) != 0 {
		t.Errorf("empty listing: %+v, err %v", none, err)
	}
	for _, bad := range []string{"", "list-sa event {\n  lab {\n", "}\n", "list-sa event {\n  what is this\n}\n"} {
		if _, err := ParseListSAs([]byte(bad)); err == nil {
			t.Errorf("ParseListSAs(%q) did not fail", bad)
		}
	}
}

func TestSwanctlConf(t *testing.T) {
	off := false
	cfg := IKEConfig{
		Name: "t", LocalAddrs: "127.0.0.1", RemoteAddrs: "%any", LocalPort: 4500, RemotePort: 14500,
		LocalID: "a", RemoteID: "b", PSK: `p"s k`, LocalTS: "10.0.0.0/8", RemoteTS: "192.0.2.0/24",
		Mobike: &off, StartAction: "trap", DPDDelay: 1500 * time.Millisecond,
	}
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	conf := cfg.swanctlConf()
	for _, want := range []string{
		"local_addrs = 127.0.0.1", "remote_addrs = %any", "local_port = 4500", "remote_port = 14500",
		"mobike = no", "dpd_delay = 2s", "start_action = trap", "encap = yes",
		"proposals = " + IKEProposal, "esp_proposals = " + ESPProposal,
		"secret = 0x702273206b", "id-local = a", "id-remote = b",
	} {
		if !strings.Contains(conf, want) {
			t.Errorf("swanctl.conf lacks %q:\n%s", want, conf)
		}
	}
	if conf := (IKEConfig{Name: "t", PSK: "x"}).swanctlConf(); strings.Contains(conf, "mobike") || !strings.Contains(conf, "start_action = none") {
		t.Errorf("defaults:\n%s", conf)
	}
	for _, bad := range []IKEConfig{
		{PSK: "x"}, {Name: "t"}, {Name: "t", PSK: "x", LocalID: "a b"},
		{Name: "t", PSK: "x", StartAction: "route"}, {Name: "t", PSK: "x", RemotePort: 70000},
	} {
		if err := bad.validate(); err == nil {
			t.Errorf("validate(%+v) did not fail", bad)
		}
	}
}

func TestSmallParsers(t *testing.T) {
	if n, err := parsePingReceived([]byte("3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n")); err != nil || n != 2 {
		t.Errorf("parsePingReceived = %d, %v", n, err)
	}
	if _, err := parsePingReceived([]byte("ping: connect: Network is unreachable\n")); err == nil {
		t.Error("parsePingReceived accepted output without a summary")
	}
	counter := []byte(`{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "inet", "name": "udp_dropped", "table": "iketcp_lab", "handle": 1, "packets": 7, "bytes": 420}}]}`)
	if p, b, err := parseNftCounter(counter, "udp_dropped"); err != nil || p != 7 || b != 420 {
		t.Errorf("parseNftCounter = %d, %d, %v", p, b, err)
	}
	if _, _, err := parseNftCounter(counter, "tcp_forwarded"); err == nil {
		t.Error("parseNftCounter found a counter that is not there")
	}
	if got := parseNetnsList([]byte("iktc-1a2b-hub (id: 2)\niktc-1a2b-site\n")); !slices.Equal(got, []string{"iktc-1a2b-hub", "iktc-1a2b-site"}) {
		t.Errorf("parseNetnsList = %v", got)
	}
	for ns, want := range map[string]string{"iktc-1a2b-carrier": "iktc-1a2b", "iktc-x": "", "other-1a2b-site": "", "iktcx-1a2b-site": ""} {
		got, ok := labOfNamespace("iktc", ns)
		if ok != (want != "") || got != want {
			t.Errorf("labOfNamespace(%q) = %q, %v; want %q", ns, got, ok, want)
		}
	}
}

func establishedSA(ctx context.Context, t *testing.T, c *Charon) IKESA {
	t.Helper()
	sas, err := c.ListSAs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sa := range sas {
		if sa.Name == c.Config.Name && sa.State == "ESTABLISHED" && sa.HasInstalledChild() {
			return sa
		}
	}
	t.Fatalf("%s charon has no ESTABLISHED SA with an INSTALLED child: %+v", c.Namespace.Role, sas)
	return IKESA{}
}

// closeAndCheckGone closes the lab and checks that its namespaces and the
// processes it started are gone.
func closeAndCheckGone(t *testing.T, l *Lab) {
	t.Helper()
	procs := l.Processes()
	if err := l.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	names := netnsNames(t)
	for _, ns := range l.Namespaces() {
		if slices.Contains(names, ns.Name) {
			t.Errorf("namespace %s left after Close", ns.Name)
		}
	}
	for _, p := range procs {
		if !p.Exited() || pidExists(p.PID()) {
			t.Errorf("%s (pid %d) left after Close", p.Name(), p.PID())
		}
	}
	if _, err := os.Stat(l.Dir); !os.IsNotExist(err) {
		t.Errorf("lab directory %s left after Close", l.Dir)
	}
	if _, err := os.Stat(filepath.Join(runRoot, l.Name)); !os.IsNotExist(err) {
		t.Errorf("run directory of %s left after Close", l.Name)
	}
}

func netnsNames(t *testing.T) []string {
	t.Helper()
	out, err := runHost(context.Background(), toolPath("ip"), "netns", "list")
	if err != nil {
		t.Fatal(err)
	}
	return parseNetnsList(out)
}

func processComm(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func pidExists(pid int) bool {
	_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	return err == nil
}

func waitFor(t *testing.T, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s", limit)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func readAtLeast(conn net.Conn, buf []byte, min int) (int, error) {
	n := 0
	for n < min {
		m, err := conn.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// TestNewCleansUpOnError cancels New at several points and checks that no
// namespace or run directory is left behind.
func TestNewCleansUpOnError(t *testing.T) {
	Require(t)
	const prefix = "iktcfail"
	for _, after := range []time.Duration{5 * time.Millisecond, 40 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond} {
		ctx, cancel := context.WithTimeout(context.Background(), after)
		l, err := New(ctx, Options{Dir: t.TempDir(), Prefix: prefix})
		cancel()
		if err == nil {
			// Fast machine: the whole lab was up in time.
			closeAndCheckGone(t, l)
			continue
		}
		t.Logf("cancelled after %s: %v", after, firstLine(err.Error()))
		if l != nil {
			t.Fatalf("New returned a lab with error %v", err)
		}
		for _, ns := range netnsNames(t) {
			if strings.HasPrefix(ns, prefix+"-") {
				t.Fatalf("New cancelled after %s left namespace %s (error was %v)", after, ns, err)
			}
		}
		entries, _ := os.ReadDir(runRoot)
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), prefix+"-") {
				t.Fatalf("New cancelled after %s left %s", after, filepath.Join(runRoot, e.Name()))
			}
		}
	}
}

// TestCleanupStaleSparesAClaim: a run directory created a moment ago
// whose owner file is not yet written is a lab being claimed by another
// process, and stays; one that old without an owner is stale, and goes.
func TestCleanupStaleSparesAClaim(t *testing.T) {
	Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const prefix = "iktcclaim"
	if err := os.MkdirAll(runRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp(runRoot, prefix+"-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if _, err := CleanupStale(ctx, prefix); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("a lab being claimed was removed: %v", err)
	}
	old := time.Now().Add(-2 * time.Minute)
	if err := os.Chtimes(dir, old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := CleanupStale(ctx, prefix); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a stale run directory without an owner stayed: %v", err)
	}
}
