package server_test

import (
	"context"
	"encoding/binary"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// TestHandover: a server hands its session and its client's live
// connection to a successor while ESP streams both ways without pause.
// The client never reconnects, the backend hears the session from the
// same port throughout, and no datagram is lost either way.
func TestHandover(t *testing.T) {
	backend, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	relay.SizeSocketBuffers(backend)
	log := relaytest.Logger(t)
	cfg := server.Config{Backend: backend.LocalAddr().(*net.UDPAddr).AddrPort(), Logger: log}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := tl.Addr().String()
	// The successor's listening socket, as an upgrade passes it.
	lf, err := tl.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	srvA, stopA := runServer(t, cfg, tl)

	site, clCounters := startSite(t, addr, 0)

	const ispi, toHub, toSite = 0x5555666677778888, 0xd00d0001, 0xd00d0002
	site.Write(relaytest.IKE(ispi, 0, framing.IKESAInit, framing.FlagInitiator, 300))
	_, from := relaytest.Recv(t, backend)
	backend.WriteToUDPAddrPort(relaytest.IKE(ispi, 0x5151, framing.IKESAInit, framing.FlagResponse, 280), from)
	relaytest.Recv(t, site)
	site.Write(relaytest.ESP(toHub, 0, 300))
	relaytest.Recv(t, backend)

	// Both ways, 4000 datagrams each, one every 250 µs.
	const n = 4000
	var atHub, atSite atomic.Int64
	var wrongPort atomic.Int64
	var wg sync.WaitGroup
	wg.Add(4)
	go func() {
		defer wg.Done()
		for i := 1; i <= n; i++ {
			site.Write(relaytest.ESP(toHub, uint32(i), 200+i%800))
			time.Sleep(250 * time.Microsecond)
		}
	}()
	go func() {
		defer wg.Done()
		for i := 1; i <= n; i++ {
			backend.WriteToUDPAddrPort(relaytest.ESP(toSite, uint32(i), 200+i%800), from)
			time.Sleep(250 * time.Microsecond)
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 2048)
		for atHub.Load() < n {
			backend.SetReadDeadline(time.Now().Add(5 * time.Second))
			k, f, err := backend.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if f != from {
				wrongPort.Add(1)
			}
			if k >= 8 && binary.BigEndian.Uint32(buf) == toHub {
				atHub.Add(1)
			}
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 2048)
		for atSite.Load() < n {
			site.SetReadDeadline(time.Now().Add(5 * time.Second))
			k, err := site.Read(buf)
			if err != nil {
				return
			}
			if k >= 8 && binary.BigEndian.Uint32(buf) == toSite {
				atSite.Add(1)
			}
		}
	}()

	time.Sleep(300 * time.Millisecond) // mid-stream
	lcfg := streamlink.Config{Logger: log}
	var srvB *server.Server
	var adoptedBackends atomic.Int64
	handedAt := time.Now()
	err = srvA.Handover(func(h *server.Handover, files []*os.File) error {
		var backends []*net.UDPConn
		var links []relay.Link
		nl, err := net.FileListener(lf)
		if err != nil {
			return err
		}
		cfgB := cfg // a successor that takes the backend sockets over, as real-address mode's does
		cfgB.AdoptBackend = func(uc *net.UDPConn) (func() error, error) {
			adoptedBackends.Add(1)
			return uc.Close, nil
		}
		srvB, err = server.New(cfgB)
		if err != nil {
			return err
		}
		lcfg.Counters = srvB.Counters()
		ln := streamlink.NewListener(nl, lcfg)
		for i := range h.Table.Sessions {
			pc, err := net.FilePacketConn(files[i])
			if err != nil {
				return err
			}
			backends = append(backends, pc.(*net.UDPConn))
		}
		for i, hc := range h.Conns {
			nc, err := net.FileConn(files[len(h.Table.Sessions)+i])
			if err != nil {
				return err
			}
			link, err := ln.Adopt(nc, hc.Pending, hc.PrefixPending, hc.Remote)
			if err != nil {
				return err
			}
			links = append(links, link)
		}
		if err := srvB.Adopt(h, backends, links); err != nil {
			return err
		}
		bctx, bcancel := context.WithCancel(context.Background())
		bdone := make(chan struct{})
		go func() {
			defer close(bdone)
			if err := srvB.Serve(bctx, ln); err != nil {
				t.Errorf("successor: %v", err)
			}
		}()
		t.Cleanup(func() { bcancel(); <-bdone })
		return nil
	})
	took := time.Since(handedAt)
	lf.Close()
	if err != nil {
		t.Fatal(err)
	}
	stopA()
	wg.Wait()
	t.Logf("handover took %v; %d of %d datagrams reached the backend, %d of %d the site", took, atHub.Load(), n, atSite.Load(), n)
	if atHub.Load() != n || atSite.Load() != n {
		t.Fatalf("lost in the handover: %d toward the backend, %d toward the site", n-atHub.Load(), n-atSite.Load())
	}
	if a := adoptedBackends.Load(); a != 1 {
		t.Fatalf("AdoptBackend ran %d times, want once for the one session", a)
	}
	if wrongPort.Load() != 0 {
		t.Fatalf("%d datagrams reached the backend from another port", wrongPort.Load())
	}
	if dialed := relaytest.Counter(clCounters, "conns_dialed"); dialed != 1 {
		t.Fatalf("the client dialed %d connections, want 1: it reconnected", dialed)
	}
	st := srvB.Status()
	if len(st.Sessions) != 1 || st.Sessions[0].State != "up" || st.Sessions[0].Local != from.String() {
		t.Fatalf("successor's sessions: %+v", st.Sessions)
	}
	if c := relaytest.Counter(srvB.Counters(), "sessions_created"); c != 0 {
		t.Fatalf("the successor created %d sessions", c)
	}
	// New clients reach the successor on the same listening socket.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(framing.Prefix))
	relaytest.Frame(t, c, relaytest.Init(0x4242))
	relaytest.Eventually(t, "a new session at the successor", func() bool { return relaytest.Counter(srvB.Counters(), "sessions_created") == 1 })
}
