package faketcp

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestCookieJar makes a cookie for a SYN and checks what returns it:
// the handshake's ACK (or a data segment with the same seq and ack) from
// the same 4-tuple, in the cookie's slot or the next; nothing else.
func TestCookieJar(t *testing.T) {
	local, remote := netip.AddrPortFrom(addr4B, testPort), netip.AddrPortFrom(addr4A, 40000)
	syn := segment{flags: flagSYN, seq: 0xfffffffe, mss: 1452, windowScale: true}
	jar := harnessJar(0)
	made := jar.make(harnessStart, local, remote, &syn, defaultIPv4PeerMSS)
	if made.peerMSS != 1452 || !made.windowScale || made.sackPermitted {
		t.Fatalf("cookie %+v: want MSS 1452, window scale, no SACK", made)
	}
	ack := func(d uint32) segment { return segment{flags: flagACK, seq: syn.seq + 1, ack: made.iss + 1 + d} }
	other := netip.AddrPortFrom(netip.MustParseAddr("203.0.113.5"), 40000)
	for _, tt := range []struct {
		name          string
		at            time.Duration
		local, remote netip.AddrPort
		seg           segment
		jar           byte
		ok            bool
	}{
		{name: "the handshake's ACK", seg: ack(0), ok: true},
		{name: "a data segment with the same numbers", seg: segment{flags: flagACK | flagPSH, seq: syn.seq + 1, ack: made.iss + 1, payloadLen: 100}, ok: true},
		{name: "late in the slot", at: 63 * time.Second, seg: ack(0), ok: true},
		{name: "in the next slot", at: 64 * time.Second, seg: ack(0), ok: true},
		{name: "at the end of the next slot", at: 127 * time.Second, seg: ack(0), ok: true},
		{name: "two slots later", at: 128 * time.Second, seg: ack(0)},
		{name: "four slots later: the same slot bit", at: 256 * time.Second, seg: ack(0)},
		{name: "a slot earlier", at: -time.Second, seg: ack(0)},
		{name: "ack one short", seg: ack(^uint32(0))},
		{name: "ack one past", seg: ack(1)},
		{name: "a MAC bit flipped", seg: ack(1 << 20)},
		{name: "the SACK bit set", seg: ack(cookieSACK)},
		{name: "the window scale bit cleared", seg: ack(^uint32(cookieWScale - 1))},
		{name: "another MSS index", seg: ack(1 << cookieMSSLow)},
		{name: "the slot bit flipped", seg: ack(cookieSlotBit)},
		{name: "seq one past: not the first segment", seg: segment{flags: flagACK, seq: syn.seq + 2, ack: made.iss + 1}},
		{name: "another remote port", remote: netip.AddrPortFrom(remote.Addr(), 40001), seg: ack(0)},
		{name: "another remote address", remote: other, seg: ack(0)},
		{name: "another local port", local: netip.AddrPortFrom(local.Addr(), testPort+1), seg: ack(0)},
		{name: "another key", jar: 1, seg: ack(0)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			l, r := local, remote
			if tt.local.IsValid() {
				l = tt.local
			}
			if tt.remote.IsValid() {
				r = tt.remote
			}
			jar := harnessJar(tt.jar)
			got, ok := jar.check(harnessStart.Add(tt.at), l, r, &tt.seg)
			if ok != tt.ok {
				t.Fatalf("check: %v, want %v", ok, tt.ok)
			}
			if ok && got != made {
				t.Errorf("checked %+v, made %+v", got, made)
			}
		})
	}
}

