package client

import (
	"context"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
)

// pathScript drives a flow's linkPaths the way a daemon and a peer would,
// and checks where each new SPI lands.
type pathScript struct {
	t   *testing.T
	f   *flow
	now time.Time
	ids map[string]*linkPath // the script's names for paths
}

func newPathScript(t *testing.T) *pathScript {
	cl, err := New(Config{Peer: "192.0.2.1:4500"})
	if err != nil {
		t.Fatal(err)
	}
	f := newFlow(context.Background(), cl, flowKey{}, "192.0.2.1:4500")
	t.Cleanup(f.cancel)
	return &pathScript{t: t, f: f, now: time.Unix(1000, 0), ids: map[string]*linkPath{}}
}

func ike(ispi uint64, x framing.ExchangeType, flags uint8, msgID uint32) *framing.Message {
	var m framing.Message
	m.Kind = framing.KindIKE
	m.IKE = framing.IKEHeader{InitiatorSPI: ispi, ResponderSPI: ispi ^ 1, Exchange: x, Flags: flags, MessageID: msgID}
	if x == framing.IKESAInit && flags&framing.FlagResponse == 0 {
		m.IKE.ResponderSPI = 0
	}
	return &m
}

func esp(spi uint32) *framing.Message {
	var m framing.Message
	m.Kind, m.ESP.SPI = framing.KindESP, spi
	return &m
}

// daemon sends m; the path it takes is named name (first use) or must be
// the one named so.
func (s *pathScript) daemon(m *framing.Message, name string) {
	s.t.Helper()
	s.now = s.now.Add(100 * time.Millisecond)
	p := s.f.links.forDaemon(s.f, m, s.now.UnixNano())
	s.expect(p, name)
}

// peer sends IKE header h on the path named name.
func (s *pathScript) peer(m *framing.Message, name string) {
	s.t.Helper()
	s.now = s.now.Add(100 * time.Millisecond)
	s.f.links.fromPeer(s.ids[name], &m.IKE, s.now)
}

// peerESP sends ESP with spi on the path named name, and returns the
// outbound SPI this shows to be that path's, if one had gone elsewhere.
func (s *pathScript) peerESP(spi uint32, name string) uint32 {
	s.now = s.now.Add(100 * time.Millisecond)
	moved, _ := s.f.links.fromPeerESP(s.ids[name], spi, s.now)
	return moved
}

func (s *pathScript) expect(p *linkPath, name string) {
	s.t.Helper()
	if want, ok := s.ids[name]; ok {
		if p != want {
			s.t.Fatalf("went to another path than %s", name)
		}
		return
	}
	for n, q := range s.ids {
		if q == p {
			s.t.Fatalf("went to path %s, want a new one (%s)", n, name)
		}
	}
	s.ids[name] = p
}

// up brings an IKE SA ispi up on a new path named name: IKE_SA_INIT and
// IKE_AUTH both ways.
func (s *pathScript) up(ispi uint64, name string) {
	s.t.Helper()
	s.daemon(ike(ispi, framing.IKESAInit, framing.FlagInitiator, 0), name)
	s.peer(ike(ispi, framing.IKESAInit, framing.FlagResponse, 0), name)
	s.daemon(ike(ispi, framing.IKEAuth, framing.FlagInitiator, 1), name)
	s.peer(ike(ispi, framing.IKEAuth, framing.FlagResponse, 1), name)
}

// rekey runs a CREATE_CHILD_SA the daemon starts in IKE SA ispi.
func (s *pathScript) rekey(ispi uint64, msgID uint32, name string) {
	s.t.Helper()
	s.daemon(ike(ispi, framing.CreateChildSA, framing.FlagInitiator, msgID), name)
	s.peer(ike(ispi, framing.CreateChildSA, framing.FlagResponse, msgID), name)
}

