package antireplay

import (
	"fmt"
	"net/netip"
	"testing"
	"time"
)

var (
	client = netip.MustParseAddrPort("100.64.0.2:40000")
	server = netip.MustParseAddrPort("203.0.113.2:443")
	t0     = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
)

// step is one segment through the tracker and the verdict expected for it.
type step struct {
	fromServer bool
	seq        uint32
	flags      uint8
	payload    int
	after      time.Duration // since the previous step
	want       string        // a Reason
}

func (s step) packet(t *testing.T, c, sv netip.AddrPort) []byte {
	t.Helper()
	seg := Segment{Src: c, Dst: sv, Seq: s.seq, Flags: s.flags, Payload: make([]byte, s.payload)}
	if s.fromServer {
		seg.Src, seg.Dst = sv, c
	}
	pkt, err := seg.Append(nil)
	if err != nil {
		t.Fatal(err)
	}
	return pkt
}

// handshake is a SYN from the client with ISN 1000, the server's SYN-ACK
// with ISN 5000, and the client's ACK.
var handshake = []step{
	{seq: 1000, flags: FlagSYN, want: ReasonAccepted},
	{fromServer: true, seq: 5000, flags: FlagSYN | FlagACK, want: ReasonAccepted},
	{seq: 1001, flags: FlagACK, want: ReasonAccepted},
}

func steps(parts ...[]step) []step {
	var all []step
	for _, p := range parts {
		all = append(all, p...)
	}
	return all
}

// liveStream sends n data segments of size bytes from the client starting
// at seq, each acknowledged by the server, as a real TCP stack does.
func liveStream(seq uint32, n, size int) []step {
	var s []step
	for i := range n {
		s = append(s,
			step{seq: seq + uint32(i*size), flags: FlagACK | FlagPSH, payload: size, want: ReasonAccepted},
			step{fromServer: true, seq: 5001, flags: FlagACK, want: ReasonAccepted})
	}
	return s
}

// frozenStream is FortiOS's proprietary ESP over TCP: every ESP packet in
// an ACK segment with the same sequence number.
func frozenStream(seq uint32, n int) []step {
	var s []step
	for i := range n {
		want := ReasonRepeat
		if i == 0 {
			want = ReasonAccepted
		}
		s = append(s, step{seq: seq, flags: FlagACK, payload: 120 + i, want: want})
	}
	return s
}

