package streamlink_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// datagram returns a datagram with relay.Headroom in front: ESP with SPI
// 0x1000 or IKE behind the non-ESP marker, carrying seq and filled with a
// pattern of it, so that a frame cut or spliced shows.
func datagram(ike bool, n int, seq uint32) []byte {
	b := make([]byte, relay.Headroom+n)
	p := b[relay.Headroom:]
	for i := range p {
		p[i] = byte(seq) + byte(i)
	}
	if ike {
		binary.BigEndian.PutUint32(p, 0)
		binary.BigEndian.PutUint32(p[framing.MarkerSize:], 0x1)
	} else {
		binary.BigEndian.PutUint32(p, 0x1000)
	}
	binary.BigEndian.PutUint32(p[8:], seq)
	return b
}

// checkDatagram returns the seq of a received datagram, and whether it
// is IKE, or an error if its bytes are not the ones sent.
func checkDatagram(p []byte) (seq uint32, ike bool, err error) {
	if len(p) < 12 {
		return 0, false, fmt.Errorf("%d-byte datagram", len(p))
	}
	seq = binary.BigEndian.Uint32(p[8:])
	want := datagram(p[0]|p[1]|p[2]|p[3] == 0, len(p), seq)[relay.Headroom:]
	for i := range p {
		if p[i] != want[i] {
			return seq, false, fmt.Errorf("datagram %d: byte %d is %#x, want %#x: a frame was cut or spliced", seq, i, p[i], want[i])
		}
	}
	return seq, p[0]|p[1]|p[2]|p[3] == 0, nil
}

// stalledPeer returns a client link to a peer that accepts and reads
// nothing until read is closed; then it reads and decodes every frame
// into frames, which it closes at the end of the stream.
func stalledPeer(t *testing.T, cfg streamlink.Config, wrap func(net.Conn) net.Conn, dialTLS *tls.Config) (link relay.Link, read chan struct{}, frames chan []byte) {
	t.Helper()
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nl.Close() })
	read = make(chan struct{})
	frames = make(chan []byte, 1<<16)
	accepted := make(chan net.Conn, 1)
	go func() {
		nc, err := nl.Accept()
		if err != nil {
			close(frames)
			return
		}
		nc = wrap(nc)
		if tc, ok := nc.(*tls.Conn); ok {
			tc.Handshake()
		}
		accepted <- nc
		<-read
		defer close(frames)
		br := bufio.NewReaderSize(nc, 1<<16)
		prefix := make([]byte, len(framing.Prefix))
		if _, err := io.ReadFull(br, prefix); err != nil {
			return
		}
		for {
			var hdr [2]byte
			if _, err := io.ReadFull(br, hdr[:]); err != nil {
				return
			}
			p := make([]byte, int(binary.BigEndian.Uint16(hdr[:]))-2)
			if _, err := io.ReadFull(br, p); err != nil {
				return
			}
			frames <- p
		}
	}()
	d := streamlink.NewDialer(cfg)
	d.TLS = dialTLS
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	link, err = d.DialLink(ctx, nl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { link.Close() })
	select {
	case nc := <-accepted:
		t.Cleanup(func() { nc.Close() })
	case <-time.After(5 * time.Second):
		t.Fatal("the peer did not accept")
	}
	return link, read, frames
}

// TestSendDoesNotWaitForThePeer: a peer that stops reading does not hold
// up Send. What the socket cannot take waits in the link's queue, ESP
// over the budget is refused and ESP that waited too long is dropped,
// both counted; IKE sent last passes the ESP queued before it (while
// that is fresh); and every frame that arrives is whole.
func TestSendDoesNotWaitForThePeer(t *testing.T) {
	for _, late := range []bool{false, true} {
		name := "fresh"
		if late {
			name = "late"
		}
		t.Run(name, func(t *testing.T) { testSendDoesNotWait(t, late) })
	}
}

