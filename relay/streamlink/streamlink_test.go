package streamlink_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/streamlink"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// collector is a relay.Receiver that keeps copies of what it receives.
type collector struct {
	got    chan []byte
	bursts int
}

func (c *collector) Receive(burst []relay.Datagram) error {
	c.bursts++
	for _, d := range burst {
		if d.Off < relay.Headroom {
			return errors.New("datagram without headroom")
		}
		c.got <- bytes.Clone(d.Bytes())
	}
	return nil
}

// pair dials a listener on loopback and returns both ends' links.
func pair(t *testing.T, cfg streamlink.Config) (client, server relay.Link) {
	t.Helper()
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := streamlink.NewListener(nl, cfg)
	t.Cleanup(func() { ln.Close() })
	d := streamlink.NewDialer(streamlink.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if client, err = d.DialLink(ctx, nl.Addr().String()); err != nil {
		t.Fatal(err)
	}
	if server, err = ln.Accept(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// withHeadroom returns p behind relay.Headroom free bytes, as links take it.
func withHeadroom(p []byte) []byte { return append(make([]byte, relay.Headroom), p...) }

// TestSendAndServe: datagrams sent in one batch arrive as they were, with
// headroom in front, in one burst; the prefix is checked and consumed.
func TestSendAndServe(t *testing.T) {
	cl, srv := pair(t, streamlink.Config{})
	rx := &collector{got: make(chan []byte, 8)}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(rx) }()
	want := [][]byte{relaytest.ESP(0xc1, 1, 100), relaytest.IKE(7, 0, framing.IKESAInit, framing.FlagInitiator, 60), {0xff}}
	var bufs [][]byte
	for _, w := range want {
		bufs = append(bufs, withHeadroom(w))
	}
	if err := cl.Send(bufs); err != nil {
		t.Fatal(err)
	}
	for i, w := range want {
		select {
		case got := <-rx.got:
			if !bytes.Equal(got, w) {
				t.Fatalf("datagram %d: got %x, want %x", i, got, w)
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("datagram %d did not arrive", i)
		}
	}
	cl.Close()
	if err := <-served; err == nil || relay.IsProtocolError(err) {
		t.Fatalf("Serve after the peer closed: %v, want a plain end", err)
	}
}

// TestServerLinkRefusesWithoutPrefix: a stream that does not begin with
// IKETCP ends the server's link with a protocol error, counted.
func TestServerLinkRefusesWithoutPrefix(t *testing.T) {
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var counters relay.Counters
	ln := streamlink.NewListener(nl, streamlink.Config{Counters: &counters})
	defer ln.Close()
	nc, err := net.Dial("tcp", nl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
	link, err := ln.Accept(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer link.Close()
	err = link.Serve(&collector{got: make(chan []byte, 1)})
	if !relay.IsProtocolError(err) || counters.BadPrefix.Load() != 1 {
		t.Fatalf("Serve: %v, bad_prefix %d", err, counters.BadPrefix.Load())
	}
}
