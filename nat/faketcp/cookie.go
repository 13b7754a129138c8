package faketcp

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"net/netip"
	"time"
)

// SYN cookies: a listener answers a SYN with one SYN-ACK whose ISN is a
// cookie, and keeps nothing; the segment that returns the cookie (ack =
// cookie+1) proves the peer got the SYN-ACK at its address, and the
// cookie gives back what the conn needs of the SYN. See the package
// documentation.
//
// A cookie's 32 bits, from the most significant:
//
//	31..7  MAC: the first 25 bits of HMAC-SHA256(key, message), where
//	       the message is the slot counter (32 bits), the local address
//	       and port, the remote address and port (addresses in their
//	       16-byte form), the peer's ISN, and the cookie's bits 6..0
//	6      the low bit of the slot counter
//	5..2   the peer's MSS: an index into cookieMSS, rounded down
//	1      the peer offered window scaling
//	0      the peer offered SACK
//
// The slot counter is Unix time in cookieSlot units. A check takes the
// current slot or the previous one, whichever has the cookie's bit 6, so
// a cookie is good for at least one slot and at most two; one from two
// slots ago has the current slot's parity, and its MAC, made with the
// older counter, fails. The MAC covers the option bits, so a forger
// cannot change them, and the peer's ISN, so each SYN gets a cookie of
// its own and only a segment whose seq is that ISN+1 (the handshake's
// ACK, or the first data segment) returns it.
//
// Only whether the peer offered window scaling matters, not its shift:
// the stack never reads the peer's window (it has no flow control), and
// the offer alone decides whether its own window field is scaled.
const (
	// cookieSlot is the period of the cookie's time counter.
	cookieSlot = 64 * time.Second
	// cookieMACBits is how many bits of the cookie are its MAC.
	cookieMACBits = 25
	cookieLowBits = 32 - cookieMACBits
	cookieLowMask = 1<<cookieLowBits - 1
	cookieSlotBit = 1 << 6
	cookieMSSLow  = 2 // the MSS index's shift
	cookieWScale  = 1 << 1
	cookieSACK    = 1 << 0
	// cookieMsgLen is the MAC's message: counter, two addresses and
	// ports, ISN, low bits. With HMAC's 64-byte block it needs one
	// compression for the inner hash and one for the outer.
	cookieMsgLen = 4 + 2*(16+2) + 4 + 1
)

// cookieMSS are the MSS values a cookie can carry; a SYN's MSS is
// rounded down to one of them. Besides the defaults of a SYN with no MSS
// option (536 for IPv4, 1220 for IPv6), they are what paths commonly
// clamp to: Ethernet (1460, 1440 for IPv6), PPPoE (1452, 1432), tunnels
// and VPNs (1420 down to 1280), a 9000-byte jumbo frame over IPv6
// (8940). A SYN that asks for less than 48 bytes gets 48, the least
// Linux sends to any peer (tcp_min_snd_mss).
var cookieMSS = [16]uint16{48, 536, 1200, 1220, 1280, 1300, 1340, 1360, 1380, 1400, 1420, 1432, 1440, 1452, 1460, 8940}

// cookieMSSIndex is the index of the largest cookieMSS entry not above
// mss, or 0.
func cookieMSSIndex(mss uint16) uint8 {
	for i := len(cookieMSS) - 1; i > 0; i-- {
		if cookieMSS[i] <= mss {
			return uint8(i)
		}
	}
	return 0
}

// synCookie is a cookie and what it says of the SYN, with what else the
// digest that made it gives: the IPv6 flow label and the IPv4 ID of the
// SYN-ACK, which the conn goes on from, so that its packets look like
// one connection's.
type synCookie struct {
	iss           uint32
	peerMSS       uint16
	windowScale   bool
	sackPermitted bool
	flowLabel     uint32
	ipID          uint16
}

// cookieJar makes and checks cookies with one key. It is not safe for
// concurrent use (its MAC keeps state): the stack's reader owns one. It
// does not allocate.
type cookieJar struct {
	mac hash.Hash
	msg [cookieMsgLen]byte
	sum [sha256.Size]byte
}

func newCookieJar(key []byte) cookieJar {
	return cookieJar{mac: hmac.New(sha256.New, key)}
}

// cookieCounter is the slot counter at now.
func cookieCounter(now time.Time) uint32 {
	return uint32(now.Unix() / int64(cookieSlot/time.Second))
}

// make is the cookie for syn, from remote to local, at now; defaultMSS
// stands for a missing MSS option.
func (j *cookieJar) make(now time.Time, local, remote netip.AddrPort, syn *segment, defaultMSS uint16) synCookie {
	mss := syn.mss
	if mss == 0 {
		mss = defaultMSS
	}
	counter := cookieCounter(now)
	low := uint32(cookieMSSIndex(mss)) << cookieMSSLow
	if counter&1 != 0 {
		low |= cookieSlotBit
	}
	if syn.windowScale {
		low |= cookieWScale
	}
	if syn.sackPermitted {
		low |= cookieSACK
	}
	return j.cookie(counter, local, remote, syn.seq, low)
}

// check reports whether seg, from remote to local at now, returns a
// cookie this jar made and that is still good: ack-1 is the cookie, and
// seq-1 the ISN of the SYN it answered. It returns the cookie.
func (j *cookieJar) check(now time.Time, local, remote netip.AddrPort, seg *segment) (synCookie, bool) {
	iss := seg.ack - 1
	low := iss & cookieLowMask
	counter := cookieCounter(now)
	if (counter&1 != 0) != (low&cookieSlotBit != 0) {
		counter--
	}
	c := j.cookie(counter, local, remote, seg.seq-1, low)
	return c, c.iss == iss
}

// cookie computes the cookie with the given low bits.
func (j *cookieJar) cookie(counter uint32, local, remote netip.AddrPort, peerISS, low uint32) synCookie {
	m := j.msg[:]
	binary.BigEndian.PutUint32(m[0:4], counter)
	l, r := local.Addr().As16(), remote.Addr().As16()
	copy(m[4:20], l[:])
	binary.BigEndian.PutUint16(m[20:22], local.Port())
	copy(m[22:38], r[:])
	binary.BigEndian.PutUint16(m[38:40], remote.Port())
	binary.BigEndian.PutUint32(m[40:44], peerISS)
	m[44] = byte(low)
	j.mac.Reset()
	j.mac.Write(m)
	sum := j.mac.Sum(j.sum[:0])
	return synCookie{
		iss:           binary.BigEndian.Uint32(sum[0:4])&^cookieLowMask | low,
		peerMSS:       cookieMSS[low>>cookieMSSLow&0xf],
		windowScale:   low&cookieWScale != 0,
		sackPermitted: low&cookieSACK != 0,
		flowLabel:     binary.BigEndian.Uint32(sum[4:8]) & 0xfffff,
		ipID:          binary.BigEndian.Uint16(sum[8:10]),
	}
}
