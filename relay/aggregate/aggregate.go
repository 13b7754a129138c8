// Package aggregate is what both ends of an aggregate share: an aggregate
// is one IKE SA carried over several links to the same far iketcp (its
// members), as FortiOS's ipsec-aggregate groups the tunnels of one
// location ID. The package owns the algorithms that spread datagrams over
// the live members, each member's measurements from the in-band probes
// (round trip, loss, rate, liveness), and the scheduler that picks a
// member per datagram without allocating. It owns no sockets, no links
// and no goroutines: the client and server roles send the probes (framing's
// Probe control message) on their own clocks, report what comes back, and
// ask the scheduler.
//
// A member is live while its last answered probe is younger than
// DeadAfter. Probes go every ProbeInterval, so a member that stops
// answering leaves the rotation DeadAfter after its last answer, and at
// most what was already sent on it is lost; it rejoins with its next
// answer.
package aggregate

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
)

const (
	// ProbeInterval is how often each end probes each member.
	ProbeInterval = 200 * time.Millisecond
	// DeadAfter is how long a member may go without an answered probe
	// before it leaves the rotation: three probes.
	DeadAfter = 3 * ProbeInterval
	// MaxMembers bounds an aggregate's members.
	MaxMembers = 16
	// lossWindow is how many recent probes the loss figure covers.
	lossWindow = 64
)

// Algorithm is how an aggregate spreads datagrams over its live members.
type Algorithm uint8

// The algorithms: FortiOS's five, and least-latency.
const (
	// RoundRobin takes the live members in turn.
	RoundRobin Algorithm = 1
	// Weighted takes them in turn in proportion to their weights (smooth
	// weighted round-robin: 3:1 goes a, a, b, a, ...).
	Weighted Algorithm = 2
	// Redundant sends everything on the first live member in the order
	// they were configured; the next takes over when it fails.
	Redundant Algorithm = 3
	// L3 and L4 keep each flow on one member. The inner addresses and
	// ports travel encrypted in ESP, so the flow iketcp can see is the SA:
	// each ESP SPI (one child SA, one direction) and each IKE SA stays on
	// one member, chosen by rendezvous hashing, so a failed member moves
	// only its own SAs. Inner flows stay apart when the daemons give them
	// child SAs of their own.
	L3 Algorithm = 4
	L4 Algorithm = 5
	// LeastLatency sends each datagram on the member where it is
	// predicted to arrive first: half the member's round trip plus what
	// is queued on it divided by its rate.
	LeastLatency Algorithm = 6
)

var names = [...]string{RoundRobin: "round-robin", Weighted: "weighted", Redundant: "redundant", L3: "l3", L4: "l4", LeastLatency: "least-latency"}

func (a Algorithm) String() string {
	if a > 0 && int(a) < len(names) {
		return names[a]
	}
	return fmt.Sprintf("algorithm(%d)", uint8(a))
}

// Valid reports whether a is one of the algorithms.
func (a Algorithm) Valid() bool { return a > 0 && int(a) < len(names) }

// ParseAlgorithm parses an algorithm's name.
func ParseAlgorithm(s string) (Algorithm, error) {
	for a, n := range names {
		if n != "" && n == s {
			return Algorithm(a), nil
		}
	}
	return 0, errors.New("want " + strings.Join(names[1:], ", "))
}

// Member is one member's measurements and counters. Its methods are safe
// for concurrent use; the hot path's (Live, Count*) take no lock.
type Member struct {
	// Name says which member it is: the client's --member name, or on a
	// server the member's index and the client's address.
	Name string
	// Index is the member's place in the client's configuration, 0 first.
	Index uint8
	// Weight is its weight for Weighted (at least 1).
	Weight int
	// Backlog, if set, says what waits on the member's link, in bytes,
	// and the link's delivery rate in bytes a second (0: unknown), for
	// LeastLatency.
	Backlog func() (queued int, rate uint64)

	lastAnswer atomic.Int64 // unix ns of the last answered probe, or of Start
	started    atomic.Bool
	srtt       atomic.Int64 // smoothed round trip, ns; 0 until measured
	rate       atomic.Uint64

	packetsIn, bytesIn, packetsOut, bytesOut atomic.Uint64

	mu       sync.Mutex // guards the following: the probes' books
	seq      uint32     // the next probe's sequence number
	answered [lossWindow]bool
	sentAt   [lossWindow]int64
	rateFrom struct {
		at    int64
		bytes uint64
	}
}