func TestTrackerRules(t *testing.T) {
	tests := []struct {
		name  string
		cfg   Config
		steps []step
	}{
		{"live-seq stream passes", Config{}, steps(handshake, liveStream(1001, 50, 1200))},
		{"live-seq stream both ways", Config{}, steps(handshake, []step{
			{seq: 1001, flags: FlagACK, payload: 100, want: ReasonAccepted},
			{fromServer: true, seq: 5001, flags: FlagACK, payload: 300, want: ReasonAccepted},
			{seq: 1101, flags: FlagACK, payload: 100, want: ReasonAccepted},
			{fromServer: true, seq: 5301, flags: FlagACK, payload: 300, want: ReasonAccepted},
		})},
		{"frozen FortiOS-style stream: all but the first data segment dropped", Config{}, steps(handshake, frozenStream(1001, 20))},
		{"frozen stream dropped whatever the window", Config{Window: 1 << 20}, steps(handshake, frozenStream(1001, 5))},
		{"frozen stream from the server too", Config{}, steps(handshake, []step{
			{fromServer: true, seq: 5001, flags: FlagACK, payload: 80, want: ReasonAccepted},
			{fromServer: true, seq: 5001, flags: FlagACK, payload: 80, want: ReasonRepeat},
			{seq: 1001, flags: FlagACK, payload: 80, want: ReasonAccepted}, // the other direction is its own
		})},
		{"directions are separate: same seq numbers both ways", Config{}, []step{
			{seq: 7000, flags: FlagSYN, want: ReasonAccepted},
			{fromServer: true, seq: 7000, flags: FlagSYN | FlagACK, want: ReasonAccepted},
			{seq: 7001, flags: FlagACK, payload: 10, want: ReasonAccepted},
			{fromServer: true, seq: 7001, flags: FlagACK, payload: 10, want: ReasonAccepted},
		}},
		{"pure ACKs with a frozen seq are never dropped", Config{}, steps(handshake, []step{
			{seq: 1001, flags: FlagACK, want: ReasonAccepted},
			{seq: 1001, flags: FlagACK, want: ReasonAccepted},
			{seq: 1001, flags: FlagACK, payload: 1, want: ReasonAccepted},
			{seq: 1001, flags: FlagACK, want: ReasonAccepted},
			{seq: 1000, flags: FlagACK, want: ReasonAccepted}, // keepalive: snd.una-1
		})},
		{"backwards beyond a zero window", Config{}, steps(handshake, []step{
			{seq: 1001, flags: FlagACK, payload: 100, want: ReasonAccepted},
			{seq: 1101, flags: FlagACK, payload: 100, want: ReasonAccepted},
			{seq: 1001, flags: FlagACK, payload: 100, want: ReasonBackwards}, // a retransmission, strictly
			{seq: 1100, flags: FlagACK, payload: 1, want: ReasonBackwards},
			{seq: 1201, flags: FlagACK, payload: 100, want: ReasonAccepted},
		})},
		{"data before the SYN's ISN is backwards", Config{}, steps(handshake, []step{
			{seq: 900, flags: FlagACK, payload: 10, want: ReasonBackwards},
		})},
		{"reordering within the window", Config{Window: 3000}, steps(handshake, []step{
			{seq: 1001, flags: FlagACK, payload: 1000, want: ReasonAccepted},
			{seq: 3001, flags: FlagACK, payload: 1000, want: ReasonAccepted},
			{seq: 2001, flags: FlagACK, payload: 1000, want: ReasonAccepted}, // late, 1000 behind
			{seq: 4001, flags: FlagACK, payload: 1000, want: ReasonAccepted},
			{seq: 1001, flags: FlagACK, payload: 1000, want: ReasonAccepted}, // 3000 behind: the edge
			{seq: 1000, flags: FlagACK, payload: 1, want: ReasonBackwards},   // 3001 behind
			{seq: 1001, flags: FlagACK, payload: 1000, want: ReasonRepeat},   // the previous one again
		})},
		{"wraparound of the sequence space", Config{}, []step{
			{seq: 0xffff_fc00, flags: FlagSYN, want: ReasonAccepted},
			{fromServer: true, seq: 1, flags: FlagSYN | FlagACK, want: ReasonAccepted},
			{seq: 0xffff_fc01, flags: FlagACK, payload: 512, want: ReasonAccepted},
			{seq: 0xffff_fe01, flags: FlagACK, payload: 512, want: ReasonAccepted},
			{seq: 0x0000_0001, flags: FlagACK, payload: 512, want: ReasonAccepted}, // wrapped: still forwards
			{seq: 0x0000_0201, flags: FlagACK, payload: 512, want: ReasonAccepted},
			{seq: 0xffff_fe01, flags: FlagACK, payload: 512, want: ReasonBackwards}, // before the wrap
			{seq: 0x0000_0201, flags: FlagACK, payload: 512, want: ReasonRepeat},
		}},
		{"wraparound within the window", Config{Window: 1024}, []step{
			{seq: 0xffff_ff00, flags: FlagSYN, want: ReasonAccepted},
			{seq: 0x0000_0100, flags: FlagACK, payload: 100, want: ReasonAccepted},
			{seq: 0xffff_ff01, flags: FlagACK, payload: 100, want: ReasonAccepted}, // 511 behind, across 0
			{seq: 0xffff_fc00, flags: FlagACK, payload: 100, want: ReasonBackwards},
		}},
		{"mid-stream segment of an unknown flow", Config{}, []step{
			{seq: 1001, flags: FlagACK, payload: 100, want: ReasonNoSession},
			{fromServer: true, seq: 5000, flags: FlagSYN | FlagACK, want: ReasonNoSession},
			{seq: 1001, flags: FlagACK, want: ReasonNoSession},
			{seq: 1001, flags: FlagRST, want: ReasonNoSession},
		}},
		{"mid-stream accepted when asked, then tracked", Config{AcceptMidstream: true}, []step{
			{seq: 1001, flags: FlagACK, payload: 100, want: ReasonAccepted},
			{seq: 1001, flags: FlagACK, payload: 100, want: ReasonRepeat},
			{fromServer: true, seq: 9, flags: FlagACK, payload: 10, want: ReasonAccepted},
			{seq: 1, flags: FlagACK, payload: 100, want: ReasonBackwards},
		}},
		{"SYN restarts the flow", Config{}, steps(handshake, []step{
			{seq: 1001, flags: FlagACK, payload: 100, want: ReasonAccepted},
			{seq: 500, flags: FlagSYN, want: ReasonAccepted},
			{seq: 501, flags: FlagACK, payload: 100, want: ReasonAccepted}, // before the old ISN: fine now
			{seq: 501, flags: FlagACK, payload: 100, want: ReasonRepeat},
		})},
		{"RST ends the flow", Config{}, steps(handshake, []step{
			{seq: 1001, flags: FlagACK, payload: 100, want: ReasonAccepted},
			{fromServer: true, seq: 5001, flags: FlagRST, want: ReasonAccepted},
			{seq: 1101, flags: FlagACK, payload: 100, want: ReasonNoSession},
		})},
		{"after FIN segments pass for a while, checked", Config{ClosingTimeout: 2 * time.Second}, steps(handshake, []step{
			{seq: 1001, flags: FlagACK | FlagFIN, payload: 100, want: ReasonAccepted},
			{fromServer: true, seq: 5001, flags: FlagACK, payload: 50, after: time.Second, want: ReasonAccepted},
			{fromServer: true, seq: 5001, flags: FlagACK, payload: 50, want: ReasonRepeat},
			{fromServer: true, seq: 5051, flags: FlagACK | FlagFIN, after: 1900 * time.Millisecond, want: ReasonAccepted},
			{seq: 1102, flags: FlagACK, after: 1900 * time.Millisecond, want: ReasonAccepted},
			{seq: 1102, flags: FlagACK, after: 2001 * time.Millisecond, want: ReasonNoSession},
		})},
		{"idle expiry", Config{IdleTimeout: time.Minute}, steps(handshake, []step{
			{seq: 1001, flags: FlagACK, payload: 100, after: 59 * time.Second, want: ReasonAccepted},
			{seq: 1101, flags: FlagACK, payload: 100, after: 60 * time.Second, want: ReasonAccepted},
			{seq: 1201, flags: FlagACK, payload: 100, after: 60*time.Second + time.Nanosecond, want: ReasonNoSession},
		})},
		{"an unanswered SYN expires after the closing timeout", Config{ClosingTimeout: time.Second}, []step{
			{seq: 1000, flags: FlagSYN, want: ReasonAccepted},
			{seq: 1001, flags: FlagACK, payload: 10, after: 2 * time.Second, want: ReasonNoSession},
		}},
		{"SYN, FIN and RST do not go together", Config{}, steps(handshake, []step{
			{seq: 1001, flags: FlagSYN | FlagFIN, want: ReasonBadFlags},
			{seq: 1001, flags: FlagSYN | FlagRST, want: ReasonBadFlags},
			{seq: 1001, flags: FlagFIN | FlagRST | FlagACK, want: ReasonBadFlags},
			{seq: 1001, flags: FlagACK, payload: 10, want: ReasonAccepted}, // the flow lives on
		})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := NewTracker(tt.cfg)
			now := t0
			for i, s := range tt.steps {
				now = now.Add(s.after)
				v := tr.Check(now, s.packet(t, client, server))
				if v.Reason != tt.steps[i].want || v.Accept != (s.want == ReasonAccepted) {
					t.Fatalf("step %d (%+v): verdict %+v, want %s", i, s, v, s.want)
				}
			}
			checkCounts(t, tr.Stats(), tt.steps)
		})
	}
}

