package faketcp

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// recordDevice keeps a copy of every packet written to it (when keep is
// set) and delivers nothing. A driven stack's reader does not run, so
// Read is never called, and the stack never closes its device. With
// offload it is a tun.OffloadDevice with the offloads on: WriteOffload's
// packets are kept whole, each behind its virtio-net header, in
// offloaded.
type recordDevice struct {
	offload bool

	mu        sync.Mutex
	keep      bool
	packets   [][]byte
	offloaded [][]byte
	writes    int
}

func (d *recordDevice) BatchSize() int { return 64 }

func (d *recordDevice) Read([][]byte, []int, int) (int, error) { select {} }

func (d *recordDevice) ReadOffload([][]byte, []int, int) (int, error) { select {} }

func (d *recordDevice) Offload() error {
	if d.offload {
		return nil
	}
	return &tun.OffloadError{Err: tun.ErrOffloadNotAsked}
}

func (d *recordDevice) WriteOffload(pkts []tun.OffloadPacket) (int, error) {
	if !d.offload {
		return 0, d.Offload()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.writes += len(pkts)
	if d.keep {
		for _, p := range pkts {
			b := make([]byte, tun.VirtioNetHdrLen)
			_ = p.Hdr.Encode(b)
			b = append(b, p.Head...)
			for _, buf := range p.Bufs {
				b = append(b, buf[p.Offset:]...)
			}
			d.offloaded = append(d.offloaded, b)
		}
	}
	return len(pkts), nil
}

// takeOffloaded returns the packets WriteOffload was given since the last
// takeOffloaded, each behind its virtio-net header.
func (d *recordDevice) takeOffloaded() [][]byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.offloaded
	d.offloaded = nil
	return p
}

func (d *recordDevice) Close() error { return nil }

func (d *recordDevice) Write(bufs [][]byte, offset int) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.writes += len(bufs)
	if d.keep {
		for _, b := range bufs {
			d.packets = append(d.packets, append([]byte(nil), b[offset:]...))
		}
	}
	return len(bufs), nil
}

// take returns the packets written since the last take.
func (d *recordDevice) take() [][]byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.packets
	d.packets = nil
	return p
}

// counter is deterministic randomness for driven stacks.
func counter(start uint32) func() uint32 {
	var mu sync.Mutex
	return func() uint32 {
		mu.Lock()
		defer mu.Unlock()
		start += 0x9e3779b9
		return start
	}
}

// remoteEnd builds the packets a peer would send to a driven stack.
type remoteEnd struct {
	hdr      headers
	seq, ack uint32
}

// segment builds a segment from the peer with payload, flags and the
// peer's seq and ack, and advances the peer's seq by the payload.
func (r *remoteEnd) segment(flags uint8, payload []byte) []byte {
	buf := append(make([]byte, controlBufSize), payload...)
	start := r.hdr.put(buf, controlBufSize, tcpFields{seq: r.seq, ack: r.ack, flags: flags, window: DefaultWindow}, nil, 0)
	r.seq += uint32(len(payload))
	return buf[start:]
}

// syn builds a SYN from the peer with options o and the peer's seq, and
// advances the peer's seq past it.
func (r *remoteEnd) syn(o synOptions) []byte {
	buf := make([]byte, controlBufSize)
	start := r.hdr.put(buf, controlBufSize, tcpFields{seq: r.seq, flags: flagSYN, window: DefaultWindow}, o.buf[:o.n], 0)
	r.seq++
	return buf[start:]
}

// open sends the peer's SYN, with options o, to s at now, checks that s
// answered with one SYN-ACK, and sets the peer's ack to return its
// cookie. It returns the SYN-ACK.
func (r *remoteEnd) open(t testing.TB, s *Stack, dev *recordDevice, now time.Time, o synOptions) segment {
	t.Helper()
	feed(s, now, r.syn(o))
	replies := dev.take()
	if len(replies) != 1 {
		t.Fatalf("%d replies to a SYN", len(replies))
	}
	var in inbound
	remote := r.hdr.local.Addr()
	if v := parsePacket(replies[0], remote, remote.Is4(), &in); v != packetOK || in.seg.flags != flagSYN|flagACK || in.seg.ack != r.seq {
		t.Fatalf("reply to a SYN: verdict %d, %+v", v, in.seg)
	}
	r.ack = in.seg.seq + 1
	return in.seg
}

// drivenEpoch is when drivenStack's handshake happens: a fixed time, so
// that its stack's cookies, like its randomness, repeat from run to run.
var drivenEpoch = time.Unix(1_700_000_000, 0)

// feed runs pkts through s as one batch read at now; with offloads each
// behind an empty virtio-net header, as a plain packet comes.
func feed(s *Stack, now time.Time, pkts ...[]byte) {
	for k, p := range pkts {
		s.rx.sizes[k] = copy(s.rx.bufs[k][Headroom:], p)
		if s.off != nil {
			clear(s.rx.bufs[k][Headroom-tun.VirtioNetHdrLen : Headroom])
		}
	}
	s.processBatch(len(pkts), now)
}

