package client

import (
	"sync"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
)

// linkPaths are a flow's link paths and how the daemon's datagrams find
// theirs. An IKE message's IKE SA says it, once the path of that IKE SA is
// known, and an IKE_SA_INIT request opens a new path. The rest is
// inference, because the daemons' SPIs say nothing of their IKE SA to
// anyone outside them:
//
//   - A rekeyed IKE SA's SPI first shows in a message of the peer's (the
//     server sends each session's messages on its connection: then the
//     path is known) or of the daemon's, at the SA's first exchange, which
//     may come long after the rekey: it goes to the path of the oldest
//     CREATE_CHILD_SA whose new SA has not shown yet.
//   - A new outbound ESP SPI goes, first, to a path that got a new
//     inbound ESP SPI not yet paired (the peer's side of the same child SA,
//     seen first); else to the path of the newest CREATE_CHILD_SA still
//     unpaired (a rekeyed child SA's outbound SA is used at once, a rekeyed
//     IKE SA's only at its next exchange); else to the oldest IKE_AUTH
//     still unpaired; else to the path used last.
//
// That is exact with one IKE SA, and right for several as long as the
// daemon uses each child SA soon after making it. The server delivers ESP
// by its SPI wherever it arrives.
type linkPaths struct {
	mu    sync.Mutex // guards the following; taken after Client.mu
	paths []*linkPath
	byIKE map[uint64]*linkPath
	byESP map[uint32]*linkPath
	in    map[uint32]*linkPath // inbound ESP SPIs seen, by path
	last  *linkPath            // the path used last

	// What the paths made whose SPIs have not shown yet, oldest first.
	auths   []pending // IKE_AUTH answered: a child SA
	rekeys  []pending // CREATE_CHILD_SA answered: a child SA, or an IKE SA
	inbound []pending // a new inbound ESP SPI, not yet paired with an outbound one
	// outbound counts, per path, new outbound SPIs not yet paired with an
	// inbound one, so that the pair's inbound side is not taken for
	// evidence of another child SA.
	outbound []pending
}

// pending is something a path made, and when. An outbound SPI whose path
// was guessed keeps its SPI, and what made the guess (to give back if the
// guess was wrong).
type pending struct {
	p    *linkPath
	at   time.Time
	spi  uint32
	made *pending
	auth bool // made by an IKE_AUTH, not a CREATE_CHILD_SA
}

const (
	// pairWindow is how long a new SPI on one side waits for the other
	// side's to pair with.
	pairWindow = 3 * time.Second
	// maxPending bounds each list of pending things.
	maxPending = 16
)

func (lp *linkPaths) init() {
	lp.byIKE = make(map[uint64]*linkPath)
	lp.byESP = make(map[uint32]*linkPath)
	lp.in = make(map[uint32]*linkPath)
}

// forDaemon returns the path for a datagram of the daemon's, decoded in
// msg, opening one if needed.
func (lp *linkPaths) forDaemon(f *flow, msg *framing.Message, now int64) *linkPath {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	t := time.Unix(0, now)
	var p *linkPath
	switch msg.Kind {
	case framing.KindIKE:
		h := &msg.IKE
		if p = lp.byIKE[h.InitiatorSPI]; p == nil {
			if !h.IsInitRequest() {
				// A rekeyed IKE SA stays on its predecessor's link.
				if e, ok := takeOldest(&lp.rekeys, nil); ok {
					p = e.p // made by a CREATE_CHILD_SA: an IKE SA rekey
				} else {
					p = lp.last
				}
			}
			if p == nil {
				p = lp.openLocked(f)
			}
			lp.byIKE[h.InitiatorSPI] = p
		}
		lp.exchangeLocked(p, h, t)
		p.book.NoteIKE(h)
		f.book.NoteIKE(h)
	case framing.KindESP:
		if p = lp.byESP[msg.ESP.SPI]; p == nil {
			p = lp.newOutboundLocked(f, msg.ESP.SPI, t)
			lp.byESP[msg.ESP.SPI] = p
			p.book.NoteESPOut(msg.ESP.SPI)
			f.book.NoteESPOut(msg.ESP.SPI)
		}
	}
	lp.last = p
	p.lastUsed.Store(now)
	return p
}

