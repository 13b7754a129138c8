package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// TestHandoverTLS: a server hands over two TLS clients' connections. It
// keeps them, and relays each to a socketpair's end the successor serves
// as that client's: with its addresses, TLS, and its certificate's
// identity (the session it opened stays its own). A relay ends when its
// client closes; KeptTLS closes those left at its bound.
func TestHandoverTLS(t *testing.T) {
	ca := newTestCA(t)
	srvCert := ca.issue(t, "hub", x509.ExtKeyUsageServerAuth, net.IPv4(127, 0, 0, 1))
	backend, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	log := relaytest.Logger(t)
	cfg := server.Config{Backend: backend.LocalAddr().(*net.UDPAddr).AddrPort(), Logger: log}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tlsLn := tls.NewListener(inner, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{srvCert},
		ClientCAs: ca.pool, ClientAuth: tls.RequireAndVerifyClientCert})
	srvA, stopA := runServer(t, cfg, handshaking{tlsLn})
	dial := func(cn string) net.Conn {
		t.Helper()
		c, err := tls.Dial("tcp", inner.Addr().String(), &tls.Config{RootCAs: ca.pool, ServerName: "127.0.0.1",
			Certificates: []tls.Certificate{ca.issue(t, cn, x509.ExtKeyUsageClientAuth)}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.Write([]byte(framing.Prefix))
		return c
	}
	alice, bob := dial("alice"), dial("bob")
	aliceDec := framing.NewDecoder(alice, 0, false)
	relaytest.Frame(t, alice, relaytest.Init(0xa11ce))
	_, from := relaytest.Recv(t, backend)
	backend.WriteToUDPAddrPort(relaytest.InitResponse(0xa11ce), from)
	relaytest.ReadFrame(t, alice, aliceDec)
	relaytest.Frame(t, alice, relaytest.ESP(0xc0a11ce0, 1, 100))
	relaytest.Recv(t, backend)
	relaytest.Eventually(t, "both connections", func() bool { return relaytest.Counter(srvA.Counters(), "conns_accepted") == 2 })
	// Half a frame, pending at the hand-over.
	esp := framing.AppendFrame(nil, relaytest.ESP(0xc0a11ce0, 2, 100))
	alice.Write(esp[:30])
	time.Sleep(50 * time.Millisecond)

	nlB, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var srvB *server.Server
	var handed []server.HandoverConn
	err = srvA.Handover(func(h *server.Handover, files []*os.File) error {
		handed = h.Conns
		srvB, err = server.New(cfg)
		if err != nil {
			return err
		}
		ln := streamlink.NewListener(nlB, streamlink.Config{Logger: log, Counters: srvB.Counters()})
		var backends []*net.UDPConn
		for i := range h.Table.Sessions {
			pc, err := net.FilePacketConn(files[i])
			if err != nil {
				return err
			}
			backends = append(backends, pc.(*net.UDPConn))
		}
		var links []relay.Link
		for i, hc := range h.Conns {
			nc, err := net.FileConn(files[len(h.Table.Sessions)+i])
			if err != nil {
				return err
			}
			link, err := ln.AdoptStream(nc, streamlink.Adopted{Pending: hc.Pending, PrefixPending: hc.PrefixPending,
				Remote: hc.Remote, Local: hc.Local, TLS: hc.TLS, Identity: hc.Identity})
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
	if err != nil {
		t.Fatal(err)
	}
	stopA()
	if len(handed) != 2 {
		t.Fatalf("%d connections handed over, want 2", len(handed))
	}
	for _, hc := range handed {
		if !hc.TLS || hc.Local != inner.Addr().String() || !strings.Contains(hc.Identity, "CN=") || len(hc.Pending) != 0 {
			t.Fatalf("handed over %+v: want TLS, local %s, an identity, and the pending bytes in the stream", hc, inner.Addr())
		}
	}
	if n := srvA.Relaying(); n != 2 {
		t.Fatalf("the old server relays %d TLS connections, want 2", n)
	}

	// Alice's stream goes on through the successor, from the half frame.
	alice.Write(esp[30:])
	if p, f := relaytest.Recv(t, backend); f != from || len(p) != 100 {
		t.Fatalf("alice's ESP came as %d bytes from %v, want 100 from her session's %v", len(p), f, from)
	}
	backend.WriteToUDPAddrPort(relaytest.ESP(0xd0a11ce0, 1, 120), from)
	if got := relaytest.ReadFrame(t, alice, aliceDec); len(got) != 120 {
		t.Fatalf("alice got %d bytes back", len(got))
	}
	if c := relaytest.Counter(srvB.Counters(), "identity_refused"); c != 0 {
		t.Fatalf("the successor refused %d frames of alice's for her identity", c)
	}

	// Bob leaves: his relay ends. Alice stays until the bound.
	bob.Close()
	relaytest.Eventually(t, "bob's relay to end", func() bool { return srvA.Relaying() == 1 })
	start := time.Now()
	left, err := srvA.KeptTLS(context.Background(), 200*time.Millisecond)
	if left != 1 || !errors.Is(err, server.ErrRelaysCut) || time.Since(start) > 2*time.Second {
		t.Fatalf("KeptTLS at its bound: %d left (%v) after %v, want alice's", left, err, time.Since(start))
	}
	alice.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := alice.Read(make([]byte, 64)); err == nil {
		t.Fatal("alice's connection is still open after the bound")
	}
}

// handshaking completes each connection's TLS handshake before Accept
// returns it, as the server's front door does.
type handshaking struct{ net.Listener }

func (l handshaking) Accept() (net.Conn, error) {
	for {
		nc, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		tc := nc.(*tls.Conn)
		if err := tc.Handshake(); err == nil {
			return tc, nil
		}
		tc.Close()
	}
}