// checkCounts compares the tracker's counters with the reasons expected.
func checkCounts(t *testing.T, st Stats, steps []step) {
	t.Helper()
	want := map[string]uint64{}
	for k := range st.Map() {
		want[k] = 0
	}
	for _, s := range steps {
		if s.want == ReasonAccepted {
			want[ReasonAccepted]++
		} else {
			want["dropped_"+s.want]++
		}
	}
	got := st.Map()
	for k, w := range want {
		if got[k] != w {
			t.Errorf("counter %s = %d, want %d (all: %v)", k, got[k], w, got)
		}
	}
}

func TestTrackerFlowsAreSeparate(t *testing.T) {
	tr := NewTracker(Config{})
	other := netip.MustParseAddrPort("100.64.0.2:40001")
	for _, c := range []netip.AddrPort{client, other} {
		if v := tr.Check(t0, step{seq: 1000, flags: FlagSYN}.packet(t, c, server)); !v.Accept {
			t.Fatalf("SYN from %s: %+v", c, v)
		}
	}
	// The same seq in two flows is no repeat.
	for _, c := range []netip.AddrPort{client, other} {
		if v := tr.Check(t0, step{seq: 1001, flags: FlagACK, payload: 10}.packet(t, c, server)); !v.Accept {
			t.Fatalf("data from %s: %+v", c, v)
		}
	}
	if st := tr.Stats(); st.Flows != 2 || st.Accepted != 4 {
		t.Fatalf("stats %+v, want 2 flows and 4 accepted", st)
	}
}

