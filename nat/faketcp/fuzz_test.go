package faketcp

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// fixChecksums rewrites the IPv4 header checksum and the TCP checksum of
// pkt where its lengths allow, so that mutated packets get past the
// checksums into the state machine.
func fixChecksums(pkt []byte) {
	if len(pkt) < 1 {
		return
	}
	var src, dst netip.Addr
	var tcp []byte
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < ipv4HeaderLen {
			return
		}
		hl := int(pkt[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(pkt[2:4]))
		if hl < ipv4HeaderLen || total < hl || total > len(pkt) {
			return
		}
		binary.BigEndian.PutUint16(pkt[10:12], 0)
		binary.BigEndian.PutUint16(pkt[10:12], referenceChecksum(pkt[:hl]))
		src, dst = netip.AddrFrom4([4]byte(pkt[12:16])), netip.AddrFrom4([4]byte(pkt[16:20]))
		tcp = pkt[hl:total]
	case 6:
		if len(pkt) < ipv6HeaderLen {
			return
		}
		total := ipv6HeaderLen + int(binary.BigEndian.Uint16(pkt[4:6]))
		if total > len(pkt) {
			return
		}
		src, dst = netip.AddrFrom16([16]byte(pkt[8:24])), netip.AddrFrom16([16]byte(pkt[24:40]))
		tcp = pkt[ipv6HeaderLen:total]
	default:
		return
	}
	if len(tcp) < tcpHeaderLen {
		return
	}
	binary.BigEndian.PutUint16(tcp[16:18], 0)
	binary.BigEndian.PutUint16(tcp[16:18], referenceChecksum(referencePseudoHeader(src, dst, len(tcp)), tcp))
}

