package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/server/statefile"
	"github.com/iketcp/iketcp/relay/ticket"
	"github.com/iketcp/iketcp/relay/udpbatch"
	"golang.org/x/sys/unix"
)

// A handover gives a running server's whole state to a server that
// replaces it (a new binary, started by the old: see package
// relay/upgrade): its sessions with their backend sockets, and its
// connections with their streams, so that neither the clients nor the
// gateway see a change. The old server's Handover stops it at a clean
// point: no new connection or session; each session's backend reader
// stopped (what the daemon sends meanwhile waits in the socket for the
// new server); each connection's reader stopped between two reads, with
// what it read and did not deliver, and its writer drained. The new
// server's Adopt takes it all before it serves.

// Handover is what a server hands its successor, with the file
// descriptors its fields index.
type Handover struct {
	// Table holds every session, half-open ones too (HalfOpen); the
	// backend socket of Table.Sessions[i] is the handover's file
	// SessionFiles+i.
	Table    statefile.Table `json:"table"`
	HalfOpen []uint64        `json:"half_open,omitempty"`
	// Conns are the connections handed over; their sockets follow the
	// sessions' in the files, in order: one for each conn without
	// Encap (a stream link's), none for one with (see HandoverConn).
	Conns []HandoverConn `json:"conns"`
}

// HandoverConn is one connection handed over.
type HandoverConn struct {
	Remote   string    `json:"remote"`
	Identity string    `json:"identity,omitempty"`
	Accepted time.Time `json:"accepted"`
	// The link's key exchange, if the client is an iketcp client.
	ClientPub []byte `json:"client_pub,omitempty"`
	ServerPub []byte `json:"server_pub,omitempty"`
	Key       []byte `json:"key,omitempty"`
	// Carrying are the sessions whose return path it is; Current the one
	// its last frame was for (0: none).
	Carrying []uint64 `json:"carrying,omitempty"`
	Current  uint64   `json:"current,omitempty"`
	// Local is the client's connection's local address (the server's
	// listening address, or the one a PROXY header named), and TLS that
	// the client's connection is TLS: for a connection whose socket is a
	// socketpair's end, relayed from a TLS connection the old server kept,
	// the client's, not the socketpair's.
	Local string `json:"local,omitempty"`
	TLS   bool   `json:"tls,omitempty"`
	// What its reader read and did not deliver.
	Pending       []byte `json:"pending,omitempty"`
	PrefixPending bool   `json:"prefix_pending,omitempty"`
	// Encap and State: a link with no socket (fake-TCP), handed over as
	// its state (relay.DetachedLink's); it has no file. Empty for a
	// stream link, which has one.
	Encap string          `json:"encap,omitempty"`
	State json.RawMessage `json:"state,omitempty"`
}

// Files is how many of h.Conns have a socket among the handover's files:
// those without Encap.
func (h *Handover) Files() int {
	n := 0
	for _, hc := range h.Conns {
		if hc.Encap == "" {
			n++
		}
	}
	return n
}

// ErrNotServing is Handover's error when there is nothing to hand over:
// the server is not serving, or stopping, or handing over already. The
// server is untouched.
var ErrNotServing = errors.New("server is not serving")

// HandoverTimeout bounds each connection's stop in a handover: its
// reader's, and its writer's draining.
const HandoverTimeout = 2 * time.Second