func TestTrackerIPv6(t *testing.T) {
	tr := NewTracker(Config{})
	c := netip.MustParseAddrPort("[2001:db8:1::2]:40000")
	sv := netip.MustParseAddrPort("[2001:db8:2::2]:443")
	for i, s := range steps(handshake, frozenStream(1001, 3)) {
		if v := tr.Check(t0, s.packet(t, c, sv)); v.Reason != s.want {
			t.Fatalf("step %d: %+v, want %s", i, v, s.want)
		}
	}
}

func TestTrackerNotTCPAndMalformed(t *testing.T) {
	tr := NewTracker(Config{})
	syn, err := Segment{Src: client, Dst: server, Seq: 1, Flags: FlagSYN}.Append(nil)
	if err != nil {
		t.Fatal(err)
	}
	udp := append([]byte(nil), syn...)
	udp[9] = 17
	fragment := append([]byte(nil), syn...)
	fragment[6], fragment[7] = 0x00, 0x10 // offset 16 bytes: no TCP header
	badDoff := append([]byte(nil), syn...)
	badDoff[20+12] = 4 << 4
	shortTotal := append([]byte(nil), syn...)
	// The IP packet ends inside the TCP header.
	shortTotal[3] = 30
	// IPv6 with a payload of 28 bytes: hop-by-hop options, then TCP.
	v6hop := append([]byte{0x60, 0, 0, 0, 0, 28, 0, 64}, make([]byte, 32)...)
	v6hop = append(v6hop, 6, 0, 0, 0, 0, 0, 0, 0)
	v6hop = append(v6hop, syn[20:]...)
	copy(v6hop[8:], netip.MustParseAddr("2001:db8:1::2").AsSlice())
	copy(v6hop[24:], netip.MustParseAddr("2001:db8:2::2").AsSlice())
	for _, c := range []struct {
		name string
		pkt  []byte
		want string
	}{
		{"UDP", udp, ReasonNotTCP},
		{"non-first fragment", fragment, ReasonNotTCP},
		{"empty", nil, ReasonMalformed},
		{"short IPv4", syn[:19], ReasonMalformed},
		{"cut inside the TCP header", syn[:30], ReasonMalformed},
		{"data offset below 5", badDoff, ReasonMalformed},
		{"IP total length inside the TCP header", shortTotal, ReasonMalformed},
		{"IPv5", append([]byte{0x50}, syn[1:]...), ReasonMalformed},
		{"IPv6 TCP behind a hop-by-hop header", v6hop, ReasonAccepted},
		{"IPv6 ICMPv6", append([]byte{0x60, 0, 0, 0, 0, 0, 58, 64}, make([]byte, 32)...), ReasonNotTCP},
	} {
		if v := tr.Check(t0, c.pkt); v.Reason != c.want || v.Accept != (c.want == ReasonAccepted || c.want == ReasonNotTCP) {
			t.Errorf("%s: %+v, want %s", c.name, v, c.want)
		}
	}
	if v := tr.Check(t0, syn); !v.Accept {
		t.Fatalf("SYN: %+v", v)
	}
	// Only the headers need be there: the payload length is the IP
	// header's (NFQUEUE's copy range cuts packets).
	full, err := Segment{Src: client, Dst: server, Seq: 2, Flags: FlagACK, Payload: make([]byte, 1000)}.Append(nil)
	if err != nil {
		t.Fatal(err)
	}
	if v := tr.Check(t0, full[:40]); v.Reason != ReasonAccepted {
		t.Fatalf("data after the SYN, cut after the headers: %+v", v)
	}
	if v := tr.Check(t0, full[:40]); v.Reason != ReasonRepeat {
		t.Fatalf("the same data again, cut after the headers: %+v (the payload must count from the IP header)", v)
	}
}