// FuzzReceive feeds arbitrary packets, one batch each, to a stack that
// listens on testPort and holds an established conn from port 40000 of
// its peer (the peer's ISN 1000; the stack's deterministic, its cookies
// too; MSS 100): an IPv6 stack when the packet's version nibble says 6,
// else an IPv4 one. Everything happens at drivenEpoch, so that the seeds
// that return a cookie (for a SYN from port 40001 with ISN 5000) return
// a valid one. Checksums are left as they are or fixed up. Invariants:
// it never panics, it sends at most one reply for the packet, every reply
// is a sound segment from the stack's address that parses back, and the
// stack still works afterwards: a data segment for the conn reaches its
// handler unless the input ended the conn.
func FuzzReceive(f *testing.F) {
	// Per family: the stack's address, the peer's, and, as the seeds
	// need, a config with a small MSS and MTU, which keep inputs (and so
	// their minimization) short.
	families := map[bool]fuzzFamily{
		false: {Config{Local: addr4A, MSS: 100, MTU: 200}, addr4B},
		true:  {Config{Local: addr6A, MSS: 100, MTU: 200}, addr6B},
	}
	// Seeds: each kind of segment the established conn and the listener
	// see, as the peer would send it right after the handshake.
	for _, fam := range families {
		seed := func(flags uint8, payload []byte, seqDelta uint32, port uint16) []byte {
			_, _, _, r := drivenStack(f, fam.cfg, netip.AddrPortFrom(fam.peer, 40000))
			if port != 0 {
				r.hdr = newHeaders(netip.AddrPortFrom(fam.peer, port), netip.AddrPortFrom(fam.cfg.Local, testPort), 0)
			}
			r.seq += seqDelta
			return r.segment(flags, payload)
		}
		// cookieSeed is a segment from port 40001 that returns the
		// cookie of its SYN (ack moved by ackDelta).
		cookieSeed := func(flags uint8, payload []byte, ackDelta uint32) []byte {
			s, dev, _, _ := drivenStack(f, fam.cfg, netip.AddrPortFrom(fam.peer, 40000))
			r := &remoteEnd{hdr: newHeaders(netip.AddrPortFrom(fam.peer, 40001), netip.AddrPortFrom(fam.cfg.Local, testPort), 0), seq: 5000}
			r.open(f, s, dev, drivenEpoch, makeSYNOptions(1400, true, true))
			r.ack += ackDelta
			return r.segment(flags, payload)
		}
		f.Add(cookieSeed(flagACK, nil, 0), false)
		f.Add(cookieSeed(flagACK|flagPSH, []byte("first"), 0), false)
		f.Add(cookieSeed(flagACK|flagPSH|flagFIN, []byte("last"), 0), false)
		f.Add(cookieSeed(flagACK, nil, 1), false)
		f.Add(seed(flagACK|flagPSH, []byte("datagram"), 0, 0), false)
		f.Add(seed(flagACK, nil, ^uint32(0), 0), false) // keepalive probe
		f.Add(seed(flagFIN|flagACK, nil, 0, 0), false)
		f.Add(seed(flagRST, nil, 0, 0), false)
		f.Add(seed(flagSYN, nil, 0, 0), false)
		f.Add(seed(flagSYN, nil, 0, 40001), false)
		f.Add(seed(flagACK|flagPSH, []byte("stranger"), 0, 40002), false)
		f.Add(seed(flagACK|flagPSH, make([]byte, 101), 0, 0), false)
		f.Add(seed(flagSYN|flagACK, nil, 0, 0), true)
	}
	f.Add([]byte{0x45, 0, 0, 20}, true)
	f.Add([]byte{0x60}, false)
	f.Fuzz(func(t *testing.T, pkt []byte, fix bool) {
		fam := families[len(pkt) > 0 && pkt[0]>>4 == 6]
		s, dev, c, r := drivenStack(t, fam.cfg, netip.AddrPortFrom(fam.peer, 40000))
		delivered := countPayloads(t, c)
		if fix {
			fixChecksums(pkt)
		}
		if room := len(s.rx.bufs[0]) - Headroom; len(pkt) > room {
			pkt = pkt[:room]
		}
		now := drivenEpoch
		feed(s, now, pkt)
		replies := dev.take()
		if len(replies) > 1 {
			t.Fatalf("%d replies to one packet", len(replies))
		}
		for _, reply := range replies {
			var in inbound
			dst := netip.AddrFrom16([16]byte(reply[24:40]))
			if fam.cfg.Local.Is4() {
				dst = netip.AddrFrom4([4]byte(reply[16:20]))
			}
			if v := parsePacket(reply, dst, dst.Is4(), &in); v != packetOK || in.src != fam.cfg.Local {
				t.Fatalf("reply does not parse as a segment to %v: verdict %d, from %v", dst, v, in.src)
			}
		}
		// Time passes; the timers run; then a data segment arrives.
		s.tickAll(now.Add(time.Second))
		dev.take()
		before := *delivered
		feed(s, now.Add(time.Second), r.segment(flagACK|flagPSH, []byte("after")))
		if c.Err() == nil && *delivered != before+1 {
			t.Fatalf("a live conn did not deliver: state %s", c.Stats().State)
		}
	})
}