// feedVirtio runs pkts, each a virtio-net header and a packet, through s
// (which offloads) as one batch read at now.
func feedVirtio(s *Stack, now time.Time, pkts ...[]byte) {
	for k, p := range pkts {
		s.rx.sizes[k] = copy(s.rx.bufs[k][Headroom-tun.VirtioNetHdrLen:], p) - tun.VirtioNetHdrLen
	}
	s.processBatch(len(pkts), now)
}

// drivenStack is a stack without goroutines on a recordDevice, listening
// on testPort, with one conn accepted from remote, which the returned
// remoteEnd speaks for. The handshake happens at drivenEpoch.
func drivenStack(t testing.TB, cfg Config, remote netip.AddrPort) (*Stack, *recordDevice, *Conn, *remoteEnd) {
	t.Helper()
	return drivenStackOn(t, &recordDevice{keep: true}, cfg, remote)
}

// drivenStackOn is drivenStack on dev.
func drivenStackOn(t testing.TB, dev *recordDevice, cfg Config, remote netip.AddrPort) (*Stack, *recordDevice, *Conn, *remoteEnd) {
	t.Helper()
	local := cfg.Local
	if cfg.MTU == 0 {
		cfg.MTU = 1600
	}
	s, err := newStack(dev, cfg, false, counter(7))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	l, err := s.Listen(testPort)
	if err != nil {
		t.Fatal(err)
	}
	r := &remoteEnd{hdr: newHeaders(remote, netip.AddrPortFrom(local, testPort), 0), seq: 1000}
	r.open(t, s, dev, drivenEpoch, makeSYNOptions(1460, true, true))
	feed(s, drivenEpoch, r.segment(flagACK, nil))
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	c, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return s, dev, c, r
}

// TestDrivenStack checks the receive path packet by packet: data reaches
// the handler in place with its headroom, a keepalive probe is answered,
// a FIN is answered with FIN|ACK, and the next segment for the forgotten
// 4-tuple gets an RST.
func TestDrivenStack(t *testing.T) {
	for _, addrs := range [][2]netip.Addr{{addr4B, addr4A}, {addr6B, addr6A}} {
		s, dev, c, r := drivenStack(t, Config{Local: addrs[0]}, netip.AddrPortFrom(addrs[1], 40000))
		var got []string
		c.SetHandler(func(batch []Payload) {
			for _, p := range batch {
				if p.Off < Headroom || p.Off+p.N > len(p.Buf) {
					t.Errorf("payload at %d+%d in a %d-byte buffer", p.Off, p.N, len(p.Buf))
				}
				got = append(got, string(p.Buf[p.Off:p.Off+p.N]))
			}
		})
		now := time.Now()
		feed(s, now, r.segment(flagACK|flagPSH, []byte("one")), r.segment(flagACK|flagPSH, []byte("two")))
		if len(got) != 2 || got[0] != "one" || got[1] != "two" {
			t.Errorf("handler got %q", got)
		}
		// The accepting side acknowledges its first data at once, to
		// show its scaled window; then it delays its ACKs.
		if replies := dev.take(); len(replies) != 1 {
			t.Errorf("%d replies to the first data, want 1 ACK", len(replies))
		}
		feed(s, now, r.segment(flagACK|flagPSH, []byte("three")))
		if replies := dev.take(); len(replies) != 0 {
			t.Errorf("%d replies to later data, want none (delayed ACK)", len(replies))
		}
		got = got[:2]
		// A keepalive probe: seq one before the next.
		r.seq--
		feed(s, now, r.segment(flagACK, nil))
		r.seq++
		replies := dev.take()
		var in inbound
		if len(replies) != 1 || parsePacket(replies[0], addrs[1], addrs[1].Is4(), &in) != packetOK || in.seg.flags != flagACK || in.seg.ack != r.seq {
			t.Fatalf("answer to a keepalive: %d replies, %+v", len(replies), in.seg)
		}
		// A FIN.
		feed(s, now, r.segment(flagFIN|flagACK, nil))
		r.seq++
		replies = dev.take()
		if len(replies) != 1 || parsePacket(replies[0], addrs[1], addrs[1].Is4(), &in) != packetOK || in.seg.flags != flagFIN|flagACK || in.seg.ack != r.seq {
			t.Fatalf("answer to a FIN: %d replies, %+v", len(replies), in.seg)
		}
		if err := c.Err(); err != ErrPeerClosed {
			t.Errorf("conn ended with %v", err)
		}
		r.ack = in.seg.seq + 1
		feed(s, now, r.segment(flagACK, nil)) // the ACK of our FIN: forgotten
		if n := s.Stats().Conns; n != 0 {
			t.Errorf("%d conns after the close", n)
		}
		feed(s, now, r.segment(flagACK|flagPSH, []byte("late")))
		replies = dev.take()
		if len(replies) != 1 || parsePacket(replies[0], addrs[1], addrs[1].Is4(), &in) != packetOK || in.seg.flags != flagRST || in.seg.seq != r.ack {
			t.Fatalf("answer to a segment for no conn: %d replies, %+v", len(replies), in.seg)
		}
	}
}