// TestCookieOptions checks what a cookie keeps of a SYN's options: its
// MSS rounded down to an entry of cookieMSS (a missing one as the
// family's default), and whether it offered window scaling and SACK.
func TestCookieOptions(t *testing.T) {
	local, remote := netip.AddrPortFrom(addr6B, testPort), netip.AddrPortFrom(addr6A, 40000)
	jar := harnessJar(0)
	for _, tt := range []struct {
		mss, want uint16
	}{
		{0, defaultIPv6PeerMSS}, {1, 48}, {47, 48}, {48, 48}, {535, 48}, {536, 536}, {1219, 1200}, {1220, 1220},
		{1379, 1360}, {1380, 1380}, {1439, 1432}, {1440, 1440}, {1459, 1452}, {1460, 1460}, {1500, 1460},
		{8939, 1460}, {8940, 8940}, {65535, 8940},
	} {
		for opts := range 4 {
			syn := segment{flags: flagSYN, seq: uint32(tt.mss) * 7, mss: tt.mss, windowScale: opts&1 != 0, sackPermitted: opts&2 != 0}
			made := jar.make(harnessStart, local, remote, &syn, defaultIPv6PeerMSS)
			seg := segment{flags: flagACK, seq: syn.seq + 1, ack: made.iss + 1}
			got, ok := jar.check(harnessStart, local, remote, &seg)
			if !ok || got.peerMSS != tt.want || got.windowScale != syn.windowScale || got.sackPermitted != syn.sackPermitted {
				t.Errorf("SYN %+v: checked %v, %+v; want MSS %d", syn, ok, got, tt.want)
			}
		}
	}
	// Cookies are as unpredictable as their MAC: SYNs that differ only
	// in their ISN get cookies that differ in their MAC bits.
	seen := map[uint32]bool{}
	for i := range uint32(1000) {
		syn := segment{flags: flagSYN, seq: i, mss: 1440}
		seen[jar.make(harnessStart, local, remote, &syn, defaultIPv6PeerMSS).iss>>cookieLowBits] = true
	}
	if len(seen) < 990 {
		t.Errorf("1000 SYNs got %d different MACs", len(seen))
	}
}

// listeningStack is a stack without goroutines on a recordDevice,
// listening on testPort.
func listeningStack(t testing.TB, cfg Config) (*Stack, *recordDevice, *Listener) {
	t.Helper()
	dev := &recordDevice{keep: true}
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
	return s, dev, l
}

// accepted returns the conn waiting for Accept on l, or nil.
func accepted(l *Listener) *Conn {
	select {
	case c := <-l.queue:
		return c
	default:
		return nil
	}
}

// parseReply parses a packet the stack wrote, to whatever address, as a
// sound segment; ok is false if it is not one.
func parseReply(pkt []byte) (seg segment, ok bool) {
	var dst netip.Addr
	switch {
	case len(pkt) >= ipv6HeaderLen && pkt[0]>>4 == 6:
		dst = netip.AddrFrom16([16]byte(pkt[24:40]))
	case len(pkt) >= ipv4HeaderLen && pkt[0]>>4 == 4:
		dst = netip.AddrFrom4([4]byte(pkt[16:20]))
	default:
		return segment{}, false
	}
	var in inbound
	return in.seg, parsePacket(pkt, dst, dst.Is4(), &in) == packetOK
}