// FuzzReceiveOffload feeds arbitrary packets with arbitrary virtio-net
// headers, as an offloading device would hand them over, to a stack that
// holds an established conn from port 40000 of its peer (MSS 1000),
// IPv6 when the packet's version nibble says 6. Seeds are super-segments
// of that conn and of a stranger. Checksums are left as they are or
// fixed up as if the packet were one segment. Invariants: it never
// panics; every datagram handed over lies within its buffer, behind
// Headroom; the stack answers no more than once per segment the packet
// can stand for, each answer a sound segment from its address; and the
// conn still works afterwards unless the input ended it.
func FuzzReceiveOffload(f *testing.F) {
	families := map[bool]fuzzFamily{
		false: {Config{Local: addr4A, MSS: 1000, MTU: 8000}, addr4B},
		true:  {Config{Local: addr6A, MSS: 1000, MTU: 8000}, addr6B},
	}
	for _, fam := range families {
		stack := func() *remoteEnd {
			_, _, _, r := drivenStackOn(f, &recordDevice{keep: true, offload: true}, fam.cfg, netip.AddrPortFrom(fam.peer, 40000))
			return r
		}
		d := func(i, size int) []byte { return datagram(uint32(i), size)[Headroom:] }
		f.Add(stack().super(flagACK|flagPSH, tun.VirtioNeedsCsum, 100, d(0, 100), d(1, 100), d(2, 50)), false)
		f.Add(stack().super(flagACK, tun.VirtioDataValid, 1000, d(0, 1000), d(1, 1000)), false)
		f.Add(stack().super(flagACK|flagFIN, 0, 64, d(0, 64), d(1, 64)), true)
		f.Add(stack().super(flagACK, tun.VirtioNeedsCsum, 1200, d(0, 1200), d(1, 1200)), false)
		r := stack()
		r.hdr = newHeaders(netip.AddrPortFrom(fam.peer, 40002), netip.AddrPortFrom(fam.cfg.Local, testPort), 0)
		f.Add(r.super(flagACK|flagPSH, tun.VirtioNeedsCsum, 100, d(0, 100), d(1, 100)), false)
		plain := stack().segment(flagACK|flagPSH, d(0, 100))
		f.Add(append(make([]byte, tun.VirtioNetHdrLen), plain...), false)
	}
	f.Fuzz(func(t *testing.T, b []byte, fix bool) {
		if len(b) < tun.VirtioNetHdrLen {
			return
		}
		pkt := b[tun.VirtioNetHdrLen:]
		fam := families[len(pkt) > 0 && pkt[0]>>4 == 6]
		s, dev, c, r := drivenStackOn(t, &recordDevice{keep: true, offload: true}, fam.cfg, netip.AddrPortFrom(fam.peer, 40000))
		delivered := countPayloads(t, c)
		if fix {
			fixChecksums(pkt)
		}
		if room := len(s.rx.bufs[0]) - Headroom + tun.VirtioNetHdrLen; len(b) > room {
			b = b[:room]
		}
		var h tun.VirtioNetHdr
		_ = h.Decode(b)
		segments := 1
		if h.GSOSize > 0 {
			segments = len(b)/int(h.GSOSize) + 1
		}
		dev.take()
		feedVirtio(s, drivenEpoch, b)
		replies := dev.take()
		if len(replies) > segments {
			t.Fatalf("%d replies to a packet of at most %d segments", len(replies), segments)
		}
		for _, reply := range replies {
			var in inbound
			dst := netip.AddrFrom16([16]byte(reply[24:40]))
			if fam.cfg.Local.Is4() {
				dst = netip.AddrFrom4([4]byte(reply[16:20]))
			}
			if v := parsePacket(reply, dst, dst.Is4(), &in); v != packetOK || in.src != fam.cfg.Local {
				t.Fatalf("reply does not parse as a segment to %v: verdict %d, from %v", dst, v, in.src)
			}
		}
		now := drivenEpoch.Add(time.Second)
		s.tickAll(now)
		dev.take()
		before := *delivered
		feed(s, now, r.segment(flagACK|flagPSH, []byte("after")))
		if c.Err() == nil && *delivered != before+1 {
			t.Fatalf("a live conn did not deliver: state %s", c.Stats().State)
		}
	})
}

// fuzzFamily is one family's stack configuration and peer for the fuzz
// targets.
type fuzzFamily struct {
	cfg  Config
	peer netip.Addr
}

// countPayloads makes c's handler check that every payload lies within
// its buffer, past the headroom, and count them.
func countPayloads(t *testing.T, c *Conn) *int {
	delivered := new(int)
	c.SetHandler(func(batch []Payload) {
		for _, p := range batch {
			if p.Off < Headroom || p.N < 0 || p.Off+p.N > len(p.Buf) {
				t.Fatalf("payload at %d+%d in a %d-byte buffer", p.Off, p.N, len(p.Buf))
			}
		}
		*delivered += len(batch)
	})
	return delivered
}
