package lab

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/antireplay"
	"golang.org/x/sys/unix"
)

// requireIptables skips a middlebox test where no iptables is installed,
// and fails it instead under CI=true.
func requireIptables(t *testing.T) {
	t.Helper()
	for _, name := range middleboxIptables {
		if toolPath(name) != "" {
			return
		}
	}
	msg := "the strict middlebox needs iptables-legacy (install with make deps, or apt-get install iptables)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// TestStrictMiddlebox runs a real TCP connection from the site to the hub
// through the carrier's strict middlebox, then hand-made segments that
// repeat or go back in sequence, and checks what passes and what the
// middlebox counts.
func TestStrictMiddlebox(t *testing.T) {
	t.Parallel()
	l := NewForTest(t, Options{})
	requireIptables(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// See the window and the probes in the antireplay package's own
	// namespace test: the carrier may reorder a real connection's
	// segments, and a tail loss probe is a repeat by design.
	for _, ns := range []*Namespace{l.Site, l.Hub} {
		if err := ns.Do(func() error {
			return os.WriteFile("/proc/sys/net/ipv4/tcp_early_retrans", []byte("0"), 0)
		}); err != nil {
			t.Fatalf("turn off tail loss probes in %s: %v", ns.Role, err)
		}
	}
	const window = 1 << 20
	mb, err := l.StartStrictMiddlebox(ctx, antireplay.Config{Window: window})
	if err != nil {
		t.Fatal(err)
	}

	// A real connection: data both ways, nothing dropped, and the
	// masquerade still in place.
	hubSaw := echoThroughCarrier(ctx, t, l)
	if hubSaw != CarrierHub {
		t.Errorf("hub saw the site at %s; want the carrier's masquerade address %s", hubSaw, CarrierHub)
	}
	before := settledStats(t, mb)
	if before.Dropped() != 0 || before.Accepted < 10 {
		t.Fatalf("real TCP connection through the middlebox: %v; want nothing dropped and at least 10 segments accepted", before.Map())
	}
	if qs := mb.QueueStats(); qs.Packets != before.Accepted || qs.VerdictErrors != 0 {
		t.Errorf("queue %+v; want one verdict per accepted segment (%d) and no refused verdicts", qs, before.Accepted)
	}
	if tcp, err := l.TCPForwarded(ctx); err != nil || tcp < before.Accepted {
		t.Errorf("carrier's tcp_forwarded counter %d (err %v); want at least the %d segments the middlebox accepted", tcp, err, before.Accepted)
	}
	checkUDPStillBlocked(ctx, t, l)

	// Hand-made segments to an address behind the carrier that nothing
	// answers: FortiOS-style repeats of one sequence number, and a step
	// back.
	src := netip.AddrPortFrom(netip.MustParseAddr(SiteOuter), 40001)
	dst := netip.MustParseAddrPort("203.0.113.99:443")
	data := bytes.Repeat([]byte("esp-in-tcp "), 10)
	const isn = 0x2000_0000
	next := isn + 1 + uint32(len(data))
	psh := uint8(antireplay.FlagACK | antireplay.FlagPSH)
	segs := []antireplay.Segment{
		{Src: src, Dst: dst, Seq: isn, Flags: antireplay.FlagSYN},
		{Src: src, Dst: dst, Seq: isn + 1, Flags: psh, Payload: data},
		{Src: src, Dst: dst, Seq: isn + 1, Flags: psh, Payload: data},
		{Src: src, Dst: dst, Seq: isn + 1, Flags: psh, Payload: data},
		{Src: src, Dst: dst, Seq: isn + 1, Flags: psh, Payload: data},
		{Src: src, Dst: dst, Seq: next, Flags: psh, Payload: data},
		{Src: src, Dst: dst, Seq: next - window - 1, Flags: psh, Payload: data},
	}
	sendRaw(t, l.Site, segs)
	waitFor(t, 5*time.Second, func() bool {
		st := mb.Stats()
		return st.Accepted+st.Dropped()-before.Accepted >= uint64(len(segs))
	})
	after := mb.Stats()
	if got := after.Accepted - before.Accepted; got != 3 {
		t.Errorf("accepted %d hand-made segments, want 3 (SYN, two data segments)", got)
	}
	if after.DroppedRepeat != 3 || after.DroppedBackwards != 1 || after.Dropped() != 4 {
		t.Errorf("drops %v; want 3 repeat and 1 backwards", after.Map())
	}
	if mb.Err() != nil {
		t.Fatalf("middlebox stopped serving: %v", mb.Err())
	}

	// Stop removes the rule: TCP flows without the middlebox.
	if err := mb.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	select {
	case <-mb.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	if out, err := l.Carrier.Run(ctx, mb.iptables, "-w", "5", "-S", "FORWARD"); err != nil || strings.Contains(string(out), "NFQUEUE") {
		t.Fatalf("carrier's FORWARD chain after Stop (err %v):\n%s", err, out)
	}
	echoThroughCarrier(ctx, t, l)
	if st := mb.Stats(); st.Accepted != after.Accepted {
		t.Errorf("the stopped middlebox still counted segments: %v", st.Map())
	}

	// A second middlebox binds the same queue again; Close stops it.
	mb2, err := l.StartStrictMiddlebox(ctx, antireplay.Config{Window: 1 << 16})
	if err != nil {
		t.Fatalf("second middlebox: %v", err)
	}
	echoThroughCarrier(ctx, t, l)
	closeAndCheckGone(t, l)
	select {
	case <-mb2.Done():
	default:
		t.Fatal("Close left the second middlebox running")
	}
	if err := mb2.Stop(); err != nil {
		t.Errorf("Stop after Close: %v", err)
	}
}

// echoThroughCarrier connects from the site to a listener in the hub,
// reads the hub's greeting, sends 128 KiB that the hub echoes, and returns
// the address the hub saw the site at.
func echoThroughCarrier(ctx context.Context, t *testing.T, l *Lab) string {
	t.Helper()
	ln, err := l.Hub.Listen("tcp", net.JoinHostPort(HubOuter, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		peer string
		err  error
	}
	served := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			served <- result{err: err}
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		host, _, _ := net.SplitHostPort(conn.RemoteAddr().String())
		if _, err := conn.Write([]byte("hub greeting\n")); err != nil {
			served <- result{host, err}
			return
		}
		_, err = io.Copy(conn, conn)
		served <- result{host, err}
	}()
	conn, err := l.Site.Dial(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dial the hub through the carrier: %v", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	greeting := make([]byte, len("hub greeting\n"))
	if _, err := io.ReadFull(conn, greeting); err != nil || string(greeting) != "hub greeting\n" {
		t.Fatalf("greeting from the hub: %q, %v", greeting, err)
	}
	payload := make([]byte, 128<<10)
	for i := range payload {
		payload[i] = byte(i * 13)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := conn.Write(payload)
		if err == nil {
			err = conn.(*net.TCPConn).CloseWrite()
		}
		wrote <- err
	}()
	echo, rerr := io.ReadAll(conn)
	if err := <-wrote; err != nil {
		t.Fatalf("write to the hub: %v", err)
	}
	if rerr != nil || !bytes.Equal(echo, payload) {
		t.Fatalf("echo from the hub: %d of %d bytes, equal %v, err %v", len(echo), len(payload), bytes.Equal(echo, payload), rerr)
	}
	r := <-served
	if r.err != nil {
		t.Fatalf("hub side: %v", r.err)
	}
	return r.peer
}

// checkUDPStillBlocked blocks UDP at the carrier, sends a datagram from
// the site and waits for the carrier's drop counter to count it.
func checkUDPStillBlocked(ctx context.Context, t *testing.T, l *Lab) {
	t.Helper()
	before, err := l.UDPDropped(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := l.AllowUDP(ctx); err != nil {
			t.Error(err)
		}
	}()
	pc, err := l.Site.ListenPacket("udp", net.JoinHostPort(SiteOuter, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	to := &net.UDPAddr{IP: net.ParseIP(HubOuter), Port: 9}
	if _, err := pc.WriteTo([]byte("blocked"), to); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, func() bool {
		n, err := l.UDPDropped(ctx)
		return err == nil && n > before
	})
}

// sendRaw sends segments from a raw IPv4 socket in ns, in order.
func sendRaw(t *testing.T, ns *Namespace, segs []antireplay.Segment) {
	t.Helper()
	fd := -1
	if err := ns.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		return err
	}); err != nil {
		t.Fatalf("raw socket in %s: %v", ns.Role, err)
	}
	defer unix.Close(fd)
	for i, s := range segs {
		pkt, err := s.Append(nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: s.Dst.Addr().As4()}); err != nil {
			t.Fatalf("send segment %d from %s: %v", i, ns.Role, err)
		}
	}
}

// settledStats waits (at most 5 s) until the middlebox's counters stay the
// same for 200 ms, so that a closed connection's last ACKs are counted.
func settledStats(t *testing.T, mb *Middlebox) antireplay.Stats {
	t.Helper()
	last, stable := mb.Stats(), time.Now()
	for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(20 * time.Millisecond) {
		if cur := mb.Stats(); cur != last {
			last, stable = cur, time.Now()
		} else if time.Since(stable) >= 200*time.Millisecond {
			return cur
		}
	}
	t.Fatalf("the middlebox's counters keep changing: %v", fmt.Sprint(last.Map()))
	return last
}