// TestCookieHandshake runs the segment that should return a cookie
// through a listening stack: the right one opens an established conn
// (the handshake's ACK, or, when that was lost, the first data segment,
// which is delivered); anything else is answered as a segment for no
// conn: an RST, or nothing for an RST. Nothing is ever sent again.
func TestCookieHandshake(t *testing.T) {
	type answer int
	const (
		opens answer = iota
		reset
		nothing
	)
	for _, tt := range []struct {
		name string
		at   time.Duration // after the SYN, which is at the start of a slot
		// segment builds what r sends after the SYN-ACK.
		segment func(r *remoteEnd) []byte
		answer  answer
	}{
		{name: "the handshake's ACK", segment: func(r *remoteEnd) []byte { return r.segment(flagACK, nil) }},
		{name: "the handshake's ACK a slot later", at: 100 * time.Second, segment: func(r *remoteEnd) []byte { return r.segment(flagACK, nil) }},
		{name: "lost ACK: the first data segment", segment: func(r *remoteEnd) []byte { return r.segment(flagACK|flagPSH, []byte("first")) }},
		{name: "lost ACK: the first data segment with a FIN", segment: func(r *remoteEnd) []byte { return r.segment(flagACK|flagPSH|flagFIN, []byte("first")) }},
		{name: "a wrong MAC", answer: reset, segment: func(r *remoteEnd) []byte { r.ack ^= 1 << 30; return r.segment(flagACK, nil) }},
		{name: "ack one short", answer: reset, segment: func(r *remoteEnd) []byte { r.ack--; return r.segment(flagACK, nil) }},
		{name: "ack one past", answer: reset, segment: func(r *remoteEnd) []byte { r.ack++; return r.segment(flagACK, nil) }},
		{name: "seq one past", answer: reset, segment: func(r *remoteEnd) []byte { r.seq++; return r.segment(flagACK, nil) }},
		{name: "another source port", answer: reset, segment: func(r *remoteEnd) []byte {
			r.hdr = newHeaders(netip.AddrPortFrom(r.hdr.local.Addr(), r.hdr.local.Port()+1), r.hdr.remote, 0)
			return r.segment(flagACK, nil)
		}},
		{name: "another source address", answer: reset, segment: func(r *remoteEnd) []byte {
			r.hdr = newHeaders(netip.AddrPortFrom(r.hdr.local.Addr().Next(), r.hdr.local.Port()), r.hdr.remote, 0)
			return r.segment(flagACK, nil)
		}},
		{name: "another listening port", answer: reset, segment: func(r *remoteEnd) []byte {
			r.hdr = newHeaders(r.hdr.local, netip.AddrPortFrom(r.hdr.remote.Addr(), testPort+1), 0)
			return r.segment(flagACK, nil)
		}},
		{name: "two slots later", at: 128 * time.Second, answer: reset, segment: func(r *remoteEnd) []byte { return r.segment(flagACK, nil) }},
		{name: "a SYN-ACK", answer: reset, segment: func(r *remoteEnd) []byte { return r.segment(flagSYN|flagACK, nil) }},
		{name: "an RST", answer: nothing, segment: func(r *remoteEnd) []byte { return r.segment(flagRST|flagACK, nil) }},
	} {
		for _, addrs := range families {
			for _, mode := range []SeqMode{SeqLive, SeqFrozen} {
				t.Run(fmt.Sprintf("%s/%v/%v", tt.name, addrs[0], mode), func(t *testing.T) {
					s, dev, l := listeningStack(t, Config{Local: addrs[0], Seq: mode})
					if _, err := s.Listen(testPort + 1); err != nil {
						t.Fatal(err)
					}
					r := &remoteEnd{hdr: newHeaders(netip.AddrPortFrom(addrs[1], 40000), netip.AddrPortFrom(addrs[0], testPort), 0), seq: 1000}
					synAck := r.open(t, s, dev, drivenEpoch, makeSYNOptions(1400, true, true))
					pkt := tt.segment(r)
					now := drivenEpoch.Add(tt.at)
					feed(s, now, pkt)
					replies := dev.take()
					st := s.Stats()
					c := accepted(l)
					switch tt.answer {
					case opens:
						if c == nil || st.Conns != 1 || st.Refused != 0 || st.BadCookies != 0 {
							t.Fatalf("no conn opened: %+v", st)
						}
						cs := c.Stats()
						if cs.PeerMSS != 1400 || !c.tcb.peerWScale || !c.tcb.peerSACK || c.tcb.iss != synAck.seq || c.tcb.irs != synAck.ack-1 {
							t.Errorf("conn %+v, tcb %+v: want the SYN's options and numbers", cs, c.tcb)
						}
						if cs.ControlReceived < 1 || cs.ControlSent < 1 {
							t.Errorf("conn stats %+v: the handshake is not counted", cs)
						}
						fin := uint32(0)
						if tt.name == "lost ACK: the first data segment with a FIN" {
							fin = 1
						}
						switch {
						case cs.SegmentsReceived+uint64(len(c.early)) == 0: // a pure ACK: nothing to answer
							if len(replies) != 0 || cs.State != "ESTABLISHED" {
								t.Errorf("%d replies to the handshake's ACK, conn %s", len(replies), cs.State)
							}
						case len(c.early) != 1 || string(c.early[0].Buf[c.early[0].Off:]) != "first":
							t.Errorf("the first datagram was not kept for the handler: %d kept", len(c.early))
						case mode == SeqFrozen && fin == 0: // frozen acks nothing
							if len(replies) != 0 {
								t.Errorf("%d replies to frozen data", len(replies))
							}
						default: // acknowledged at once (it shows the scaled window), or the FIN answered
							seg, ok := parseReply(replies[0])
							if len(replies) != 1 || !ok || seg.flags != flagACK|uint8(fin) || seg.ack != r.seq+fin {
								t.Errorf("answer to the first data: %d replies, %+v", len(replies), seg)
							}
						}
					case reset:
						if c != nil || st.Conns != 0 || st.Refused != 1 {
							t.Errorf("conn %v, stats %+v: want no conn, one refused", c, st)
						}
						if len(replies) != 1 {
							t.Fatalf("%d answers, want an RST", len(replies))
						}
						if seg, ok := parseReply(replies[0]); !ok || seg.flags != flagRST || seg.seq != r.ack {
							t.Errorf("answer %+v; want an RST with seq %d", seg, r.ack)
						}
					case nothing:
						if c != nil || st.Conns != 0 || len(replies) != 0 || st.IgnoredRST != 1 {
							t.Errorf("conn %v, %d replies, stats %+v: want nothing", c, len(replies), st)
						}
					}
					// Whatever happened, the stack sends nothing more as
					// time passes (an open conn, before its first
					// keepalive).
					later := []time.Duration{time.Second, 5 * time.Second, 10 * time.Second}
					if tt.answer != opens {
						later = append(later, time.Minute, 5*time.Minute)
					}
					for _, d := range later {
						s.tickAll(now.Add(d))
					}
					if n := len(dev.take()); n != 0 {
						t.Errorf("%d segments sent as time passed", n)
					}
				})
			}
		}
	}
}

