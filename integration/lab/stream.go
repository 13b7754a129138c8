package lab

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"sync"
	"time"
)

// StreamPort is the UDP port a Stream's receiver listens on.
const StreamPort = 9000

// streamPayload is a stream datagram's size: its sequence number and the
// moment it was sent, padded to a small packet.
const streamPayload = 64

// Stream is a steady stream of UDP datagrams through the tunnel, from an
// address in one namespace to one in another, each numbered and stamped,
// so that a fault's cost can be read off it: how many were lost, and when
// traffic flowed again.
type Stream struct {
	every time.Duration
	tx    *net.UDPConn
	rx    *net.UDPConn
	done  chan struct{}
	wg    sync.WaitGroup

	mu       sync.Mutex // guards the following
	sent     []time.Time
	received map[uint64]time.Time // sequence number -> arrival
	stopped  bool
}

// StartStream sends a datagram from src (in from) to dst:StreamPort (in
// to) every interval until Stop, at most for max.
func StartStream(from *Namespace, src string, to *Namespace, dst string, every, max time.Duration) (*Stream, error) {
	if every <= 0 || max <= 0 {
		return nil, errors.New("StartStream: interval and duration must be positive")
	}
	s := &Stream{every: every, done: make(chan struct{}), received: make(map[uint64]time.Time)}
	dstAddr := netip.AddrPortFrom(netip.MustParseAddr(dst), StreamPort)
	if err := to.Do(func() (err error) {
		s.rx, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(dstAddr))
		return err
	}); err != nil {
		return nil, fmt.Errorf("stream receiver at %s: %w", dstAddr, err)
	}
	if err := from.Do(func() (err error) {
		s.tx, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(src), 0)), net.UDPAddrFromAddrPort(dstAddr))
		return err
	}); err != nil {
		s.rx.Close()
		return nil, fmt.Errorf("stream sender at %s: %w", src, err)
	}
	s.wg.Add(2)
	go s.receive()
	go s.send(max)
	return s, nil
}

func (s *Stream) send(max time.Duration) {
	defer s.wg.Done()
	t := time.NewTicker(s.every)
	defer t.Stop()
	end := time.After(max)
	buf := make([]byte, streamPayload)
	for {
		select {
		case <-s.done:
			return
		case <-end:
			return
		case now := <-t.C:
			s.mu.Lock()
			seq := uint64(len(s.sent))
			s.sent = append(s.sent, now)
			s.mu.Unlock()
			binary.BigEndian.PutUint64(buf, seq)
			s.tx.Write(buf) // a refusal (no route yet) is a loss like any other
		}
	}
}

func (s *Stream) receive() {
	defer s.wg.Done()
	buf := make([]byte, 2048)
	for {
		n, err := s.rx.Read(buf)
		if err != nil {
			return
		}
		if n != streamPayload {
			continue
		}
		seq := binary.BigEndian.Uint64(buf)
		now := time.Now()
		s.mu.Lock()
		if _, dup := s.received[seq]; !dup && seq < uint64(len(s.sent)) {
			s.received[seq] = now
		}
		s.mu.Unlock()
	}
}

// Stop stops sending, waits drain for what is still on its way, and
// closes the sockets. It is idempotent.
func (s *Stream) Stop(drain time.Duration) {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return
	}
	s.stopped = true
	s.mu.Unlock()
	close(s.done)
	time.Sleep(drain)
	s.tx.Close()
	s.rx.Close()
	s.wg.Wait()
}

// Counts returns how many datagrams were sent and how many arrived.
func (s *Stream) Counts() (sent, received int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sent), len(s.received)
}

// LostBetween returns how many datagrams sent in [from, to) never arrived.
func (s *Stream) LostBetween(from, to time.Time) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	lost := 0
	for seq, at := range s.sent {
		if at.Before(from) || !at.Before(to) {
			continue
		}
		if _, ok := s.received[uint64(seq)]; !ok {
			lost++
		}
	}
	return lost
}

// FlowsAgain returns how long after t the first datagram sent at t or
// later arrived: how long, from t, until traffic flowed again. It is
// false if none has.
func (s *Stream) FlowsAgain(t time.Time) (time.Duration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	first := sort.Search(len(s.sent), func(i int) bool { return !s.sent[i].Before(t) })
	best, ok := time.Duration(0), false
	for seq := first; seq < len(s.sent); seq++ {
		if at, got := s.received[uint64(seq)]; got {
			if d := at.Sub(t); !ok || d < best {
				best, ok = d, true
			}
		}
	}
	return best, ok
}

// LongestGap returns the longest time between two consecutive arrivals
// among the datagrams that arrived in [from, to]: how long traffic
// stopped, whatever was sent meanwhile.
func (s *Stream) LongestGap(from, to time.Time) time.Duration {
	s.mu.Lock()
	var at []time.Time
	for _, a := range s.received {
		if !a.Before(from) && !a.After(to) {
			at = append(at, a)
		}
	}
	s.mu.Unlock()
	sort.Slice(at, func(i, j int) bool { return at[i].Before(at[j]) })
	var gap time.Duration
	for i := 1; i < len(at); i++ {
		gap = max(gap, at[i].Sub(at[i-1]))
	}
	return gap
}
