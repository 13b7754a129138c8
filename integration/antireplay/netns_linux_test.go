//go:build linux

package antireplay

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/nattest"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The test builds three anonymous network namespaces, gone with their
// last descriptor or thread even if the test binary dies:
//
//	left 100.64.0.2/24 ---- 100.64.0.1 | mid | 203.0.113.1 ---- 203.0.113.2/24 right
//
// mid forwards, queues every forwarded TCP segment to NFQUEUE 7 and runs
// the tracker there. mid routes 203.0.113.99 (the sink) to right, which
// does not forward it: segments to the sink reach right's interface,
// where the test sees them, and get no answer that could disturb the
// tracker.
var (
	leftAddr  = netip.MustParseAddr("100.64.0.2")
	midLeft   = netip.MustParseAddr("100.64.0.1")
	midRight  = netip.MustParseAddr("203.0.113.1")
	rightAddr = netip.MustParseAddr("203.0.113.2")
	sinkAddr  = netip.MustParseAddr("203.0.113.99")
)

const testQueue = 7

// testWindow lets the real connection's segments through when the
// forwarding namespace reorders them (two CPUs feed the queue): with a
// window of 0 the earlier segment of a reordered pair is dropped as
// backwards, and so is every retransmission of it, which stalls the
// connection for good.
const testWindow = 1 << 20

// noTailLossProbes turns off the kernel's tail loss probes in the calling
// thread's namespace. A probe resends the last segment when its ACK is
// late, which it is whenever the middlebox is slow; the strict middlebox
// drops the copy as a repeat (harmlessly: the original passed), but the
// test wants to see no drop at all from a real connection.
func noTailLossProbes() error {
	return os.WriteFile("/proc/sys/net/ipv4/tcp_early_retrans", []byte("0"), 0)
}

// requireRoot skips a test that needs root and iptables, and fails it
// instead under CI=true.
func requireRoot(t *testing.T) string {
	t.Helper()
	missing := nattest.Missing()
	ipt := iptablesPath()
	if ipt == "" {
		missing = append(missing, "iptables-legacy or iptables-nft (Debian package iptables)")
	}
	nattest.SkipOrFail(t, missing, "to build network namespaces with an NFQUEUE rule")
	return ipt
}

// iptablesPath prefers iptables-legacy: it leaves the namespace's
// nftables ruleset alone.
func iptablesPath() string {
	for _, name := range []string{"iptables-legacy", "iptables-nft"} {
		for _, dir := range []string{"", "/usr/sbin/", "/sbin/"} {
			if p, err := exec.LookPath(dir + name); err == nil {
				return p
			}
		}
	}
	return ""
}

type topology struct{ left, mid, right *nattest.NS }

func newTopology(t *testing.T) *topology {
	t.Helper()
	tp := &topology{left: nattest.New(t), mid: nattest.New(t), right: nattest.New(t)}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(tp.mid.Do(func() error {
		for _, v := range []struct {
			name, peer string
			ns         *nattest.NS
			addr       netip.Addr
		}{{"m-left", "l0", tp.left, midLeft}, {"m-right", "r0", tp.right, midRight}} {
			veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: v.name}, PeerName: v.peer, PeerNamespace: netlink.NsFd(v.ns.Fd())}
			if err := netlink.LinkAdd(veth); err != nil {
				return fmt.Errorf("add veth %s: %w", v.name, err)
			}
			if err := upWithAddr(v.name, v.addr); err != nil {
				return err
			}
		}
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{Dst: hostPrefix(sinkAddr), Gw: rightAddr.AsSlice()})
	}))
	must(tp.left.Do(func() error {
		return errors.Join(upWithAddr("l0", leftAddr), noTailLossProbes(),
			netlink.RouteAdd(&netlink.Route{Dst: net24(rightAddr), Gw: midLeft.AsSlice()}))
	}))
	must(tp.right.Do(func() error {
		return errors.Join(upWithAddr("r0", rightAddr), noTailLossProbes(),
			netlink.RouteAdd(&netlink.Route{Dst: net24(leftAddr), Gw: midRight.AsSlice()}))
	}))
	for _, c := range []struct {
		ns   *nattest.NS
		link string
	}{{tp.left, "l0"}, {tp.right, "r0"}} {
		must(c.ns.Do(func() error { return waitOperUp(c.link) }))
	}
	return tp
}

func upWithAddr(name string, a netip.Addr) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return err
	}
	return netlink.AddrAdd(link, &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(24, 32)}})
}

func waitOperUp(name string) error {
	for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(10 * time.Millisecond) {
		link, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		if link.Attrs().OperState == netlink.OperUp {
			return nil
		}
	}
	return fmt.Errorf("%s did not come up within 5s", name)
}

func hostPrefix(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(32, 32)}
}