// TestCookieConnOptions opens conns through cookies for SYNs with each
// set of options, over both families: the SYN-ACK offers window scale
// and SACK permitted only as the SYN did; the conn takes the peer's MSS
// as the cookie kept it; its window is scaled only when the peer offered
// window scaling; until the conn shows its scaled window (with the
// immediate ACK of the first data) the peer knows only the SYN-ACK's; and
// the conn's packets go on from the SYN-ACK's IPv6 flow label and IPv4
// ID, as one connection's do.
func TestCookieConnOptions(t *testing.T) {
	for _, addrs := range families {
		for _, tt := range []struct {
			mss        uint16
			wscale     bool
			sack       bool
			wantMSS    int
			wantWindow uint32
		}{
			{1460, true, true, 1460, DefaultWindow << windowScale},
			{1450, false, true, 1440, DefaultWindow},
			{1380, true, false, 1380, DefaultWindow << windowScale},
			{0, false, false, 0, DefaultWindow},
		} {
			t.Run(fmt.Sprintf("%v/%+v", addrs[0], tt), func(t *testing.T) {
				s, dev, l := listeningStack(t, Config{Local: addrs[0]})
				r := &remoteEnd{hdr: newHeaders(netip.AddrPortFrom(addrs[1], 40000), netip.AddrPortFrom(addrs[0], testPort), 0), seq: 77}
				var o synOptions // none, when tt.mss is 0
				if tt.mss != 0 {
					o = makeSYNOptions(tt.mss, tt.wscale, tt.sack)
				}
				feed(s, drivenEpoch, r.syn(o))
				replies := dev.take()
				if len(replies) != 1 {
					t.Fatalf("%d replies to a SYN", len(replies))
				}
				synAck, ok := parseReply(replies[0])
				if !ok || synAck.flags != flagSYN|flagACK {
					t.Fatalf("reply to a SYN: %+v", synAck)
				}
				synAckPkt := replies[0]
				r.ack = synAck.seq + 1
				if synAck.windowScale != tt.wscale || synAck.sackPermitted != tt.sack || int(synAck.mss) != s.cfg.MSS {
					t.Errorf("SYN-ACK %+v: want MSS %d, window scale %v, SACK %v", synAck, s.cfg.MSS, tt.wscale, tt.sack)
				}
				if synAck.window != DefaultWindow {
					t.Errorf("SYN-ACK window %d, want the unscaled %d", synAck.window, DefaultWindow)
				}
				feed(s, drivenEpoch, r.segment(flagACK, nil))
				c := accepted(l)
				if c == nil {
					t.Fatal("no conn")
				}
				want := tt.wantMSS
				if want == 0 {
					want = defaultIPv4PeerMSS
					if addrs[0].Is6() {
						want = defaultIPv6PeerMSS
					}
				}
				if got := c.Stats().PeerMSS; got != want {
					t.Errorf("peer MSS %d, want %d", got, want)
				}
				if got := c.tcb.windowBytes(); got != tt.wantWindow {
					t.Errorf("window %d bytes, want %d", got, tt.wantWindow)
				}
				c.SetHandler(func([]Payload) {})
				feed(s, drivenEpoch, r.segment(flagACK|flagPSH, []byte("one")))
				replies = dev.take()
				if len(replies) != 1 {
					t.Fatalf("%d replies to the first data, want 1 ACK (it shows the scaled window)", len(replies))
				}
				if ack := replies[0]; addrs[0].Is4() {
					if id, synAckID := binary.BigEndian.Uint16(ack[4:6]), binary.BigEndian.Uint16(synAckPkt[4:6]); id != synAckID+1 {
						t.Errorf("IPv4 ID %d after the SYN-ACK's %d", id, synAckID)
					}
				} else if label, synAckLabel := binary.BigEndian.Uint32(ack[0:4]), binary.BigEndian.Uint32(synAckPkt[0:4]); label != synAckLabel || label&0xfffff == 0 {
					t.Errorf("IPv6 version, class and flow label %#x after the SYN-ACK's %#x", label, synAckLabel)
				}
				feed(s, drivenEpoch, r.segment(flagACK|flagPSH, []byte("two")))
				if n := len(dev.take()); n != 0 {
					t.Errorf("%d replies to the second data, want none (delayed ACK)", n)
				}
			})
		}
	}
}

