package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// ListenUDP opens explicit mode's local UDP socket for the IKE daemon.
func ListenUDP(addr string) (*net.UDPConn, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w (want host:port, e.g. 127.0.0.1:14500)", addr, err)
	}
	uc, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, relay.ListenHint(err, "the IKE daemon (or another iketcp) holds this UDP port: choose another --listen port and set the daemon's remote_port to it")
	}
	relay.SizeSocketBuffers(uc)
	return uc, nil
}

// Serve runs explicit mode: the daemon is configured to send to pc (its
// remote address and port are pc's), from port 4500, so that every
// datagram is already in port-4500 form. Serve reads pc until ctx is done
// or pc fails, then closes pc and every flow, waits for its goroutines and
// returns. It returns nil when ctx ended it.
func (cl *Client) Serve(ctx context.Context, pc *net.UDPConn) error {
	if cl.cfg.Peer == "" {
		return errors.New("explicit mode needs a peer (the iketcp server, host:port)")
	}
	if _, _, err := net.SplitHostPort(cl.cfg.Peer); err != nil {
		return fmt.Errorf("peer %q: %w (want host:port, e.g. 203.0.113.2:4500 or [2001:db8::1]:4500)", cl.cfg.Peer, err)
	}
	side := &udpSide{cl: cl, bc: udpbatch.New(pc, udpbatch.Options{BatchSize: clientBatch, Logger: cl.log, GRO: true})}
	side.msgs = make([]udpbatch.Message, clientBatch)
	cl.mu.Lock()
	cl.mode = modeExplicit
	cl.listen = pc.LocalAddr().String()
	cl.side = side
	cl.mu.Unlock()
	cl.log.Info("client listening", "mode", modeExplicit, "listen", cl.listen, "peer", cl.cfg.Peer)
	return cl.run(ctx, side)
}

// udpSide is explicit mode's daemon side: the UDP socket the daemon sends
// to, each of its addresses a flow.
//
// The socket starts with receive offload (UDP_GRO): a daemon that sends
// runs of datagrams with segmentation offload then costs one system call
// a run. A daemon that does not gains nothing from it, and every datagram
// is copied once more, so after groTrial datagrams without a run the side
// turns it off.
type udpSide struct {
	cl    *Client
	bc    *udpbatch.Conn
	msgs  []udpbatch.Message // read's scratch
	trial uint64             // datagrams read while GRO is on
}

// groTrial is how many datagrams the daemon side reads before it turns
// receive offload off for want of a run.
const groTrial = 4096

func (s *udpSide) batchSize() int { return clientBatch }
func (s *udpSide) Close() error   { return s.bc.Close() }

func (s *udpSide) read(in []arrival) (int, error) {
	cl := s.cl
	msgs := s.msgs[:len(in)]
	for i := range in {
		msgs[i].Buf = in[i].d.buf[relay.Headroom:]
	}
	n, err := relay.ReadUDP(s.bc, msgs, cl.counters, func(err error) {
		cl.logDrop.Log(cl.log, slog.LevelWarn, "receive from the IKE daemon failed", "err", err)
	})
	if err != nil {
		return 0, err
	}
	if s.trial < groTrial && s.bc.GRO() {
		if s.trial += uint64(n); s.trial >= groTrial && s.bc.Coalesced() == 0 {
			s.bc.StopGRO()
			cl.log.Debug("receive offload off: the daemon sends no runs of datagrams", "datagrams", s.trial)
		}
	}
	for i := range msgs[:n] {
		m, a := &msgs[i], &in[i]
		*a = arrival{d: a.d, key: flowKey{daemon: m.Addr}}
		if m.Truncated {
			a.skip = true
			cl.logOversize.Log(cl.log, slog.LevelWarn, "datagram from the daemon dropped: larger than --max-datagram",
				"from", m.Addr.String(), "max", cl.cfg.maxDatagram())
			continue
		}
		if m.Addr.Port() == 500 {
			// From port 500 IKE has no non-ESP marker, and after NAT
			// detection the daemon would float its peer's port to 4500:
			// to itself, in explicit mode. Refused, with the fix.
			a.skip = true
			cl.counters.Port500Refused.Add(1)
			cl.logDrop.Log(cl.log, slog.LevelError, "datagram from the IKE daemon's port 500 refused: explicit mode needs the daemon "+
				"on port 4500 (strongSwan: local_port = 4500 in the connection), or use --tun", "daemon", m.Addr.String())
			continue
		}
		a.d.off, a.d.n = relay.Headroom, m.N
	}
	return n, nil
}

// deliver is explicit mode's return path: the datagrams go to the
// daemon's address as they are, in one sendmmsg.
func (s *udpSide) deliver(f *flow, burst []relay.Datagram, scratch *[]udpbatch.Message) error {
	out := (*scratch)[:0]
	var bytes uint64
	for _, d := range burst {
		out = append(out, udpbatch.Message{Buf: d.Bytes(), Addr: f.key.daemon})
		bytes += uint64(d.N)
	}
	n, err := relay.WriteUDP(s.bc, out)
	var k relay.Kinds
	for i := range out[:n] {
		k.Note(out[i].Buf)
	}
	f.traffic.CountIn(s.cl.counters, n, bytes, k)
	if err != nil {
		s.cl.counters.WriteErrors.Add(uint64(len(out) - n))
	}
	clear(out)
	*scratch = out[:0]
	return err
}