// Handover stops the serving server for a successor and calls send with
// what it hands over, and the files: first the sessions' backend sockets,
// then the stream connections' (duplicates; send need not keep them: they
// are closed when it returns); a link without a socket (fake-TCP) goes as
// its state, in its HandoverConn. A TLS connection, whose state cannot
// leave this process, stays here: its file is one end of a socketpair,
// and once send succeeded this server relays between the TLS connection
// and the other end (what the link read and did not deliver first) until
// either closes, or KeptTLS's bound. A connection that cannot be handed
// over (one that does not stop in time, a fake-TCP one whose stack the
// caller did not pause) is closed: its client reconnects, and claims its
// session from the successor. If send fails, nothing is left running: the
// state file, if any, has the sessions. Either way Serve then closes what
// is left here and returns.
func (s *Server) Handover(send func(*Handover, []*os.File) error) (err error) {
	s.mu.Lock()
	if s.closing || s.handedOver != nil || s.listeners == nil {
		s.mu.Unlock()
		return ErrNotServing
	}
	done := make(chan struct{})
	s.handedOver = done
	listeners := s.listeners
	s.mu.Unlock()
	defer close(done)

	// No new connections: the caller keeps the listening sockets for the
	// successor; what arrives meanwhile waits in their backlog.
	for _, ln := range listeners {
		ln.Close()
	}
	s.accepting.Wait()
	s.mu.Lock()
	s.handingOver = true // no new sessions either
	sessions := slices.Collect(maps.Values(s.sessions))
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	if s.stateDirty != nil {
		s.writeFinalState() // the successor owns the file from here
	}

	// The backend readers stop: nothing more is sent to the links.
	for _, sess := range sessions {
		sess.frozen.Store(true)
		sess.uc.SetReadDeadline(time.Now())
	}
	for _, sess := range sessions {
		<-sess.readerDone
	}

	// The links stop, all at once.
	detached := make([]*relay.DetachedLink, len(conns))
	whyNot := make([]error, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		d, ok := c.link.(relay.Detachable)
		if !ok {
			whyNot[i] = fmt.Errorf("a %T cannot be handed over", c.link)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			detached[i], whyNot[i] = d.Detach(HandoverTimeout)
		}()
	}
	wg.Wait()
	var notHanded int
	var firstWhy error
	for _, err := range whyNot {
		if err != nil {
			if notHanded++; firstWhy == nil {
				firstWhy = err
			}
		}
	}
	if notHanded > 0 { // one line, however many
		s.log.Info(fmt.Sprintf("%d connections not handed over: they close, and their clients reconnect and claim their sessions", notHanded),
			"first_reason", firstWhy.Error())
	}

	h := &Handover{}
	var files []*os.File
	var relays []*tlsRelay
	var relayFailed int
	var relayWhy error
	defer func() {
		for _, f := range files {
			f.Close()
		}
		for _, det := range detached {
			if det != nil && det.File != nil {
				det.File.Close()
			}
			if det != nil && det.Conn != nil {
				det.Conn.Close()
			}
		}
		for _, r := range relays { // send failed: not relayed
			r.close()
		}
	}()
	s.mu.Lock()
	h.Table = s.tableLocked(true)
	for _, e := range h.Table.Sessions {
		sess := s.sessions[e.ID]
		if !sess.confirmed.Load() {
			h.HalfOpen = append(h.HalfOpen, sess.id)
		}
		f, err := dupUDP(sess.uc)
		if err != nil {
			s.mu.Unlock()
			return fmt.Errorf("session %d's backend socket: %w", sess.id, err)
		}
		files = append(files, f)
	}
	for i, c := range conns {
		det := detached[i]
		if det == nil {
			continue
		}
		hc := HandoverConn{Remote: c.remote, Identity: c.identity, Accepted: c.accepted,
			Local: c.link.LocalAddr(), TLS: det.TLS, Pending: det.Pending, PrefixPending: det.PrefixPending}
		if hc.Identity == "" { // a link that has sent nothing yet: its handshake is done all the same
			hc.Identity = relay.IdentityOf(c.link)
		}
		if det.Conn != nil {
			r, err := newTLSRelay(det.Conn, det.Pending, c.remote)
			if err != nil { // it closes, as one that did not stop
				if relayFailed++; relayWhy == nil {
					relayWhy = err
				}
				continue
			}
			relays = append(relays, r)
			det.File, det.Conn, hc.Pending = r.peer, nil, nil // the relay writes what is pending first
			r.peer = nil
		}
		if det.File == nil {
			if det.Encap == "" || !json.Valid(det.State) {
				continue // neither a socket nor a state: it closes, as one that did not stop
			}
			hc.Encap, hc.State = det.Encap, det.State
		}
		if k := c.keys.Load(); k != nil {
			hc.ClientPub, hc.ServerPub, hc.Key = k.client, k.server, slices.Clone(k.key[:])
		}
		for sess := range c.carrying {
			if !sess.closed.Load() && sess.conn.Load() == c {
				hc.Carrying = append(hc.Carrying, sess.id)
			}
		}
		slices.Sort(hc.Carrying)
		if c.carries(c.current) {
			hc.Current = c.current.id
		}
		h.Conns = append(h.Conns, hc)
		if det.File != nil {
			files = append(files, det.File)
		}
		detached[i] = nil
	}
	s.mu.Unlock()
	if relayFailed > 0 { // one line, however many
		s.log.Warn(fmt.Sprintf("%d TLS connections not handed over: they close, and their clients reconnect and claim their sessions", relayFailed),
			"first_reason", relayWhy.Error())
	}
	s.log.Info("handing over", "sessions", len(h.Table.Sessions), "conns", len(h.Conns), "conns_not_handed_over", len(conns)-len(h.Conns),
		"tls_conns_relayed", len(relays))
	if err := send(h, files); err != nil {
		return err
	}
	if len(relays) > 0 {
		k := startKeptTLS(relays, s.log)
		relays = nil
		s.mu.Lock()
		s.kept = k
		s.mu.Unlock()
	}
	return nil
}

// dupUDP returns a close-on-exec duplicate of uc's socket.
func dupUDP(uc *net.UDPConn) (*os.File, error) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var derr error
	if err := raw.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", derr)
	}
	return os.NewFile(uintptr(nfd), "iketcp-backend"), nil
}

