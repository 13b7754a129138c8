package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/nat/packet"
	"github.com/iketcp/iketcp/nat/tun"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// ServeTUN runs transparent mode: dev delivers the IP packets that the
// daemon sends to its peers (UDP 500 and 4500, and raw ESP), with its
// configuration unchanged; replies go back into dev as packets from the
// peer to the port the daemon used. Each daemon-peer pair is one flow,
// dialled at the peer's TCPPort. ServeTUN returns when ctx is done (nil)
// or dev fails; it closes dev.
func (cl *Client) ServeTUN(ctx context.Context, dev tun.Device, name string) error {
	if len(cl.cfg.Peers) == 0 {
		return errors.New("transparent mode needs the IKE peers' addresses")
	}
	if len(cl.cfg.Members) > 0 {
		return errors.New("aggregate members work in explicit mode only: each member dials the hub itself")
	}
	batch := min(max(dev.BatchSize(), 1), clientBatch)
	side := &tunSide{cl: cl, dev: dev, bufs: make([][]byte, batch), sizes: make([]int, batch)}
	cl.mu.Lock()
	cl.mode = modeTransparent
	cl.listen = "tun " + name
	cl.side = side
	cl.mu.Unlock()
	cl.log.Info("client intercepting", "mode", modeTransparent, "device", name, "peers", fmt.Sprint(cl.cfg.Peers),
		"tcp_port", cl.cfg.tcpPort())
	return cl.run(ctx, side)
}

// tunSide is transparent mode's daemon side: the TUN device that
// intercepts the daemon's packets to its peers, each daemon and peer a
// flow.
type tunSide struct {
	cl    *Client
	dev   tun.Device
	bufs  [][]byte // read's scratch
	sizes []int
	info  packet.Info
}

func (s *tunSide) batchSize() int { return len(s.bufs) }
func (s *tunSide) Close() error   { return s.dev.Close() }

// isPeer reports whether a is one of the configured peers.
func (s *tunSide) isPeer(a netip.Addr) bool {
	for _, p := range s.cl.cfg.Peers {
		if p.Unmap() == a {
			return true
		}
	}
	return false
}

// read reads a batch of the daemon's packets and turns each into a
// datagram in port-4500 form in place. Packets land relay.Headroom into
// their buffers, so that a datagram cut out of one keeps room for a
// link's headers in front of it.
func (s *tunSide) read(in []arrival) (int, error) {
	cl := s.cl
	bufs := s.bufs[:len(in)]
	for i := range in {
		bufs[i] = in[i].d.buf
	}
	for {
		n, err := s.dev.Read(bufs, s.sizes, relay.Headroom)
		if err == nil {
			for i := range in[:n] {
				s.parse(&in[i], s.sizes[i])
			}
			return n, nil
		}
		if errors.Is(err, net.ErrClosed) {
			return 0, err
		}
		cl.logDrop.Log(cl.log, slog.LevelWarn, "read from the TUN device failed", "err", err)
		time.Sleep(10 * time.Millisecond) // do not spin on a persistent error
	}
}

// parse turns one packet of size bytes into an arrival, or marks it to
// skip, counted.
func (s *tunSide) parse(a *arrival, size int) {
	cl := s.cl
	d := a.d
	*a = arrival{d: d}
	pkt := d.buf[relay.Headroom : relay.Headroom+size]
	info := &s.info
	if err := packet.Parse(pkt, info); err != nil {
		a.skip = true
		if errors.Is(err, packet.ErrTruncated) && size == len(d.buf)-relay.Headroom {
			// The device cut a packet longer than the buffer.
			cl.counters.OversizedDgrams.Add(1)
			cl.logOversize.Log(cl.log, slog.LevelWarn, "intercepted packet dropped: larger than --max-datagram",
				"max", cl.cfg.maxDatagram())
			return
		}
		cl.counters.Malformed.Add(1)
		cl.logDrop.Log(cl.log, slog.LevelWarn, "intercepted packet dropped", "err", err, "len", size)
		return
	}
	if !s.isPeer(info.Dst) {
		a.skip = true
		cl.counters.Foreign.Add(1)
		cl.logDrop.Log(cl.log, slog.LevelWarn, "intercepted packet for an address that is not a --peer dropped",
			"dst", info.Dst.String())
		return
	}
	d.off, d.n = relay.Headroom+info.PayloadOffset, info.PayloadLen
	if info.Proto != packet.ProtoESP && info.DstPort == 500 {
		// Port 500 carries IKE without the non-ESP marker: add it in
		// place over the UDP header, which is done with.
		d.off -= framing.MarkerSize
		clear(d.buf[d.off : d.off+framing.MarkerSize])
		d.n += framing.MarkerSize
	}
	a.key = flowKey{daemon: netip.AddrPortFrom(info.Src, 0), peer: info.Dst}
	a.intercepted, a.rawESP = true, info.Proto == packet.ProtoESP
	a.srcPort, a.dstPort = info.SrcPort, info.DstPort
}