func testSendDoesNotWait(t *testing.T, late bool) {
	plain := func(nc net.Conn) net.Conn { return nc }
	cert := selfSigned(t)
	serverTLS := func(nc net.Conn) net.Conn {
		return tls.Server(nc, &tls.Config{Certificates: []tls.Certificate{cert}})
	}
	for _, tc := range []struct {
		name    string
		wrap    func(net.Conn) net.Conn
		dialTLS *tls.Config
	}{
		{"tcp", plain, nil},
		{"tls", serverTLS, &tls.Config{InsecureSkipVerify: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			counters := new(relay.Counters)
			cfg := streamlink.Config{Counters: counters, QueueBytes: 256 << 10, QueueDelay: time.Minute}
			if late {
				cfg.QueueDelay, cfg.QueueInterval = 20*time.Millisecond, time.Nanosecond
			}
			link, read, frames := stalledPeer(t, cfg, tc.wrap, tc.dialTLS)

			// 40 MB of ESP: more than the peer's socket buffers hold.
			const espCount = 30000
			sent := make(chan error, 1)
			go func() {
				batch := make([][]byte, 0, 8)
				for seq := uint32(1); seq <= espCount; seq++ {
					batch = append(batch, datagram(false, 1400, seq))
					if len(batch) == cap(batch) {
						if err := link.Send(batch); err != nil {
							sent <- err
							return
						}
						batch = batch[:0]
					}
				}
				sent <- link.Send([][]byte{datagram(true, 300, espCount+1)})
			}()
			select {
			case err := <-sent:
				if err != nil {
					t.Fatalf("Send failed: %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("Send waited for a peer that does not read")
			}
			if counters.QueueFull.Load() == 0 {
				t.Fatal("no ESP refused for the budget, though the peer read nothing")
			}
			time.Sleep(50 * time.Millisecond) // what waits is now late
			close(read)

			var received, espAfterIKE int
			var lastESP uint32
			ikeSeen := false
			deadline := time.After(20 * time.Second)
			for done := false; !done; {
				select {
				case p, ok := <-frames:
					if !ok {
						done = true
						break
					}
					seq, ike, err := checkDatagram(p)
					if err != nil {
						t.Fatal(err)
					}
					received++
					switch {
					case ike:
						ikeSeen = true
					case seq <= lastESP:
						t.Fatalf("ESP %d after ESP %d: out of order", seq, lastESP)
					default:
						lastESP = seq
						if ikeSeen {
							espAfterIKE++
						}
					}
					if ikeSeen && int(counters.QueueFull.Load()+counters.QueueLate.Load())+received == espCount+1 {
						link.Close() // everything is accounted for: end the stream
					}
				case <-deadline:
					t.Fatalf("after 20 s, %d frames received, %d refused, %d late, of %d sent", received,
						counters.QueueFull.Load(), counters.QueueLate.Load(), espCount+1)
				}
			}
			full, dropped := counters.QueueFull.Load(), counters.QueueLate.Load()
			t.Logf("%d datagrams sent: %d received (%d ESP after the IKE), %d refused over the budget, %d dropped late",
				espCount+1, received, espAfterIKE, full, dropped)
			if !ikeSeen {
				t.Fatal("the IKE message never arrived")
			}
			switch {
			case late && dropped == 0:
				t.Fatal("no late ESP dropped, though it waited longer than --queue-delay")
			case !late && dropped != 0:
				t.Fatalf("%d ESP dropped late, within --queue-delay", dropped)
			case !late && espAfterIKE == 0:
				t.Fatal("the IKE message waited behind the ESP queued before it")
			}
			if got := uint64(received) + full + dropped; got != espCount+1 {
				t.Fatalf("received + refused + late = %d, want %d: datagrams lost uncounted", got, espCount+1)
			}
		})
	}
}

// TestSendFailsOnceThePeerIsGone: a write that fails ends the link: Serve
// returns and says why, and Send returns an error.
func TestSendFailsOnceThePeerIsGone(t *testing.T) {
	counters := new(relay.Counters)
	link, read, _ := stalledPeer(t, streamlink.Config{Counters: counters, WriteTimeout: 200 * time.Millisecond},
		func(nc net.Conn) net.Conn { return nc }, nil)
	_ = read
	served := make(chan error, 1)
	go func() { served <- link.Serve(&collector{got: make(chan []byte, 16)}) }()
	// The peer never reads: the queue's writer times out.
	var err error
	for i := 0; i < 100000 && err == nil; i++ {
		err = link.Send([][]byte{datagram(false, 1400, uint32(i))})
		if i%1000 == 999 {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if err == nil {
		t.Fatal("Send kept succeeding on a link whose peer takes nothing")
	}
	select {
	case serr := <-served:
		if serr == nil || counters.WriteErrors.Load() == 0 {
			t.Fatalf("Serve returned %v, write errors %d: want the write failure, counted", serr, counters.WriteErrors.Load())
		}
		t.Logf("Send: %v; Serve: %v", err, serr)
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after the write failed")
	}
	close(read)
}

// TestIdleLongerThanTheWriteTimeout: no write deadline outlives the write
// it bounds. A link idle for longer than --write-timeout, after dialling
// and after its writer waited, still sends.
func TestIdleLongerThanTheWriteTimeout(t *testing.T) {
	cfg := streamlink.Config{WriteTimeout: 100 * time.Millisecond, QueueDelay: time.Minute}
	link, read, frames := stalledPeer(t, cfg, func(nc net.Conn) net.Conn { return nc }, nil)
	close(read)
	expect := func(seq uint32) {
		t.Helper()
		select {
		case p := <-frames:
			if got, _, err := checkDatagram(p); err != nil || got != seq {
				t.Fatalf("got datagram %d (%v), want %d", got, err, seq)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("datagram %d did not arrive", seq)
		}
	}
	time.Sleep(250 * time.Millisecond)
	if err := link.Send([][]byte{datagram(false, 1400, 1)}); err != nil {
		t.Fatalf("Send after an idle spell longer than the write timeout: %v", err)
	}
	expect(1)
	// A burst that the socket cannot take at once makes the writer wait.
	burst := make([][]byte, 0, 64)
	for seq := uint32(2); seq < 2+64; seq++ {
		burst = append(burst, datagram(false, 8000, seq))
	}
	if err := link.Send(burst); err != nil {
		t.Fatal(err)
	}
	for seq := uint32(2); seq < 2+64; seq++ {
		expect(seq)
	}
	time.Sleep(250 * time.Millisecond)
	if err := link.Send([][]byte{datagram(false, 1400, 100)}); err != nil {
		t.Fatalf("Send after the writer waited, then an idle spell: %v", err)
	}
	expect(100)
}

// TestWriterKeepsUpWithASlowReader: a peer that reads in small sips
// makes the writer wait for the socket thousands of times; it must wake
// every time the socket drains (a wakeup lost between a write that found
// the socket full and the wait would stall the link until the write
// timeout ended it), and everything arrives, whole and in order.
func TestWriterKeepsUpWithASlowReader(t *testing.T) {
	cfg := streamlink.Config{WriteTimeout: 2 * time.Second, QueueBytes: 64 << 20, QueueDelay: time.Minute, NotSentLowat: 4096}
	link, read, frames := stalledPeer(t, cfg, func(nc net.Conn) net.Conn { return &sipper{Conn: nc} }, nil)
	close(read)
	const count = 3000
	go func() {
		batch := make([][]byte, 0, 16)
		for seq := uint32(1); seq <= count; seq++ {
			batch = append(batch, datagram(false, 1400, seq))
			if len(batch) == cap(batch) || seq == count {
				if link.Send(batch) != nil {
					return
				}
				batch = batch[:0]
				time.Sleep(50 * time.Microsecond)
			}
		}
	}()
	deadline := time.After(30 * time.Second)
	for want := uint32(1); want <= count; want++ {
		select {
		case p, ok := <-frames:
			if !ok {
				t.Fatalf("the stream ended after %d of %d datagrams", want-1, count)
			}
			seq, _, err := checkDatagram(p)
			if err != nil || seq != want {
				t.Fatalf("got datagram %d (%v), want %d", seq, err, want)
			}
		case <-deadline:
			t.Fatalf("after 30 s, %d of %d datagrams arrived", want-1, count)
		}
	}
}

// sipper reads at most 2 KiB at a time, now and then pausing.
type sipper struct {
	net.Conn
	reads int
}

func (s *sipper) Read(p []byte) (int, error) {
	if s.reads++; s.reads%64 == 0 {
		time.Sleep(200 * time.Microsecond)
	}
	return s.Conn.Read(p[:min(len(p), 2048)])
}

// TestNotSentLowatFollowsTheRate: by default a link's TCP_NOTSENT_LOWAT
// starts at the minimum and grows with the delivery rate, to about
// AutoNotSentTime of it; a fixed one stays as configured.
func TestNotSentLowatFollowsTheRate(t *testing.T) {
	plain := func(nc net.Conn) net.Conn { return nc }
	fixed, read, _ := stalledPeer(t, streamlink.Config{NotSentLowat: 12345}, plain, nil)
	close(read)
	if k, set := streamlink.NotSentLowatOf(fixed); k != 12345 || set != 0 {
		t.Fatalf("fixed: kernel %d, adjusted %d; want 12345, not adjusted", k, set)
	}

	link, read, frames := stalledPeer(t, streamlink.Config{QueueDelay: time.Minute}, plain, nil)
	if k, set := streamlink.NotSentLowatOf(link); k != streamlink.MinNotSentLowat || set != streamlink.MinNotSentLowat {
		t.Fatalf("at first: kernel %d, set %d; want %d", k, set, streamlink.MinNotSentLowat)
	}
	close(read)
	go func() {
		for range frames {
		}
	}()
	// Loopback delivers gigabits: 2 ms of that is far above the minimum.
	deadline := time.Now().Add(10 * time.Second)
	batch := make([][]byte, 0, 64)
	for sends := 1; time.Now().Before(deadline); sends++ {
		for len(batch) < cap(batch) {
			batch = append(batch, datagram(false, 8000, uint32(len(batch))))
		}
		if err := link.Send(batch); err != nil {
			t.Fatal(err)
		}
		batch = batch[:0]
		if sends%16 == 0 {
			if k, set := streamlink.NotSentLowatOf(link); k > 4*streamlink.MinNotSentLowat && k == set {
				t.Logf("TCP_NOTSENT_LOWAT grew to %d bytes", k)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}
	k, set := streamlink.NotSentLowatOf(link)
	t.Fatalf("after 10 s of traffic TCP_NOTSENT_LOWAT is %d (set %d): it did not follow the delivery rate", k, set)
}

// TestDrain: Drain waits for what the link has queued to go out, within
// its context; what waited is counted in the queue delay histogram.
func TestDrain(t *testing.T) {
	counters := new(relay.Counters)
	cfg := streamlink.Config{Counters: counters, QueueBytes: 4 << 20, QueueDelay: time.Minute}
	link, read, frames := stalledPeer(t, cfg, func(nc net.Conn) net.Conn { return nc }, nil)
	const count = 3000 // 4.2 MB: more than the sockets hold
	batch := make([][]byte, 0, 8)
	for seq := uint32(1); seq <= count; seq++ {
		batch = append(batch, datagram(false, 1400, seq))
		if len(batch) == cap(batch) || seq == count {
			if err := link.Send(batch); err != nil {
				t.Fatal(err)
			}
			batch = batch[:0]
		}
	}
	d := link.(relay.Drainer)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := d.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain with a peer that reads nothing: %v, want the deadline", err)
	}
	close(read)
	received := make(chan int)
	go func() {
		n := 0
		for range frames {
			n++
		}
		received <- n
	}()
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	if err := d.Drain(ctx2); err != nil {
		t.Fatalf("Drain once the peer reads: %v", err)
	}
	link.Close()
	n := <-received
	if want := count - int(counters.QueueFull.Load()); n != want {
		t.Fatalf("the peer received %d datagrams, want the %d not refused", n, want)
	}
	if _, waited, _ := counters.QueueDelay[0].Snapshot(); waited == 0 {
		t.Fatal("no ESP wait counted, though the queue held ESP")
	}
}