// newOutboundLocked picks the path of a new outbound ESP SPI.
func (lp *linkPaths) newOutboundLocked(f *flow, spi uint32, now time.Time) *linkPath {
	expire(&lp.inbound, now)
	if e, ok := takeOldest(&lp.inbound, nil); ok {
		// The peer's side of this child SA came first: the path is known.
		takeOldestOf(&lp.auths, &lp.rekeys, e.p)
		return e.p
	}
	guess := pending{at: now, spi: spi}
	if e, ok := takeOldestOf(&lp.auths, &lp.rekeys, nil); ok {
		guess.p, guess.made = e.p, &e
	} else if guess.p = lp.last; guess.p == nil {
		guess.p = lp.openLocked(f)
	}
	push(&lp.outbound, guess)
	return guess.p
}

// fromPeer learns from an IKE message the peer sent on path p: the IKE
// SA is p's (the server sends each session's messages on its connection),
// and a new one there was a rekey of p's.
func (lp *linkPaths) fromPeer(p *linkPath, h *framing.IKEHeader, now time.Time) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if lp.byIKE[h.InitiatorSPI] == nil {
		lp.byIKE[h.InitiatorSPI] = p
		takeOldest(&lp.rekeys, p) // that CREATE_CHILD_SA rekeyed the IKE SA
	}
	lp.exchangeLocked(p, h, now)
	p.book.NoteIKE(h)
}

// fromPeerESP notes an inbound ESP SPI on path p. A new one is the peer's
// side of a child SA of p's. It pairs with the oldest outbound SPI p
// showed lately; failing that, with the oldest one guessed onto another
// path lately, which the peer's answer shows to be p's: that SPI moves to
// p, and fromPeerESP returns it (the server is told, if it is iketcp).
// Failing both, it is evidence for the next new outbound SPI.
func (lp *linkPaths) fromPeerESP(p *linkPath, spi uint32, now time.Time) (moved uint32, from *linkPath) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if lp.in[spi] != nil {
		return 0, nil
	}
	lp.in[spi] = p
	expire(&lp.outbound, now)
	if _, paired := takeOldest(&lp.outbound, p); paired {
		return 0, nil
	}
	if g, ok := takeOldest(&lp.outbound, nil); ok && lp.byESP[g.spi] == g.p {
		// Guessed wrong: what made the guess is the other path's again,
		// and p's own child SA exchange is spent.
		if g.made != nil {
			give(lp, *g.made)
		}
		takeOldestOf(&lp.auths, &lp.rekeys, p)
		lp.byESP[g.spi] = p
		p.book.NoteESPOut(g.spi)
		return g.spi, g.p
	}
	push(&lp.inbound, pending{p: p, at: now})
	return 0, nil
}

// give puts e back in the list it came from, in the order of time.
func give(lp *linkPaths, e pending) {
	list := &lp.rekeys
	if e.auth {
		list = &lp.auths
	}
	i := len(*list)
	for i > 0 && (*list)[i-1].at.After(e.at) {
		i--
	}
	*list = append(*list, pending{})
	copy((*list)[i+1:], (*list)[i:])
	(*list)[i] = e
}

// exchangeLocked notes what an IKE message says of p's SAs: the answer to
// an IKE_AUTH made a child SA, the answer to a CREATE_CHILD_SA a child SA
// or a rekeyed IKE SA.
func (lp *linkPaths) exchangeLocked(p *linkPath, h *framing.IKEHeader, now time.Time) {
	if !h.IsResponse() {
		return
	}
	switch h.Exchange {
	case framing.IKEAuth:
		// EAP takes several rounds: one child SA for all of them.
		for _, e := range lp.auths {
			if e.p == p {
				return
			}
		}
		push(&lp.auths, pending{p: p, at: now, auth: true})
	case framing.CreateChildSA:
		push(&lp.rekeys, pending{p: p, at: now})
	}
}

// push appends e, dropping the oldest beyond maxPending.
func push(list *[]pending, e pending) {
	if len(*list) == maxPending {
		*list = append((*list)[:0], (*list)[1:]...)
	}
	*list = append(*list, e)
}