// Adopt takes what a predecessor's Handover gave: the sessions, each on
// its backend socket (backends[i] for h.Table.Sessions[i]), and the
// connections, each on the link the caller made of its socket and
// pending bytes (links[i] for h.Conns[i]). Call it once, before Serve,
// which serves them; the state file is then not read.
func (s *Server) Adopt(h *Handover, backends []*net.UDPConn, links []relay.Link) error {
	if len(backends) != len(h.Table.Sessions) || len(links) != len(h.Conns) {
		return fmt.Errorf("handover of %d sessions and %d connections came with %d and %d sockets",
			len(h.Table.Sessions), len(h.Conns), len(backends), len(links))
	}
	releases := make([]func() error, len(backends))
	for i, uc := range backends {
		releases[i] = uc.Close
		if s.cfg.AdoptBackend == nil {
			continue
		}
		release, err := s.cfg.AdoptBackend(uc)
		if err != nil {
			for _, r := range releases[:i] {
				r()
			}
			return fmt.Errorf("session %d's backend socket: %w", h.Table.Sessions[i].ID, err)
		}
		releases[i] = release
	}
	now := time.Now()
	halfOpen := make(map[uint64]bool, len(h.HalfOpen))
	for _, id := range h.HalfOpen {
		halfOpen[id] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.adopted || len(s.sessions) > 0 {
		for _, r := range releases {
			r()
		}
		return errors.New("Adopt on a server that has sessions")
	}
	s.adopted = true
	for i := range h.Table.Sessions {
		e := &h.Table.Sessions[i]
		uc := backends[i]
		sess := &session{
			srv: s, id: e.ID, src: source(e.Source), owner: e.Owner, created: e.Created,
			udp:        udpbatch.New(uc, udpbatch.Options{BatchSize: sessionBatch, Logger: s.log}),
			uc:         uc,
			readerDone: make(chan struct{}),
			release:    releases[i],
			local:      uc.LocalAddr().(*net.UDPAddr).AddrPort(),
		}
		sess.lastActive.Store(e.LastActive.UnixNano())
		sess.conns.Store(1)
		if len(e.Key) == ticket.KeySize {
			sess.key, sess.keyed = ticket.Key(e.Key), true
		}
		u := s.useLocked(sess.src)
		u.sessions++
		if halfOpen[e.ID] {
			u.halfOpen++
			s.halfOpen++
		} else {
			sess.confirmed.Store(true)
		}
		s.sessions[sess.id] = sess
		for _, r := range e.IKE {
			if rt := s.routes.ike.add(sess, &sess.ikeKeys, r.SPI, now); rt != nil {
				rt.maxReq, rt.anyReq = r.MaxReq, r.Requests
			}
		}
		for _, spi := range e.ESP {
			s.routes.esp.add(sess, &sess.espKeys, spi, now)
		}
	}
	for next := s.nextSessionID.Load(); next < h.Table.NextSession; next = s.nextSessionID.Load() {
		s.nextSessionID.CompareAndSwap(next, h.Table.NextSession)
	}
	for i, hc := range h.Conns {
		link := links[i]
		c := s.newConnLocked(link, hc.Remote, sourceOf(hc.Remote), hc.Accepted)
		c.identity = hc.Identity // the link's Identity says it too, from its first burst on
		s.useLocked(c.src).unconfirmed++
		if len(hc.Key) == ticket.KeySize {
			c.keys.Store(&linkKeys{client: hc.ClientPub, server: hc.ServerPub, key: ticket.Key(hc.Key)})
		}
		for _, id := range hc.Carrying {
			if sess := s.sessions[id]; sess != nil && sess.conn.Load() == nil {
				s.carryLocked(sess, c)
			}
		}
		if sess := s.sessions[hc.Current]; sess != nil && sess.conn.Load() == c {
			c.current = sess
		}
		s.adoptedConns = append(s.adoptedConns, c)
	}
	s.counters.SessionsRestored.Add(uint64(len(h.Table.Sessions)))
	return nil
}

// startAdopted starts the backend readers of adopted sessions and serves
// the adopted connections. Serve calls it before it accepts.
func (s *Server) startAdopted() {
	s.mu.Lock()
	if !s.adopted {
		s.mu.Unlock()
		return
	}
	conns := s.adoptedConns
	s.adoptedConns = nil
	sessions := slices.Collect(maps.Values(s.sessions))
	s.wg.Add(len(sessions) + len(conns))
	s.mu.Unlock()
	for _, sess := range sessions {
		go sess.readBackend()
	}
	for _, c := range conns {
		go s.serveConn(c)
	}
	s.log.Info(fmt.Sprintf("took over %d sessions and %d connections", len(sessions), len(conns)))
}