// Start puts the member in the rotation as of now, as if a probe had just
// been answered: it has joined.
func (m *Member) Start(now int64) {
	m.lastAnswer.Store(now)
	m.started.Store(true)
}

// Stop takes the member out of the rotation until Start.
func (m *Member) Stop() { m.started.Store(false) }

// LastAnswer returns when the last probe was answered (or the member
// started), in unix ns.
func (m *Member) LastAnswer() int64 { return m.lastAnswer.Load() }

// Live reports whether the member is in the rotation at now.
func (m *Member) Live(now int64) bool {
	return m.started.Load() && now-m.lastAnswer.Load() < int64(DeadAfter)
}

// NextProbe returns the probe to send now, and books it.
func (m *Member) NextProbe(now int64) framing.Probe {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.seq
	m.seq++
	m.answered[s%lossWindow] = false
	m.sentAt[s%lossWindow] = now
	// The rate carried, measured over about a second.
	out := m.bytesOut.Load()
	if m.rateFrom.at == 0 {
		m.rateFrom.at, m.rateFrom.bytes = now, out
	} else if d := now - m.rateFrom.at; d >= int64(time.Second) {
		m.rate.Store((out - m.rateFrom.bytes) * uint64(time.Second) / uint64(d))
		m.rateFrom.at, m.rateFrom.bytes = now, out
	}
	return framing.Probe{Seq: s, Clock: now}
}

// Answered books the answer to probe p, which came at now. It reports
// whether the member came back into the rotation with it. An answer to a
// probe this member never sent, or sent too long ago, is ignored.
func (m *Member) Answered(p framing.Probe, now int64) (back bool) {
	m.mu.Lock()
	i := p.Seq % lossWindow
	ok := p.Seq-m.seq+lossWindow <= lossWindow && p.Seq != m.seq && m.sentAt[i] == p.Clock && !m.answered[i]
	if ok {
		m.answered[i] = true
	}
	m.mu.Unlock()
	if !ok {
		return false
	}
	rtt := max(now-p.Clock, 1)
	if old := m.srtt.Load(); old == 0 {
		m.srtt.Store(rtt)
	} else {
		m.srtt.Store(old + (rtt-old)/8) // RFC 6298's 1/8
	}
	back = m.started.Load() && now-m.lastAnswer.Load() >= int64(DeadAfter)
	m.lastAnswer.Store(now)
	return back
}

// CountOut counts n datagrams of b bytes sent on the member.
func (m *Member) CountOut(n int, b uint64) {
	m.packetsOut.Add(uint64(n))
	m.bytesOut.Add(b)
}

// CountIn counts n datagrams of b bytes received on the member.
func (m *Member) CountIn(n int, b uint64) {
	m.packetsIn.Add(uint64(n))
	m.bytesIn.Add(b)
}

// RTT returns the smoothed round trip of the probes (0: none answered).
func (m *Member) RTT() time.Duration { return time.Duration(m.srtt.Load()) }

// Loss returns the share of the recent probes that went unanswered,
// counting only probes older than DeadAfter (younger ones may still be
// answered).
func (m *Member) Loss(now int64) float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var sent, lost int
	for i := range lossWindow {
		at := m.sentAt[i]
		if at == 0 || now-at < int64(DeadAfter) {
			continue
		}
		sent++
		if !m.answered[i] {
			lost++
		}
	}
	if sent == 0 {
		return 0
	}
	return float64(lost) / float64(sent)
}

// Rate returns what the member carried lately, in bytes a second.
func (m *Member) Rate() uint64 { return m.rate.Load() }

// Snapshot is a member's figures at one time, for Status.
type Snapshot struct {
	Live                                     bool
	RTT                                      time.Duration
	Loss                                     float64
	Rate                                     uint64
	PacketsIn, BytesIn, PacketsOut, BytesOut uint64
}