func TestTrackerTableBounded(t *testing.T) {
	tr := NewTracker(Config{MaxFlows: 3, ClosingTimeout: time.Second})
	syn := func(port uint16, at time.Time) Verdict {
		c := netip.AddrPortFrom(client.Addr(), port)
		return tr.Check(at, step{seq: 1, flags: FlagSYN}.packet(t, c, server))
	}
	for p := range uint16(3) {
		if v := syn(1000+p, t0); !v.Accept {
			t.Fatalf("SYN %d: %+v", p, v)
		}
	}
	if v := syn(2000, t0); v.Reason != ReasonTableFull {
		t.Fatalf("SYN beyond MaxFlows: %+v, want %s", v, ReasonTableFull)
	}
	// The unanswered SYNs expire, and so make room.
	if v := syn(2000, t0.Add(2*time.Second)); !v.Accept {
		t.Fatalf("SYN after the others expired: %+v", v)
	}
	if st := tr.Stats(); st.Flows != 1 || st.DroppedTableFull != 1 {
		t.Fatalf("stats %+v, want 1 flow and 1 table_full drop", st)
	}
}

func TestTrackerSweepsExpiredFlows(t *testing.T) {
	tr := NewTracker(Config{IdleTimeout: time.Minute, ClosingTimeout: time.Second})
	for p := range uint16(100) {
		c := netip.AddrPortFrom(client.Addr(), 10000+p)
		tr.Check(t0, step{seq: 1, flags: FlagSYN}.packet(t, c, server))
	}
	if n := tr.Stats().Flows; n != 100 {
		t.Fatalf("%d flows, want 100", n)
	}
	// The next segment after the sweep interval sweeps.
	tr.Check(t0.Add(3*time.Second), step{seq: 1, flags: FlagSYN}.packet(t, client, server))
	if n := tr.Stats().Flows; n != 1 {
		t.Fatalf("%d flows after the sweep, want 1", n)
	}
}

func TestSegmentChecksums(t *testing.T) {
	for _, s := range []Segment{
		{Src: client, Dst: server, Seq: 0x01020304, Ack: 5, Flags: FlagACK, Payload: []byte("odd")},
		{Src: netip.MustParseAddrPort("[2001:db8::1]:1"), Dst: netip.MustParseAddrPort("[2001:db8::2]:2"), Flags: FlagSYN, Payload: []byte("even")},
	} {
		pkt, err := s.Append(nil)
		if err != nil {
			t.Fatal(err)
		}
		var pseudo uint64
		off := 20
		if s.Src.Addr().Is4() {
			if got := fold(sum(0, pkt[:20])); got != 0xffff {
				t.Errorf("IPv4 header checksum does not verify: %#04x", got)
			}
			pseudo = sum(sum(0, pkt[12:16]), pkt[16:20])
		} else {
			off = 40
			pseudo = sum(sum(0, pkt[8:24]), pkt[24:40])
		}
		pseudo += protoTCP + uint64(len(pkt)-off)
		if got := fold(sum(pseudo, pkt[off:])); got != 0xffff {
			t.Errorf("%v: TCP checksum does not verify: %#04x", s.Src, got)
		}
		seg, res := parseTCP(pkt)
		if res != parseOK || seg.src != s.Src || seg.dst != s.Dst || seg.seq != s.Seq || seg.flags != s.Flags || seg.payload != len(s.Payload) {
			t.Errorf("parsed %+v (%v), want %+v", seg, res, s)
		}
	}
	if _, err := (Segment{Src: client, Dst: netip.MustParseAddrPort("[2001:db8::2]:2")}).Append(nil); err == nil {
		t.Error("mixed families: no error")
	}
}

func BenchmarkTrackerCheck(b *testing.B) {
	tr := NewTracker(Config{})
	tr.Check(t0, mustPacket(b, Segment{Src: client, Dst: server, Seq: 0, Flags: FlagSYN}))
	pkts := make([][]byte, 64)
	for i := range pkts {
		pkts[i] = mustPacket(b, Segment{Src: client, Dst: server, Flags: FlagACK, Payload: make([]byte, 100)})
	}
	b.ReportAllocs()
	seq := uint32(1)
	for i := 0; b.Loop(); i++ {
		p := pkts[i%len(pkts)]
		p[24], p[25], p[26], p[27] = byte(seq>>24), byte(seq>>16), byte(seq>>8), byte(seq)
		seq += 100
		if v := tr.Check(t0, p); !v.Accept {
			b.Fatalf("%+v", v)
		}
	}
}

func mustPacket(tb testing.TB, s Segment) []byte {
	tb.Helper()
	p, err := s.Append(nil)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

func (s step) String() string {
	return fmt.Sprintf("server=%v seq=%d flags=%#x payload=%d", s.fromServer, s.seq, s.flags, s.payload)
}