func net24(a netip.Addr) *net.IPNet {
	p := netip.PrefixFrom(a, 24).Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(24, 32)}
}

// middlebox opens the queue in mid, then installs the rule that feeds it,
// and runs the tracker until the test ends.
func (tp *topology) middlebox(t *testing.T, ipt string, cfg Config) (*Tracker, *Queue) {
	t.Helper()
	var q *Queue
	if err := tp.mid.Do(func() (err error) {
		q, err = OpenQueue(testQueue)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	rule := []string{"FORWARD", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", fmt.Sprint(testQueue)}
	if err := tp.mid.Do(func() error {
		out, err := exec.Command(ipt, append([]string{"-w", "5", "-A"}, rule...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s -A %s: %w: %s", ipt, strings.Join(rule, " "), err, out)
		}
		return nil
	}); err != nil {
		q.Close()
		t.Fatal(err)
	}
	tr := NewTracker(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- Run(ctx, q, tr) }()
	t.Cleanup(func() {
		// The rule goes first, so that nothing meets an unbound queue.
		if err := tp.mid.Do(func() error {
			out, err := exec.Command(ipt, append([]string{"-w", "5", "-D"}, rule...)...).CombinedOutput()
			if err != nil {
				return fmt.Errorf("%s -D: %w: %s", ipt, err, out)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
		cancel()
		select {
		case err := <-runErr:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return within 10s of its context's end")
		}
		if err := q.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return tr, q
}

func TestMiddleboxInNamespaces(t *testing.T) {
	ipt := requireRoot(t)
	tp := newTopology(t)
	tr, q := tp.middlebox(t, ipt, Config{Window: testWindow})

	// A real kernel TCP connection through mid: data both ways.
	var ln net.Listener
	if err := tp.right.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(rightAddr, 0).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	serverErr := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		serverErr <- echoOnce(ln)
	}()
	var conn net.Conn
	if err := tp.left.Do(func() (err error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var d net.Dialer
		conn, err = d.DialContext(ctx, "tcp", ln.Addr().String())
		return err
	}); err != nil {
		t.Fatalf("dial through the middlebox: %v", err)
	}
	if err := exchange(conn, 256<<10); err != nil {
		t.Fatalf("data through the middlebox: %v (tracker %+v, queue %+v)", err, tr.Stats(), q.Stats())
	}
	conn.Close()
	if err := <-serverErr; err != nil {
		t.Fatalf("echo server: %v", err)
	}
	before := settled(t, tr)
	if before.Dropped() != 0 || before.Accepted < 20 {
		t.Fatalf("real TCP connection: tracker %+v; want nothing dropped and many segments accepted", before)
	}
	if qs := q.Stats(); qs.Packets < before.Accepted || qs.VerdictErrors != 0 || qs.BadMessages != 0 {
		t.Fatalf("queue %+v after %d accepted segments", qs, before.Accepted)
	}
	t.Logf("real connection: tracker %+v, queue %+v", before, q.Stats())

	// Hand-made segments from left to the sink: a flow with repeated and
	// backward sequence numbers, and one the middlebox never saw start.
	sniffer := tp.sniff(t, "r0")
	src := netip.AddrPortFrom(leftAddr, 40001)
	dst := netip.AddrPortFrom(sinkAddr, 443)
	stray := netip.AddrPortFrom(leftAddr, 40002)
	const isn = 0x1000_0000
	crafted := []struct {
		seg  Segment
		want string
	}{
		{Segment{Src: src, Dst: dst, Seq: isn, Flags: FlagSYN}, ReasonAccepted},
		{Segment{Src: src, Dst: dst, Seq: isn + 1, Flags: FlagACK}, ReasonAccepted},
		{Segment{Src: src, Dst: dst, Seq: isn + 1, Flags: FlagACK | FlagPSH, Payload: marker(2)}, ReasonAccepted},
		{Segment{Src: src, Dst: dst, Seq: isn + 1, Flags: FlagACK | FlagPSH, Payload: marker(3)}, ReasonRepeat},
		{Segment{Src: src, Dst: dst, Seq: isn + 1, Flags: FlagACK | FlagPSH, Payload: marker(4)}, ReasonRepeat},
		{Segment{Src: src, Dst: dst, Seq: isn + 101, Flags: FlagACK | FlagPSH, Payload: marker(5)}, ReasonAccepted},
		{Segment{Src: src, Dst: dst, Seq: isn + 101 - testWindow - 1, Flags: FlagACK | FlagPSH, Payload: marker(6)}, ReasonBackwards},
		{Segment{Src: stray, Dst: dst, Seq: 77, Flags: FlagACK | FlagPSH, Payload: marker(7)}, ReasonNoSession},
		{Segment{Src: src, Dst: dst, Seq: isn + 201, Flags: FlagRST}, ReasonAccepted},
		{Segment{Src: src, Dst: dst, Seq: isn + 201, Flags: FlagACK | FlagPSH, Payload: marker(9)}, ReasonNoSession},
	}
	raw := tp.rawSocket(t)
	var wantSeen []int
	for i, c := range crafted {
		pkt, err := c.seg.Append(nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Sendto(raw, pkt, 0, &unix.SockaddrInet4{Addr: sinkAddr.As4()}); err != nil {
			t.Fatalf("send crafted segment %d: %v", i, err)
		}
		if c.want == ReasonAccepted && len(c.seg.Payload) > 0 {
			wantSeen = append(wantSeen, i)
		}
	}
	// Every crafted segment gets its verdict.
	deadline := time.Now().Add(5 * time.Second)
	for {
		st := tr.Stats()
		if st.Accepted+st.Dropped()-before.Accepted >= uint64(len(crafted)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 5s the tracker has seen %d of %d crafted segments: %+v",
				st.Accepted+st.Dropped()-before.Accepted, len(crafted), st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	after := tr.Stats()
	if got := after.Accepted - before.Accepted; got != 5 {
		t.Errorf("accepted %d crafted segments, want 5 (SYN, ACK, 2 data, RST)", got)
	}
	if after.DroppedRepeat != 2 || after.DroppedBackwards != 1 || after.DroppedNoSession != 2 || after.Dropped() != 5 {
		t.Errorf("drops %v; want 2 repeat, 1 backwards, 2 no_session", after.Map())
	}
	// And only the accepted data segments reach right.
	seen := sniffer.markers(t, len(wantSeen))
	if !slices.Equal(seen, wantSeen) {
		t.Errorf("crafted data segments seen behind the middlebox: %v, want %v", seen, wantSeen)
	}
}

// settled waits (at most 5 s) until the tracker's counters stay the same
// for 200 ms, so that the last ACKs of a closed connection are counted,
// and returns them.
func settled(t *testing.T, tr *Tracker) Stats {
	t.Helper()
	last := tr.Stats()
	stable := time.Now()
	for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(20 * time.Millisecond) {
		cur := tr.Stats()
		if cur != last {
			last, stable = cur, time.Now()
		} else if time.Since(stable) >= 200*time.Millisecond {
			return cur
		}
	}
	t.Fatalf("the tracker's counters keep changing: %+v", last)
	return last
}

// marker is a crafted segment's payload: "antireplay-NN" and padding.
func marker(i int) []byte {
	return append(fmt.Appendf(nil, "antireplay-%02d", i), bytes.Repeat([]byte{'.'}, 87)...)
}

// echoOnce accepts one connection and echoes it until EOF.
func echoOnce(ln net.Listener) error {
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	_, err = io.Copy(c, c)
	return err
}

// exchange writes n bytes on conn (half-closing it after) and reads the
// echo back, within 20 s.
func exchange(conn net.Conn, n int) error {
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	data := make([]byte, n)
	for i := range data {
		data[i] = byte(i * 7)
	}
	werr := make(chan error, 1)
	go func() {
		_, err := conn.Write(data)
		if err == nil {
			err = conn.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	got, rerr := io.ReadAll(conn)
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if rerr != nil {
		return fmt.Errorf("read after %d bytes: %w", len(got), rerr)
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("echo of %d bytes came back as %d different bytes", n, len(got))
	}
	return nil
}

// rawSocket opens a raw IPv4 socket (IP_HDRINCL) in left.
func (tp *topology) rawSocket(t *testing.T) int {
	t.Helper()
	fd := -1
	if err := tp.left.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		return err
	}); err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// sniffer reads IPv4 packets arriving on one interface.
type sniffer struct{ fd int }

func (tp *topology) sniff(t *testing.T, iface string) *sniffer {
	t.Helper()
	s := &sniffer{fd: -1}
	if err := tp.right.Do(func() error {
		link, err := netlink.LinkByName(iface)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_IP))
		s.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		if err := unix.SetsockoptTimeval(s.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100_000}); err != nil {
			return err
		}
		return unix.Bind(s.fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: link.Attrs().Index})
	}); err != nil {
		if s.fd >= 0 {
			unix.Close(s.fd)
		}
		t.Fatalf("packet socket on %s: %v", iface, err)
	}
	t.Cleanup(func() { unix.Close(s.fd) })
	return s
}

// markers returns the numbers of the crafted data segments that arrived,
// in order, reading until want arrived and then 300 ms more (at most 5 s).
func (s *sniffer) markers(t *testing.T, want int) []int {
	t.Helper()
	var seen []int
	buf := make([]byte, 2048)
	deadline := time.Now().Add(5 * time.Second)
	var quietUntil time.Time
	for i := 0; i < 10000 && time.Now().Before(deadline); i++ {
		if len(seen) >= want && quietUntil.IsZero() {
			quietUntil = time.Now().Add(300 * time.Millisecond)
		}
		if !quietUntil.IsZero() && time.Now().After(quietUntil) {
			break
		}
		n, _, err := unix.Recvfrom(s.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			t.Fatalf("sniff: %v", err)
		}
		pkt := buf[:n]
		if n < 40 || pkt[9] != protoTCP || netip.AddrFrom4([4]byte(pkt[16:20])) != sinkAddr {
			continue
		}
		ihl := int(pkt[0]&0x0f) * 4
		doff := int(pkt[ihl+12]>>4) * 4
		payload := pkt[ihl+doff:]
		if rest, ok := bytes.CutPrefix(payload, []byte("antireplay-")); ok && len(rest) >= 2 {
			if m, err := strconv.Atoi(string(rest[:2])); err == nil {
				seen = append(seen, m)
			}
		}
	}
	return seen
}

func htons(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// kernelQueues lists the queue numbers bound in ns, as the kernel reports
// them in /proc/thread-self/net/netfilter/nfnetlink_queue.
func kernelQueues(t *testing.T, ns *nattest.NS) []string {
	t.Helper()
	var queues []string
	if err := ns.Do(func() error {
		b, err := os.ReadFile("/proc/thread-self/net/netfilter/nfnetlink_queue")
		if err != nil {
			return err
		}
		for line := range strings.Lines(string(b)) {
			if f := strings.Fields(line); len(f) > 0 {
				queues = append(queues, f[0])
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return queues
}

// TestQueueLifecycle: one binding per queue number, one Run per Queue,
// and unbinding on both ways out.
func TestQueueLifecycle(t *testing.T) {
	requireRoot(t)
	ns := nattest.New(t)
	open := func() (*Queue, error) {
		var q *Queue
		err := ns.Do(func() (err error) {
			q, err = OpenQueue(9)
			return err
		})
		return q, err
	}
	q, err := open()
	if err != nil {
		t.Fatal(err)
	}
	if got := kernelQueues(t, ns); !slices.Equal(got, []string{"9"}) {
		t.Fatalf("kernel's queues after OpenQueue: %v, want [9]", got)
	}
	if q2, err := open(); err == nil || !strings.Contains(err.Error(), "another program") {
		if q2 != nil {
			q2.Close()
		}
		t.Fatalf("second OpenQueue(9): %v; want an error naming another program", err)
	}

	// Two Runs at once: one is refused.
	ctx, cancel := context.WithCancel(context.Background())
	results := make(chan error, 2)
	for range 2 {
		go func() { results <- Run(ctx, q, NewTracker(Config{})) }()
	}
	var refused error
	select {
	case refused = <-results:
	case <-time.After(5 * time.Second):
		cancel()
		t.Fatal("neither Run returned within 5s")
	}
	cancel()
	served := <-results
	if refused == nil || !strings.Contains(refused.Error(), "already served") || served != nil {
		t.Fatalf("two Runs: %v and %v; want one refused as already served and one nil", refused, served)
	}
	// The Run that served unbound the queue on its way out.
	if got := kernelQueues(t, ns); len(got) != 0 {
		t.Fatalf("kernel's queues after Run: %v, want none", got)
	}
	if err := Run(context.Background(), q, NewTracker(Config{})); err == nil {
		t.Fatal("Run on a queue a Run has unbound: no error")
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := q.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	// Close without Run unbinds too, and the number is free again.
	q, err = open()
	if err != nil {
		t.Fatalf("OpenQueue(9) after the first was unbound: %v", err)
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if got := kernelQueues(t, ns); len(got) != 0 {
		t.Fatalf("kernel's queues after Close: %v, want none", got)
	}
}

// TestQueueFailsClosed: with the rule in place, TCP does not pass while
// nobody answers the queue, nor once it is unbound (no fail-open, no
// --queue-bypass).
func TestQueueFailsClosed(t *testing.T) {
	ipt := requireRoot(t)
	tp := newTopology(t)
	var q *Queue
	if err := tp.mid.Do(func() (err error) {
		q, err = OpenQueue(testQueue)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if err := tp.mid.Do(func() error {
		out, err := exec.Command(ipt, "-w", "5", "-A", "FORWARD", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", fmt.Sprint(testQueue)).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	if err := tp.right.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(rightAddr, 0).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dial := func() error {
		return tp.left.Do(func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
			if err == nil {
				c.Close()
			}
			return err
		})
	}
	if err := dial(); err == nil {
		t.Fatal("connected through a queue that nobody answers")
	}
	if err := q.Close(); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err == nil {
		t.Fatal("connected through an NFQUEUE rule whose queue is unbound")
	}
}