// TestCookieTableFull: at maxConns a SYN is dropped, and a valid cookie
// is answered with an RST rather than opening a conn.
func TestCookieTableFull(t *testing.T) {
	s, dev, l := listeningStack(t, Config{Local: addr4B})
	r := &remoteEnd{hdr: newHeaders(netip.AddrPortFrom(addr4A, 40000), netip.AddrPortFrom(addr4B, testPort), 0), seq: 1}
	r.open(t, s, dev, drivenEpoch, makeSYNOptions(1460, true, true))
	s.mu.Lock()
	for i := range maxConns {
		key := fourTuple{netip.AddrPortFrom(addr4A, uint16(i+1)), 1}
		s.conns[key] = &Conn{key: key}
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		clear(s.conns)
		s.mu.Unlock()
	}()
	feed(s, drivenEpoch, r.segment(flagACK, nil))
	if replies := dev.take(); len(replies) != 1 {
		t.Errorf("%d answers to a valid cookie at maxConns, want an RST", len(replies))
	} else if seg, ok := parseReply(replies[0]); !ok || seg.flags != flagRST || seg.seq != r.ack {
		t.Errorf("answer to a valid cookie at maxConns: %+v", seg)
	}
	stranger := remoteEnd{hdr: newHeaders(netip.AddrPortFrom(addr4A, 50000), netip.AddrPortFrom(addr4B, testPort), 0)}
	feed(s, drivenEpoch, stranger.syn(makeSYNOptions(1460, true, true)))
	if replies := dev.take(); len(replies) != 0 {
		t.Errorf("%d answers to a SYN at maxConns", len(replies))
	}
	if st := s.Stats(); st.TableFull != 2 || st.Refused != 1 || st.BadCookies != 0 || accepted(l) != nil {
		t.Errorf("stats %+v", st)
	}
}

