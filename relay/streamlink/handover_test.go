package streamlink_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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
func TestDetachAdopt(t *testing.T) { testDetachAdopt(t, false) }

// TestDetachTLS: the same over TLS, whose connection stays with the "old
// process" (Detach gives it, and Close leaves it open), which relays it
// over a unix socketpair, the bytes pending first, to the adopting
// listener's link: frames whole and in order both ways, and the adopted
// link says TLS and the client's addresses, not the socketpair's.
func TestDetachTLS(t *testing.T) { testDetachAdopt(t, true) }

func testDetachAdopt(t *testing.T, overTLS bool) {
	var nl net.Listener
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if overTLS {
		nl = tls.NewListener(nl, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}, MinVersion: tls.VersionTLS13})
	}
	cfg := streamlink.Config{BufferSize: 4096}
	ln := streamlink.NewListener(nl, cfg)
	defer ln.Close()
	ln2 := streamlink.NewListener(nil, cfg) // the "new process": it only adopts

	var raw net.Conn
	raw, err = net.Dial("tcp", nl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if overTLS {
		raw = tls.Client(raw, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	}
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

	// The client reads what the server sends all along (the server's
	// writes drain before Detach returns).
	readDone := make(chan error, 1)
	go func() {
		raw.SetReadDeadline(time.Now().Add(10 * time.Second))
		d := framing.NewDecoder(raw, 0, false)
		for i := range 1000 {
			p, err := d.Next()
			if err != nil {
				readDone <- fmt.Errorf("frame %d from the server: %w", i, err)
				return
			}
			if !bytes.Equal(p, numbered(i)) {
				readDone <- fmt.Errorf("frame %d from the server: got numbered %d", i, binary.BigEndian.Uint32(p[4:]))
				return
			}
		}
		readDone <- nil
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
	var adopted *streamlink.Link
	if overTLS {
		if det.Conn == nil || det.File != nil || !det.TLS {
			t.Fatalf("a TLS link's Detach gave %+v, want its connection", det)
		}
		remote, local := old.RemoteAddr(), old.(*streamlink.Link).LocalAddr()
		old.Close() // the connection stays: Detach gave it
		nc := relayTLS(t, det.Conn, det.Pending)
		adopted, err = ln2.AdoptStream(nc, streamlink.Adopted{PrefixPending: det.PrefixPending, Remote: remote, Local: local, TLS: true})
		if err != nil {
			t.Fatal(err)
		}
		if !adopted.TLS() || adopted.RemoteAddr() != remote || adopted.LocalAddr() != local {
			t.Fatalf("adopted link: TLS %v, %s -> %s; want TLS, %s -> %s", adopted.TLS(), adopted.RemoteAddr(), adopted.LocalAddr(), remote, local)
		}
	} else {
		nc, err := net.FileConn(det.File)
		det.File.Close()
		if err != nil {
			t.Fatal(err)
		}
		old.Close() // its socket goes; the duplicate keeps the connection
		adopted, err = ln2.Adopt(nc, det.Pending, det.PrefixPending, "")
		if err != nil {
			t.Fatal(err)
		}
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
	if err := <-readDone; err != nil {
		t.Fatal(err)
	}
	raw.Close()
	if err := <-served; err == nil {
		t.Fatal("adopted link's Serve ended without an error")
	}
}

// relayTLS is the old process's relay in small: a socketpair, one end
// returned (the new process's), the other copied both ways with tc,
// pending first, until either ends; the test's end closes both.
func relayTLS(t *testing.T, tc net.Conn, pending []byte) net.Conn {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ends := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		ends[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	stop := func() { ends[0].Close(); tc.Close() }
	go func() {
		defer wg.Done()
		defer stop()
		if _, err := ends[0].Write(pending); err == nil {
			io.Copy(ends[0], tc)
		}
	}()
	go func() {
		defer wg.Done()
		defer stop()
		io.Copy(tc, ends[0])
	}()
	t.Cleanup(func() { stop(); wg.Wait() })
	return ends[1]
}