// expire drops what is older than pairWindow.
func expire(list *[]pending, now time.Time) {
	keep := (*list)[:0]
	for _, e := range *list {
		if now.Sub(e.at) <= pairWindow {
			keep = append(keep, e)
		}
	}
	clear((*list)[len(keep):])
	*list = keep
}

// takeOldest removes and returns the oldest entry, of path p if p is not
// nil.
func takeOldest(list *[]pending, p *linkPath) (pending, bool) {
	for i, e := range *list {
		if p == nil || e.p == p {
			*list = append((*list)[:i], (*list)[i+1:]...)
			return e, true
		}
	}
	return pending{}, false
}

// takeOldestOf removes and returns the oldest entry of two lists, of
// path p if p is not nil.
func takeOldestOf(a, b *[]pending, p *linkPath) (pending, bool) {
	ia, ib := index(*a, p), index(*b, p)
	switch {
	case ia < 0 && ib < 0:
		return pending{}, false
	case ib < 0 || ia >= 0 && !(*a)[ia].at.After((*b)[ib].at):
		return takeOldest(a, p)
	}
	return takeOldest(b, p)
}

// index returns the index of the oldest entry of path p (any path if p
// is nil), or -1.
func index(list []pending, p *linkPath) int {
	for i, e := range list {
		if p == nil || e.p == p {
			return i
		}
	}
	return -1
}

// openLocked opens a new path for f.
func (lp *linkPaths) openLocked(f *flow) *linkPath {
	p := newLinkPath(f)
	lp.paths = append(lp.paths, p)
	return p
}

// prune closes the paths the daemon has not used for idle, and forgets
// them.
func (lp *linkPaths) prune(now time.Time, idle time.Duration) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	keep := lp.paths[:0]
	for _, p := range lp.paths {
		if now.Sub(time.Unix(0, p.lastUsed.Load())) <= idle {
			keep = append(keep, p)
			continue
		}
		p.cancel()
		for k, q := range lp.byIKE {
			if q == p {
				delete(lp.byIKE, k)
			}
		}
		for k, q := range lp.byESP {
			if q == p {
				delete(lp.byESP, k)
			}
		}
		for k, q := range lp.in {
			if q == p {
				delete(lp.in, k)
			}
		}
		for _, list := range []*[]pending{&lp.auths, &lp.rekeys, &lp.inbound, &lp.outbound} {
			for {
				if _, ok := takeOldest(list, p); !ok {
					break
				}
			}
		}
		if lp.last == p {
			lp.last = nil
		}
	}
	clear(lp.paths[len(keep):])
	lp.paths = keep
}

// aggregateStatus describes the aggregates of the paths that are.
func (lp *linkPaths) aggregateStatus(now time.Time) []relay.AggregateStatus {
	lp.mu.Lock()
	paths := append([]*linkPath(nil), lp.paths...)
	lp.mu.Unlock()
	var out []relay.AggregateStatus
	for _, p := range paths {
		if p.members != nil {
			out = append(out, p.aggregateStatus(now))
		}
	}
	return out
}

// status describes the paths.
func (lp *linkPaths) status() []relay.LinkStatus {
	lp.mu.Lock()
	paths := append([]*linkPath(nil), lp.paths...)
	lp.mu.Unlock()
	out := make([]relay.LinkStatus, 0, len(paths))
	for _, p := range paths {
		ls := relay.LinkStatus{ID: p.id, Connections: p.conns.Load()}
		state := p.state.Load()
		if p.members != nil {
			state = stateWaiting
			for _, m := range p.members {
				if s := m.state.Load(); s == stateUp || s == stateConnecting && state != stateUp {
					state = s
				}
			}
		}
		switch state {
		case stateUp:
			ls.State = "up"
		case stateConnecting:
			ls.State = "connecting"
		default:
			ls.State = "waiting"
		}
		p.mu.Lock()
		ls.Peer, ls.Local, ls.Session = relay.OrDefault(p.peer, p.f.dial), p.local, p.session
		p.mu.Unlock()
		p.book.FillLink(&ls)
		out = append(out, ls)
	}
	return out
}
