package client_test

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// TestUnansweredHelloFallsBackToPlain: a third-party RFC 9329 responder
// never answers iketcp's hello. The client gives that link up after
// HelloWait and opens the next one with RFC 9329 frames only: its first
// frame is the daemon's IKE message, not a control message.
func TestUnansweredHelloFallsBackToPlain(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// firstFrames gets the first 4 bytes of each connection's first frame.
	firstFrames := make(chan []byte, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				head := make([]byte, len(framing.Prefix)+framing.LengthSize)
				if _, err := io.ReadFull(c, head); err != nil {
					return
				}
				body := make([]byte, int(binary.BigEndian.Uint16(head[len(framing.Prefix):]))-framing.LengthSize)
				if _, err := io.ReadFull(c, body); err != nil || len(body) < 4 {
					return
				}
				firstFrames <- body[:4]
				io.Copy(io.Discard, c) // answer nothing, as a responder that drops what it cannot match
			}()
		}
	}()

	counters := new(relay.Counters)
	_, daemon := relaytest.ServeExplicit(t, client.Config{
		Peer: ln.Addr().String(), Counters: counters,
		Dialer:    streamlink.NewDialer(streamlink.Config{Counters: counters, Logger: relaytest.Logger(t)}),
		HelloWait: 200 * time.Millisecond, ReconnectMin: 20 * time.Millisecond,
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// The daemon retransmits, as IKE daemons do, until the test ends.
	init := relaytest.IKE(0x77, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	daemon.Write(init)
	go func() {
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for range 40 {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				daemon.Write(init)
			}
		}
	}()

	want := []struct {
		what string
		spi  uint32
	}{{"iketcp's hello", framing.ControlSPI}, {"the daemon's IKE message (the non-ESP marker)", 0}}
	for i, w := range want {
		select {
		case got := <-firstFrames:
			if spi := binary.BigEndian.Uint32(got); spi != w.spi {
				t.Fatalf("connection %d began with SPI %#x, want %s (%#x)", i+1, spi, w.what, w.spi)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no connection %d within 5 s", i+1)
		}
	}
}