// TestCookieAcceptQueue: cookies that come back while the listener's
// queue is full open conns that are reset at once, as before; once the
// listener is closed, a cookie it sent is answered with an RST.
func TestCookieAcceptQueue(t *testing.T) {
	s, dev, l := listeningStack(t, Config{Local: addr4B})
	open := func(port uint16) (*remoteEnd, []byte) {
		r := &remoteEnd{hdr: newHeaders(netip.AddrPortFrom(addr4A, port), netip.AddrPortFrom(addr4B, testPort), 0), seq: uint32(port)}
		r.open(t, s, dev, drivenEpoch, makeSYNOptions(1460, true, true))
		return r, r.segment(flagACK, nil)
	}
	for i := range acceptQueue {
		_, ack := open(uint16(10000 + i))
		feed(s, drivenEpoch, ack)
	}
	r, ack := open(20000)
	feed(s, drivenEpoch, ack)
	replies := dev.take()
	if len(replies) != 1 {
		t.Fatalf("%d replies to the handshake beyond the accept queue", len(replies))
	}
	if seg, ok := parseReply(replies[0]); !ok || seg.flags != flagRST|flagACK || seg.seq != r.ack || seg.ack != r.seq {
		t.Errorf("answer to the handshake beyond the accept queue: %+v", seg)
	}
	if st := s.Stats(); st.Conns != acceptQueue || st.AcceptQueueFull != 1 {
		t.Errorf("stats %+v", st)
	}
	r, ack = open(20001)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if fins := dev.take(); len(fins) != acceptQueue {
		t.Errorf("closing the listener sent %d segments, want a FIN for each queued conn", len(fins))
	}
	feed(s, drivenEpoch, ack)
	replies = dev.take()
	if len(replies) != 1 {
		t.Fatalf("%d replies to a cookie of a closed listener", len(replies))
	}
	if seg, ok := parseReply(replies[0]); !ok || seg.flags != flagRST || seg.seq != r.ack {
		t.Errorf("answer to a cookie of a closed listener: %+v", seg)
	}
}

// floodSYNs returns count SYNs to dst from random IPv4 addresses in
// 10.0.0.0/8 and random ports, with random ISNs and options.
func floodSYNs(rng *rand.Rand, count int, dst netip.AddrPort) [][]byte {
	mss := []uint16{536, 1220, 1400, 1460, 8960}
	pkts := make([][]byte, count)
	for i := range pkts {
		src := netip.AddrFrom4([4]byte{10, byte(rng.IntN(256)), byte(rng.IntN(256)), byte(1 + rng.IntN(254))})
		r := remoteEnd{hdr: newHeaders(netip.AddrPortFrom(src, uint16(1+rng.IntN(65535))), dst, 0), seq: rng.Uint32()}
		pkts[i] = r.syn(makeSYNOptions(mss[rng.IntN(len(mss))], rng.IntN(2) == 0, rng.IntN(2) == 0))
	}
	return pkts
}

