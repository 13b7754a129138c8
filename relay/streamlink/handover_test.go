package streamlink_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// numbered is an ESP-shaped datagram carrying i, of a size that varies
// with i so that reads end anywhere in a frame.
func numbered(i int) []byte {
	p := make([]byte, 60+(i*37)%900)
	binary.BigEndian.PutUint32(p, 0x1000)
	binary.BigEndian.PutUint32(p[4:], uint32(i))
	return p
}

// TestDetachAdopt: a client streams frames without pause both ways while
// the server's link is detached and its stream adopted by another
// listener (as a new process would): every frame arrives once, whole and
// in order, each way, and the client's connection never notices.
func TestDetachAdopt(t *testing.T) {
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := streamlink.Config{BufferSize: 4096}
	ln := streamlink.NewListener(nl, cfg)
	defer ln.Close()
	ln2 := streamlink.NewListener(nil, cfg) // the "new process": it only adopts

	raw, err := net.Dial("tcp", nl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	old, err := ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()

	const n = 3000
	// The client writes the prefix and the frames in odd-sized pieces.
	writeDone := make(chan error, 1)
	go func() {
		var all []byte
		all = append(all, framing.Prefix...)
		for i := range n {
			all = framing.AppendFrame(all, numbered(i))
		}
		for len(all) > 0 {
			k := min(len(all), 777)
			if _, err := raw.Write(all[:k]); err != nil {
				writeDone <- err
				return
			}
			all = all[k:]
			time.Sleep(50 * time.Microsecond)
		}
		writeDone <- nil
	}()

	rx := &collector{got: make(chan []byte, n)}
	served := make(chan error, 1)
	go func() { served <- old.Serve(rx) }()
	// The server sends too, while it is detached.
	sendFrom := func(l relay.Link, from, to int) {
		for i := from; i < to; i++ {
			if err := l.Send([][]byte{withHeadroom(numbered(i))}); err != nil {
				t.Errorf("send %d: %v", i, err)
				return
			}
		}
	}
	sendFrom(old, 0, 500)

	// Detach after some frames came in.
	for deadline := time.Now().Add(5 * time.Second); len(rx.got) < 300; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("only %d frames came in 5 s", len(rx.got))
		}
	}
	det, err := old.(*streamlink.Link).Detach(2 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, streamlink.ErrDetached) {
		t.Fatalf("Serve returned %v, want ErrDetached", err)
	}
	if err := old.Send([][]byte{withHeadroom(numbered(0))}); !errors.Is(err, streamlink.ErrDetached) {
		t.Fatalf("Send after Detach: %v", err)
	}
	nc, err := net.FileConn(det.File)
	det.File.Close()
	if err != nil {
		t.Fatal(err)
	}
	old.Close() // its socket goes; the duplicate keeps the connection
	adopted, err := ln2.Adopt(nc, det.Pending, det.PrefixPending, "")
	if err != nil {
		t.Fatal(err)
	}
	defer adopted.Close()
	go func() { served <- adopted.Serve(rx) }()
	sendFrom(adopted, 500, 1000)

	for i := range n {
		select {
		case p := <-rx.got:
			if !bytes.Equal(p, numbered(i)) {
				t.Fatalf("frame %d from the client: got %d bytes numbered %d", i, len(p), binary.BigEndian.Uint32(p[4:]))
			}
		case <-time.After(3 * time.Second):
			t.Fatalf("frame %d from the client never came (pending handed over: %d bytes)", i, len(det.Pending))
		}
	}
	if err := <-writeDone; err != nil {
		t.Fatal(err)
	}
	// What the server sent, before and after, reached the client in order.
	raw.SetReadDeadline(time.Now().Add(3 * time.Second))
	d := framing.NewDecoder(raw, 0, false)
	for i := range 1000 {
		p, err := d.Next()
		if err != nil {
			t.Fatalf("frame %d from the server: %v", i, err)
		}
		if !bytes.Equal(p, numbered(i)) {
			t.Fatalf("frame %d from the server: got numbered %d", i, binary.BigEndian.Uint32(p[4:]))
		}
	}
	raw.Close()
	if err := <-served; err == nil {
		t.Fatal("adopted link's Serve ended without an error")
	}
}