// deliver is transparent mode's return path: each datagram becomes an IP
// packet from the peer to the daemon's port, its headers written in place
// in front of it (every link leaves relay.Headroom free), and goes into
// the device. Packets are written one at a time because each one's
// headers overwrite the tail of the datagram before it.
func (s *tunSide) deliver(f *flow, burst []relay.Datagram, _ *[]udpbatch.Message) error {
	cl := s.cl
	ports := f.ports.load()
	daemon, peer := f.key.daemon.Addr(), f.key.peer
	var one [1][]byte
	var sent int
	var bytes uint64
	var k relay.Kinds
	var lastErr error
	for _, r := range burst {
		buf := r.Buf
		end := r.Off + r.N
		var start int
		var err error
		kind := framing.Classify(buf[r.Off:end])
		switch kind {
		case framing.KindIKE:
			off := r.Off
			if ports.ikePeer == 500 {
				off += framing.MarkerSize // port 500 carries IKE without the marker
			}
			start, err = packet.PutUDP(buf[:end], off, netip.AddrPortFrom(peer, ports.ikePeer), netip.AddrPortFrom(daemon, ports.ikeDaemon))
		case framing.KindESP:
			if ports.espRaw {
				start, err = packet.PutESP(buf[:end], r.Off, peer, daemon)
			} else {
				start, err = packet.PutUDP(buf[:end], r.Off, netip.AddrPortFrom(peer, ports.espPeer), netip.AddrPortFrom(daemon, ports.espDaemon))
			}
		default:
			cl.counters.Malformed.Add(1)
			continue
		}
		if err == nil {
			one[0] = buf[start:end]
			_, err = s.dev.Write(one[:], 0)
		}
		if err != nil {
			cl.counters.WriteErrors.Add(1)
			lastErr = err
			continue
		}
		sent++
		bytes += uint64(r.N)
		if kind == framing.KindIKE {
			k.IKE++
		}
	}
	f.traffic.CountIn(cl.counters, sent, bytes, k)
	return lastErr
}

// daemonPorts remembers, in transparent mode, the ports the daemon last
// used for IKE and for ESP, on its side and toward the peer, and whether
// its ESP is raw (IP protocol 50) rather than in UDP. Replies go back the
// way the daemon sent: a daemon on 500 gets IKE from the peer's 500
// without the marker, one that floated to 4500 gets it from 4500 with the
// marker.
type daemonPorts struct {
	v atomic.Uint64 // ikeDaemon<<48 | ikePeer<<32 | espDaemon<<16 | espPeer
	// espRaw is set while the daemon sends raw ESP.
	espRaw atomic.Bool
}

type portSet struct {
	ikeDaemon, ikePeer, espDaemon, espPeer uint16
	espRaw                                 bool
}

// note records the ports of a packet the daemon sent.
func (p *daemonPorts) note(kind framing.Kind, rawESP bool, daemon, peer uint16) {
	old := p.v.Load()
	v := old
	switch {
	case kind == framing.KindIKE:
		v = v&0xffffffff | uint64(daemon)<<48 | uint64(peer)<<32
	case kind == framing.KindESP && !rawESP:
		v = v&^0xffffffff | uint64(daemon)<<16 | uint64(peer)
	}
	if v != old {
		p.v.Store(v) // one writer: the TUN reader
	}
	if kind == framing.KindESP && p.espRaw.Load() != rawESP {
		p.espRaw.Store(rawESP)
	}
}

// load returns the ports replies use, filling in what the daemon has not
// shown yet: ESP in UDP follows IKE once IKE is on 4500, and everything
// unknown is 4500, the NAT-T port that iketcp's TCP path resembles.
func (p *daemonPorts) load() portSet {
	v := p.v.Load()
	ps := portSet{
		ikeDaemon: uint16(v >> 48), ikePeer: uint16(v >> 32),
		espDaemon: uint16(v >> 16), espPeer: uint16(v),
		espRaw: p.espRaw.Load(),
	}
	if ps.ikePeer == 0 {
		ps.ikeDaemon, ps.ikePeer = relay.OrDefault(ps.espDaemon, 4500), relay.OrDefault(ps.espPeer, 4500)
	}
	if ps.espPeer == 0 {
		ps.espDaemon, ps.espPeer = 4500, 4500
		if ps.ikePeer == 4500 {
			ps.espDaemon = ps.ikeDaemon
		}
	}
	return ps
}

// describe says, for Status, which of the daemon's ports are intercepted;
// "" in explicit mode.
func (p *daemonPorts) describe() string {
	if p.v.Load() == 0 && !p.espRaw.Load() {
		return ""
	}
	ps := p.load()
	esp := "ESP in UDP " + strconv.Itoa(int(ps.espDaemon)) + "->" + strconv.Itoa(int(ps.espPeer))
	if ps.espRaw {
		esp = "ESP raw (IP protocol 50)"
	}
	return "IKE " + strconv.Itoa(int(ps.ikeDaemon)) + "->" + strconv.Itoa(int(ps.ikePeer)) + ", " + esp
}