func TestPathsOneIKESA(t *testing.T) {
	s := newPathScript(t)
	s.up(0xa, "A")
	s.daemon(esp(0xc1), "A")
	s.rekey(0xa, 2, "A") // a child rekey
	s.daemon(esp(0xc2), "A")
	s.rekey(0xa, 3, "A") // an IKE rekey
	s.daemon(ike(0xaa, framing.Informational, framing.FlagInitiator, 0), "A")
}

func TestPathsTwoIKESAsUsedInOrder(t *testing.T) {
	s := newPathScript(t)
	s.up(0xa, "A")
	s.up(0xb, "B")
	s.daemon(esp(0xc1), "A")
	s.daemon(esp(0xc2), "B")
}

// TestPathsPeerSideFirst: both IKE SAs are up, the second's child SA is
// used first, and the peer's side of it shows first: it goes where the
// peer's side came.
func TestPathsPeerSideFirst(t *testing.T) {
	s := newPathScript(t)
	s.up(0xa, "A")
	s.up(0xb, "B")
	s.peerESP(0xd2, "B")
	s.daemon(esp(0xc2), "B")
	s.daemon(esp(0xc1), "A")
}

// TestPathsInterleavedRekeys: B's IKE SA is rekeyed, then A's child SA.
// A's new child SA is guessed onto B at first (B's rekey came first, and
// nothing tells an IKE SA's rekey from a child SA's), until the peer's
// answer comes on A: then it moves to A. B's new IKE SA, at its first
// exchange, goes to B, and so does the child SA made there.
func TestPathsInterleavedRekeys(t *testing.T) {
	s := newPathScript(t)
	s.up(0xa, "A")
	s.daemon(esp(0xc1), "A")
	s.peerESP(0xd1, "A")
	s.up(0xb, "B")
	s.daemon(esp(0xc2), "B")
	s.peerESP(0xd2, "B")
	s.rekey(0xb, 2, "B") // B's IKE SA, rekeyed into 0xbb
	s.rekey(0xa, 2, "A") // A's child SA
	s.daemon(esp(0xc3), "B")
	if moved := s.peerESP(0xd3, "A"); moved != 0xc3 {
		t.Fatalf("the peer's answer on A moved SPI %#x, want 0xc3", moved)
	}
	s.daemon(esp(0xc3), "A")
	s.rekey(0xbb, 0, "B") // B's child SA, in the new IKE SA
	s.daemon(esp(0xc4), "B")
	if moved := s.peerESP(0xd4, "B"); moved != 0 {
		t.Fatalf("a right guess moved SPI %#x", moved)
	}
	s.daemon(esp(0xc3), "A")
}

// TestPathsChildRekeysUsedInOrder: two child SAs rekeyed on different
// IKE SAs, both used only afterwards, in the order they were made.
func TestPathsChildRekeysUsedInOrder(t *testing.T) {
	s := newPathScript(t)
	s.up(0xa, "A")
	s.daemon(esp(0xc1), "A")
	s.peerESP(0xd1, "A")
	s.up(0xb, "B")
	s.daemon(esp(0xc2), "B")
	s.peerESP(0xd2, "B")
	s.rekey(0xa, 2, "A")
	s.rekey(0xb, 2, "B")
	s.daemon(esp(0xc3), "A")
	s.peerESP(0xd3, "A")
	s.daemon(esp(0xc4), "B")
	s.peerESP(0xd4, "B")
}

// TestPathsIKERekeySeenFromThePeer: the peer speaks first in B's new IKE
// SA, which tells where it is; A's child rekey after it is not confused.
func TestPathsIKERekeySeenFromThePeer(t *testing.T) {
	s := newPathScript(t)
	s.up(0xa, "A")
	s.daemon(esp(0xc1), "A")
	s.up(0xb, "B")
	s.daemon(esp(0xc2), "B")
	s.rekey(0xb, 2, "B")
	s.peer(ike(0xbb, framing.Informational, framing.FlagInitiator, 0), "B")
	s.daemon(ike(0xbb, framing.Informational, framing.FlagResponse, 0), "B")
	s.rekey(0xa, 2, "A")
	s.daemon(esp(0xc3), "A")
}