// TestSYNFlood floods a listening stack with 10000 SYNs from random
// (spoofed) addresses and ports over the pipe, in fake time, while a
// real client dials and sends datagrams both ways: each SYN gets exactly
// one SYN-ACK, the stack holds no conn for any, nothing more goes to the
// spoofed addresses as minutes pass, and the real client connects and
// carries its datagrams during the flood and after.
func TestSYNFlood(t *testing.T) {
	const (
		floodSize = 10000
		perBatch  = 100
	)
	synctest.Test(t, func(t *testing.T) {
		p := newStacks(t, pairOptions{})
		var mu sync.Mutex
		toSpoofed := map[uint8]int{} // by flags
		p.devB.SetCapture(func(pkt []byte) {
			var in inbound
			if parsePacket(pkt, netip.AddrFrom4([4]byte(pkt[16:20])), true, &in) != packetOK {
				t.Errorf("the server wrote an unsound packet")
				return
			}
			if in.dst != addr4A {
				mu.Lock()
				toSpoofed[in.seg.flags]++
				mu.Unlock()
			}
		})
		spoofed := func() (synAcks, other int) {
			mu.Lock()
			defer mu.Unlock()
			for flags, n := range toSpoofed {
				if flags == flagSYN|flagACK {
					synAcks += n
				} else {
					other += n
				}
			}
			return synAcks, other
		}
		syns := floodSYNs(rand.New(rand.NewPCG(9, 9)), floodSize, netip.AddrPortFrom(addr4B, testPort))
		floodDone := make(chan struct{})
		go func() {
			defer close(floodDone)
			for k := 0; k < len(syns); k += perBatch {
				if _, err := p.devA.Write(syns[k:k+perBatch], 0); err != nil {
					t.Error(err)
					return
				}
				time.Sleep(time.Millisecond)
			}
		}()

		// A real client dials during the flood and sends both ways.
		time.Sleep(30 * time.Millisecond)
		client, server := p.connect(t)
		atServer, atClient := newCollector(99), newCollector(99)
		server.SetHandler(atServer.handle)
		client.SetHandler(atClient.handle)
		for i := range uint32(50) {
			if err := client.Send([][]byte{datagram(i, 200)}, Headroom); err != nil {
				t.Fatal(err)
			}
			if err := server.Send([][]byte{datagram(i, 200)}, Headroom); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Millisecond)
		}
		<-floodDone
		synctest.Wait()
		synAcks, other := spoofed()
		st := p.b.Stats()
		t.Logf("after the flood: %d SYN-ACKs and %d other segments to spoofed addresses for %d SYNs; server stack %+v", synAcks, other, floodSize, st)
		if synAcks != floodSize || other != 0 {
			t.Errorf("%d SYN-ACKs and %d other segments to spoofed addresses for %d SYNs, want one SYN-ACK each", synAcks, other, floodSize)
		}
		if st.Conns != 1 || st.SYNCookies != floodSize+1 || st.TableFull != 0 {
			t.Errorf("server stack %+v: want the real conn only, and a cookie for each SYN", st)
		}
		// After the flood, more datagrams; then minutes pass.
		for i := uint32(50); i < 100; i++ {
			if err := client.Send([][]byte{datagram(i, 200)}, Headroom); err != nil {
				t.Fatal(err)
			}
			if err := server.Send([][]byte{datagram(i, 200)}, Headroom); err != nil {
				t.Fatal(err)
			}
		}
		atServer.wait(t, "client to server")
		atClient.wait(t, "server to client")
		for who, col := range map[string]*collector{"server": atServer, "client": atClient} {
			if len(col.errs) > 0 || len(col.indices) != 100 {
				t.Errorf("%s got %d datagrams, %d bad", who, len(col.indices), len(col.errs))
			}
		}
		time.Sleep(5 * time.Minute)
		if s2, o2 := spoofed(); s2 != synAcks || o2 != other {
			t.Errorf("as 5 minutes passed, %d more SYN-ACKs and %d more other segments went to spoofed addresses", s2-synAcks, o2-other)
		}
		if st := p.b.Stats(); st.Conns != 1 || client.Err() != nil || server.Err() != nil {
			t.Errorf("5 minutes later: server stack %+v, conns ended with %v, %v", st, client.Err(), server.Err())
		}
		if o := p.devA.Overflowed() + p.devB.Overflowed(); o != 0 {
			t.Errorf("the pipe overflowed %d times", o)
		}
		if n := p.a.Stats().NotLocal; n != floodSize {
			t.Errorf("the client's stack saw %d packets for others, want the %d SYN-ACKs", n, floodSize)
		}
	})
}

// TestFloodDoesNotDelayDial: a real client's Dial, in the middle of a
// flood that the old stack would have drowned in (its table full of
// half-open conns), completes with its first SYN.
func TestFloodDoesNotDelayDial(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newStacks(t, pairOptions{})
		syns := floodSYNs(rand.New(rand.NewPCG(10, 10)), 2*maxConns, netip.AddrPortFrom(addr4B, testPort))
		for k := 0; k < len(syns); k += 1024 {
			if _, err := p.devA.Write(syns[k:k+1024], 0); err != nil {
				t.Fatal(err)
			}
			synctest.Wait()
		}
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := p.a.Dial(ctx, netip.AddrPortFrom(addr4B, testPort)); err != nil {
			t.Fatalf("dial after %d SYNs: %v", len(syns), err)
		}
		if took := time.Since(start); took != 0 {
			t.Errorf("dial took %v of fake time, want its first SYN answered", took)
		}
	})
}