// Snapshot returns the member's figures at now.
func (m *Member) Snapshot(now int64) Snapshot {
	return Snapshot{
		Live: m.Live(now), RTT: m.RTT(), Loss: m.Loss(now), Rate: m.Rate(),
		PacketsIn: m.packetsIn.Load(), BytesIn: m.bytesIn.Load(), PacketsOut: m.packetsOut.Load(), BytesOut: m.bytesOut.Load(),
	}
}

// predicted is when a datagram sent on m now would arrive, in ns from now:
// half the round trip (one way, if the paths are symmetric), plus what is
// queued ahead of it at the rate the link delivers.
func (m *Member) predicted() int64 {
	t := m.srtt.Load() / 2
	if m.Backlog == nil {
		return t
	}
	queued, rate := m.Backlog()
	if queued == 0 {
		return t
	}
	if rate == 0 {
		rate = max(m.rate.Load(), 1<<20) // unknown: what it carried, at least 1 MiB/s
	}
	return t + int64(float64(queued)*float64(time.Second)/float64(rate))
}

// Scheduler picks a member per datagram. It is owned by one goroutine at
// a time (the caller's lock) and does not allocate.
type Scheduler struct {
	Algorithm Algorithm
	next      int
	current   [MaxMembers]int
}

// Pick returns the index in members of the member that carries datagram
// dg (in port-4500 form) at now, or -1 when none is live. IKE goes on the
// first live member whatever the algorithm, so that an exchange's
// messages keep their order.
func (s *Scheduler) Pick(members []*Member, dg []byte, now int64) int {
	if framing.Classify(dg) == framing.KindIKE {
		return firstLive(members, now)
	}
	switch s.Algorithm {
	case Redundant:
		return firstLive(members, now)
	case Weighted:
		return s.weighted(members, now)
	case L3, L4:
		return rendezvous(members, dg, now)
	case LeastLatency:
		return leastLatency(members, now)
	}
	return s.roundRobin(members, now)
}

func firstLive(members []*Member, now int64) int {
	for i, m := range members {
		if m.Live(now) {
			return i
		}
	}
	return -1
}

func (s *Scheduler) roundRobin(members []*Member, now int64) int {
	n := len(members)
	for k := range n {
		i := (s.next + k) % n
		if members[i].Live(now) {
			s.next = (i + 1) % n
			return i
		}
	}
	return -1
}

// weighted is smooth weighted round-robin (as nginx's): each live member
// gains its weight, the richest is picked and pays the total.
func (s *Scheduler) weighted(members []*Member, now int64) int {
	best, total := -1, 0
	for i, m := range members[:min(len(members), MaxMembers)] {
		if !m.Live(now) {
			s.current[i] = 0
			continue
		}
		w := max(m.Weight, 1)
		s.current[i] += w
		total += w
		if best < 0 || s.current[i] > s.current[best] {
			best = i
		}
	}
	if best >= 0 {
		s.current[best] -= total
	}
	return best
}

// rendezvous picks, among the live members, the one with the highest hash
// of the datagram's SA and the member's index.
func rendezvous(members []*Member, dg []byte, now int64) int {
	key := saKey(dg)
	best, bestScore := -1, uint64(0)
	for i, m := range members {
		if !m.Live(now) {
			continue
		}
		if h := mix(key ^ uint64(m.Index+1)*0x9e3779b97f4a7c15); best < 0 || h > bestScore {
			best, bestScore = i, h
		}
	}
	return best
}

// saKey is the SA a datagram belongs to: its ESP SPI.
func saKey(dg []byte) uint64 {
	if len(dg) < 4 {
		return 0
	}
	return uint64(dg[0])<<24 | uint64(dg[1])<<16 | uint64(dg[2])<<8 | uint64(dg[3])
}

// mix is SplitMix64's finalizer.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

func leastLatency(members []*Member, now int64) int {
	best, bestAt := -1, int64(math.MaxInt64)
	for i, m := range members {
		if !m.Live(now) {
			continue
		}
		if at := m.predicted(); at < bestAt {
			best, bestAt = i, at
		}
	}
	return best
}
