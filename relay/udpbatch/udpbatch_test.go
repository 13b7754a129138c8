package udpbatch

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// patience bounds every wait in these tests.
const patience = 15 * time.Second // a guard against a hang, not a measure: loaded CI machines are slow

var (
	lo4 = netip.MustParseAddr("127.0.0.1")
	lo6 = netip.MustParseAddr("::1")
)

func listen(t testing.TB, network string, addr netip.Addr) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
	if err != nil {
		if addr.Is6() && !addr.IsUnspecified() {
			t.Skipf("no IPv6 loopback: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func dial(t testing.TB, network string, laddr netip.Addr, raddr netip.AddrPort) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP(network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(laddr, 0)), net.UDPAddrFromAddrPort(raddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func addrPort(c *net.UDPConn) netip.AddrPort {
	return unmap(c.LocalAddr().(*net.UDPAddr).AddrPort())
}

// topology is one way of setting up the Conn under test (srv) and the peer
// it talks to. peer is an ordinary socket on loopback; srvAt is where the
// peer sends to reach srv; connected says srv is connected to the peer.
type topology struct {
	name      string
	setup     func(t *testing.T) (srv, peer *net.UDPConn, srvAt netip.AddrPort)
	connected bool
}

var topologies = []topology{
	{name: "v4", setup: func(t *testing.T) (*net.UDPConn, *net.UDPConn, netip.AddrPort) {
		srv, peer := listen(t, "udp4", lo4), listen(t, "udp4", lo4)
		return srv, peer, addrPort(srv)
	}},
	{name: "v4-connected", connected: true, setup: func(t *testing.T) (*net.UDPConn, *net.UDPConn, netip.AddrPort) {
		peer := listen(t, "udp4", lo4)
		srv := dial(t, "udp4", lo4, addrPort(peer))
		return srv, peer, addrPort(srv)
	}},
	{name: "v6", setup: func(t *testing.T) (*net.UDPConn, *net.UDPConn, netip.AddrPort) {
		srv, peer := listen(t, "udp6", lo6), listen(t, "udp6", lo6)
		return srv, peer, addrPort(srv)
	}},
	{name: "v6-connected", connected: true, setup: func(t *testing.T) (*net.UDPConn, *net.UDPConn, netip.AddrPort) {
		peer := listen(t, "udp6", lo6)
		srv := dial(t, "udp6", lo6, addrPort(peer))
		return srv, peer, addrPort(srv)
	}},
	{name: "dualstack-v4-peer", setup: func(t *testing.T) (*net.UDPConn, *net.UDPConn, netip.AddrPort) {
		listen(t, "udp6", lo6) // skips without IPv6
		srv := listen(t, "udp", netip.IPv6Unspecified())
		peer := listen(t, "udp4", lo4)
		return srv, peer, netip.AddrPortFrom(lo4, addrPort(srv).Port())
	}},
	{name: "dualstack-v6-peer", setup: func(t *testing.T) (*net.UDPConn, *net.UDPConn, netip.AddrPort) {
		listen(t, "udp6", lo6) // skips without IPv6
		srv := listen(t, "udp", netip.IPv6Unspecified())
		peer := listen(t, "udp6", lo6)
		return srv, peer, netip.AddrPortFrom(lo6, addrPort(srv).Port())
	}},
}

// modes are the two paths a Conn can take.
var modes = []struct {
	name     string
	fallback bool
}{{"batch", false}, {"single", true}}

func newConn(t testing.TB, uc *net.UDPConn, fallback bool, batch int) *Conn {
	t.Helper()
	return newConnWith(t, uc, Options{BatchSize: batch, forceFallback: fallback})
}

// newConnWith is newConn with all the options: it skips the test where
// the batch system calls, or the receive offload asked for, are missing.
func newConnWith(t testing.TB, uc *net.UDPConn, opts Options) *Conn {
	t.Helper()
	c := New(uc, opts)
	if !opts.forceFallback && c.Fallback() != nil {
		t.Skipf("no batch system calls here: %v", c.Fallback())
	}
	if opts.GRO && !c.GRO() {
		skipWithoutGRO(t)
	}
	if err := uc.SetDeadline(time.Now().Add(patience)); err != nil {
		t.Fatal(err)
	}
	return c
}

func payload(tag, i int) []byte {
	return []byte(fmt.Sprintf("datagram %d/%03d %s", tag, i, bytes.Repeat([]byte{byte('a' + i%26)}, i%50)))
}

// readAll reads want datagrams with c, in as few calls as it takes, and
// returns them and the number of ReadBatch calls.
func readAll(t *testing.T, c *Conn, want int) (got []Message, calls int) {
	t.Helper()
	msgs := make([]Message, c.BatchSize())
	for len(got) < want {
		for i := range msgs {
			msgs[i] = Message{Buf: make([]byte, 2048)}
		}
		n, err := c.ReadBatch(msgs)
		calls++
		if err != nil {
			t.Fatalf("ReadBatch after %d of %d datagrams: %v", len(got), want, err)
		}
		if n < 1 || n > len(msgs) {
			t.Fatalf("ReadBatch returned n=%d with %d messages", n, len(msgs))
		}
		got = append(got, msgs[:n]...)
	}
	if len(got) != want {
		t.Fatalf("read %d datagrams, want %d", len(got), want)
	}
	return got, calls
}

func TestRoundTrip(t *testing.T) {
	const count = 40
	for _, top := range topologies {
		for _, mode := range modes {
			t.Run(top.name+"/"+mode.name, func(t *testing.T) {
				srvUC, peer, srvAt := top.setup(t)
				c := newConn(t, srvUC, mode.fallback, 16)
				peerAt := addrPort(peer)
				if err := peer.SetDeadline(time.Now().Add(patience)); err != nil {
					t.Fatal(err)
				}

				// Peer to Conn: every datagram intact, from the peer's
				// unmapped address.
				for i := range count {
					if _, err := peer.WriteToUDPAddrPort(payload(1, i), srvAt); err != nil {
						t.Fatal(err)
					}
				}
				got, _ := readAll(t, c, count)
				for i, m := range got {
					if want := payload(1, i); !bytes.Equal(m.Buf[:m.N], want) {
						t.Errorf("datagram %d: got %q, want %q", i, m.Buf[:m.N], want)
					}
					if m.Addr != peerAt {
						t.Errorf("datagram %d from %v, want %v", i, m.Addr, peerAt)
					}
					if m.Truncated {
						t.Errorf("datagram %d truncated", i)
					}
				}

				// Conn to peer, in one call larger than the batch size.
				msgs := make([]Message, count)
				for i := range msgs {
					msgs[i].Buf = payload(2, i)
					if !top.connected || i%2 == 0 {
						msgs[i].Addr = peerAt // on a connected socket, the peer itself is fine too
					}
				}
				if n, err := c.WriteBatch(msgs); n != count || err != nil {
					t.Fatalf("WriteBatch = %d, %v; want %d, nil", n, err, count)
				}
				buf := make([]byte, 2048)
				for i := range count {
					n, from, err := peer.ReadFromUDPAddrPort(buf)
					if err != nil {
						t.Fatalf("peer read %d: %v", i, err)
					}
					if want := payload(2, i); !bytes.Equal(buf[:n], want) {
						t.Errorf("peer got %q, want %q", buf[:n], want)
					}
					if unmap(from) != srvAt {
						t.Errorf("peer got datagram from %v, want %v", from, srvAt)
					}
				}
			})
		}
	}
}

func TestWriteAddressErrors(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			srv4 := newConn(t, listen(t, "udp4", lo4), mode.fallback, 0)
			peer := listen(t, "udp4", lo4)
			peerAt := addrPort(peer)
			v6 := netip.MustParseAddrPort("[2001:db8::1]:4500")

			msgs := []Message{{Buf: []byte("a"), Addr: peerAt}, {Buf: []byte("b"), Addr: peerAt}, {Buf: []byte("c"), Addr: v6}, {Buf: []byte("d"), Addr: peerAt}}
			n, err := srv4.WriteBatch(msgs)
			var ae *AddrError
			if n != 2 || !errors.Is(err, ErrAddressFamily) || !errors.As(err, &ae) || ae.Index != 2 || ae.Addr != v6 {
				t.Fatalf("IPv6 to an IPv4 socket: WriteBatch = %d, %v; want 2, *AddrError{Index: 2} wrapping ErrAddressFamily", n, err)
			}
			t.Logf("error reads: %v", err)

			// A v4-mapped destination is IPv4 and fine on an IPv4 socket.
			mapped := netip.AddrPortFrom(netip.AddrFrom16(lo4.As16()), peerAt.Port())
			if n, err := srv4.WriteBatch([]Message{{Buf: []byte("e"), Addr: mapped}}); n != 1 || err != nil {
				t.Fatalf("v4-mapped destination: WriteBatch = %d, %v", n, err)
			}

			if n, err := srv4.WriteBatch([]Message{{Buf: []byte("f")}}); n != 0 || !errors.Is(err, ErrNoDestination) {
				t.Fatalf("no destination on an unconnected socket: WriteBatch = %d, %v", n, err)
			}

			conn := newConn(t, dial(t, "udp4", lo4, peerAt), mode.fallback, 0)
			other := netip.AddrPortFrom(lo4, peerAt.Port()+1)
			if n, err := conn.WriteBatch([]Message{{Buf: []byte("g")}, {Buf: []byte("h"), Addr: other}}); n != 1 || !errors.Is(err, ErrConnectedDestination) {
				t.Fatalf("foreign destination on a connected socket: WriteBatch = %d, %v", n, err)
			}

			// What did arrive: a, b, e, g.
			if err := peer.SetReadDeadline(time.Now().Add(patience)); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 16)
			var got string
			for range 4 {
				n, _, err := peer.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatal(err)
				}
				got += string(buf[:n])
			}
			if got != "abeg" {
				t.Fatalf("peer received %q, want %q", got, "abeg")
			}
		})
	}
}

// TestPartialWrite has the kernel take part of a batch: the datagram at
// index 5 is too large for UDP, so sendmmsg sends 0..4 and then fails.
func TestPartialWrite(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			c := newConn(t, listen(t, "udp4", lo4), mode.fallback, 0)
			peer := listen(t, "udp4", lo4)
			msgs := make([]Message, 10)
			for i := range msgs {
				msgs[i] = Message{Buf: payload(3, i), Addr: addrPort(peer)}
			}
			msgs[5].Buf = make([]byte, 70000)
			n, err := c.WriteBatch(msgs)
			if n != 5 || !errors.Is(err, syscall.EMSGSIZE) {
				t.Fatalf("WriteBatch = %d, %v; want 5, EMSGSIZE", n, err)
			}
			t.Logf("error reads: %v", err)
			// The caller goes on after the one that failed.
			if n, err := c.WriteBatch(msgs[6:]); n != 4 || err != nil {
				t.Fatalf("WriteBatch of the rest = %d, %v", n, err)
			}
			if err := peer.SetReadDeadline(time.Now().Add(patience)); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 2048)
			for _, i := range []int{0, 1, 2, 3, 4, 6, 7, 8, 9} {
				n, _, err := peer.ReadFromUDPAddrPort(buf)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(buf[:n], msgs[i].Buf) {
					t.Fatalf("peer got %q, want %q", buf[:n], msgs[i].Buf)
				}
			}
		})
	}
}

// TestReadWholeBatch sends 64 datagrams at once and expects a batch Conn to
// take them in a few calls.
func TestReadWholeBatch(t *testing.T) {
	c := newConn(t, listen(t, "udp4", lo4), false, 64)
	peer := newConn(t, listen(t, "udp4", lo4), false, 64)
	msgs := make([]Message, 64)
	for i := range msgs {
		msgs[i] = Message{Buf: payload(4, i), Addr: addrPort(c.UDPConn())}
	}
	if n, err := peer.WriteBatch(msgs); n != 64 || err != nil {
		t.Fatalf("WriteBatch = %d, %v", n, err)
	}
	got, calls := readAll(t, c, 64)
	if calls > 3 {
		t.Errorf("64 datagrams took %d ReadBatch calls, want at most 3", calls)
	}
	for i, m := range got {
		if !bytes.Equal(m.Buf[:m.N], msgs[i].Buf) {
			t.Fatalf("datagram %d: got %q, want %q", i, m.Buf[:m.N], msgs[i].Buf)
		}
	}
	t.Logf("64 datagrams in %d ReadBatch calls", calls)
}

func TestReadBatchSizeLimit(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			c := newConn(t, listen(t, "udp4", lo4), mode.fallback, 4)
			peer := listen(t, "udp4", lo4)
			for i := range 10 {
				if _, err := peer.WriteToUDPAddrPort(payload(5, i), addrPort(c.UDPConn())); err != nil {
					t.Fatal(err)
				}
			}
			msgs := make([]Message, 10)
			for i := range msgs {
				msgs[i].Buf = make([]byte, 100)
			}
			total := 0
			for total < 10 {
				n, err := c.ReadBatch(msgs)
				if err != nil {
					t.Fatal(err)
				}
				if n > 4 || (mode.fallback && n != 1) {
					t.Fatalf("ReadBatch returned %d datagrams with BatchSize %d (fallback %v)", n, c.BatchSize(), mode.fallback)
				}
				for i := range n {
					if want := payload(5, total+i); !bytes.Equal(msgs[i].Buf[:msgs[i].N], want) {
						t.Fatalf("got %q, want %q", msgs[i].Buf[:msgs[i].N], want)
					}
				}
				total += n
			}
			if n, err := c.ReadBatch(nil); n != 0 || err != nil {
				t.Fatalf("ReadBatch(nil) = %d, %v", n, err)
			}
			if n, err := c.WriteBatch(nil); n != 0 || err != nil {
				t.Fatalf("WriteBatch(nil) = %d, %v", n, err)
			}
		})
	}
}

func TestOptions(t *testing.T) {
	uc := listen(t, "udp4", lo4)
	for _, tc := range []struct{ in, want int }{{0, DefaultBatchSize}, {-3, DefaultBatchSize}, {1, 1}, {100, 100}, {MaxBatchSize, MaxBatchSize}, {5000, MaxBatchSize}} {
		if got := New(uc, Options{BatchSize: tc.in}).BatchSize(); got != tc.want {
			t.Errorf("BatchSize %d: got %d, want %d", tc.in, got, tc.want)
		}
	}
	if c := New(uc, Options{}); c.UDPConn() != uc {
		t.Errorf("UDPConn() is not the socket given to New")
	}
}

func TestTruncated(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			if mode.fallback && runtime.GOOS == "windows" {
				t.Skip("a truncated datagram is an error on Windows")
			}
			c := newConn(t, listen(t, "udp4", lo4), mode.fallback, 0)
			peer := listen(t, "udp4", lo4)
			long, short := bytes.Repeat([]byte("L"), 100), []byte("short")
			for _, p := range [][]byte{long, short} {
				if _, err := peer.WriteToUDPAddrPort(p, addrPort(c.UDPConn())); err != nil {
					t.Fatal(err)
				}
			}
			var got []Message
			for len(got) < 2 {
				msgs := []Message{{Buf: make([]byte, 32)}, {Buf: make([]byte, 32)}}
				n, err := c.ReadBatch(msgs)
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, msgs[:n]...)
			}
			if m := got[0]; !m.Truncated || m.N != 32 || !bytes.Equal(m.Buf[:m.N], long[:32]) {
				t.Errorf("long datagram: Truncated=%v N=%d, want true, 32", m.Truncated, m.N)
			}
			if m := got[1]; m.Truncated || m.N != len(short) || !bytes.Equal(m.Buf[:m.N], short) {
				t.Errorf("short datagram: Truncated=%v N=%d %q", m.Truncated, m.N, m.Buf[:m.N])
			}
			if n := c.Truncated(); n != 1 {
				t.Errorf("Truncated() = %d, want 1", n)
			}
		})
	}
}

func TestDeadline(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			c := newConn(t, listen(t, "udp4", lo4), mode.fallback, 0)
			if err := c.UDPConn().SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			n, err := c.ReadBatch([]Message{{Buf: make([]byte, 64)}})
			var ne net.Error
			if n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
				t.Fatalf("ReadBatch past the deadline = %d, %v; want os.ErrDeadlineExceeded", n, err)
			}
			if d := time.Since(start); d > patience/2 {
				t.Fatalf("ReadBatch took %v to see a 50ms deadline", d)
			}

			if err := c.UDPConn().SetWriteDeadline(time.Now().Add(-time.Second)); err != nil {
				t.Fatal(err)
			}
			to := netip.AddrPortFrom(lo4, 9) // never sent: the deadline has passed
			if n, err := c.WriteBatch([]Message{{Buf: []byte("x"), Addr: to}}); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("WriteBatch past the deadline = %d, %v; want os.ErrDeadlineExceeded", n, err)
			}
		})
	}
}

func TestCloseWhileReading(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			c := newConn(t, listen(t, "udp4", lo4), mode.fallback, 0)
			done := make(chan error, 1)
			go func() {
				_, err := c.ReadBatch([]Message{{Buf: make([]byte, 64)}})
				done <- err
			}()
			time.Sleep(50 * time.Millisecond) // let it block
			start := time.Now()
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-done:
				if !errors.Is(err, net.ErrClosed) {
					t.Fatalf("ReadBatch after Close: %v, want net.ErrClosed", err)
				}
				if d := time.Since(start); d > time.Second {
					t.Fatalf("ReadBatch took %v to return after Close", d)
				}
			case <-time.After(patience):
				t.Fatal("ReadBatch still blocked after Close")
			}
			if _, err := c.ReadBatch([]Message{{Buf: make([]byte, 64)}}); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("ReadBatch on a closed Conn: %v, want net.ErrClosed", err)
			}
			to := netip.AddrPortFrom(lo4, 9) // never sent: the socket is closed
			if _, err := c.WriteBatch([]Message{{Buf: []byte("x"), Addr: to}}); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("WriteBatch on a closed Conn: %v, want net.ErrClosed", err)
			}
		})
	}
}

// TestConcurrentWrite has several goroutines share one Conn for writing;
// under -race it also checks that they share no scratch.
func TestConcurrentWrite(t *testing.T) {
	const writers, batches, perBatch = 4, 10, 8
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			w := newConn(t, listen(t, "udp4", lo4), mode.fallback, 0)
			r := newConn(t, listen(t, "udp4", lo4), mode.fallback, 0)
			_ = r.UDPConn().SetReadBuffer(1 << 20) // room for all of them even if the reader lags
			to := addrPort(r.UDPConn())

			var wg sync.WaitGroup
			errs := make(chan error, writers)
			for g := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					msgs := make([]Message, perBatch)
					for b := range batches {
						for i := range msgs {
							msgs[i] = Message{Buf: payload(g, b*perBatch+i), Addr: to}
						}
						if n, err := w.WriteBatch(msgs); n != perBatch || err != nil {
							errs <- fmt.Errorf("writer %d batch %d: WriteBatch = %d, %v", g, b, n, err)
							return
						}
					}
				}()
			}
			got, _ := readAll(t, r, writers*batches*perBatch)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			seen := make(map[string]bool)
			for _, m := range got {
				seen[string(m.Buf[:m.N])] = true
			}
			for g := range writers {
				for i := range batches * perBatch {
					if !seen[string(payload(g, i))] {
						t.Errorf("datagram %d of writer %d missing or garbled", i, g)
					}
				}
			}
		})
	}
}

func TestFallbackReported(t *testing.T) {
	var logged bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logged, nil))
	c := New(listen(t, "udp4", lo4), Options{Logger: log, forceFallback: true})
	peer := listen(t, "udp4", lo4)
	err := c.Fallback()
	var ue *UnsupportedError
	if !errors.As(err, &ue) || !errors.Is(err, errors.ErrUnsupported) {
		t.Fatalf("Fallback() = %v, want an *UnsupportedError that is errors.ErrUnsupported", err)
	}
	for range 3 {
		if _, err := c.WriteBatch([]Message{{Buf: []byte("x"), Addr: addrPort(peer)}}); err != nil {
			t.Fatal(err)
		}
		c.disable(&UnsupportedError{Op: "sendmmsg", Err: syscall.ENOSYS}) // a later refusal is not logged again
	}
	if n := bytes.Count(logged.Bytes(), []byte("\n")); n != 1 {
		t.Fatalf("logged %d lines, want 1:\n%s", n, logged.String())
	}
	t.Logf("logged: %s", bytes.TrimSpace(logged.Bytes()))

	if c := New(listen(t, "udp4", lo4), Options{Logger: log}); c.Fallback() != nil {
		t.Logf("batch system calls unavailable here: %v", c.Fallback())
	}

	e := &UnsupportedError{Op: "recvmmsg", Err: syscall.ENOSYS}
	if !errors.Is(e, syscall.ENOSYS) || !errors.Is(e, errors.ErrUnsupported) {
		t.Errorf("%v does not unwrap to ENOSYS and ErrUnsupported", e)
	}
	t.Logf("refusal reads: %v", e)
}

// TestAllocs checks that neither ReadBatch nor WriteBatch allocates once
// warm, on every topology. The single-datagram fallback is held to the same
// standard, and so is receive offload, with equal-sized datagrams that
// arrive coalesced and a read batch they do not fit.
func TestAllocs(t *testing.T) {
	const count = 64
	allocModes := []struct {
		name          string
		fallback, gro bool
	}{{"batch", false, false}, {"single", true, false}, {"gro", false, true}}
	for _, top := range topologies {
		for _, mode := range allocModes {
			t.Run(top.name+"/"+mode.name, func(t *testing.T) {
				srvUC, peerUC, srvAt := top.setup(t)
				opts := Options{BatchSize: count, forceFallback: mode.fallback, GRO: mode.gro}
				srv := newConnWith(t, srvUC, opts)
				peer := newConnWith(t, peerUC, opts)
				for _, uc := range []*net.UDPConn{srvUC, peerUC} {
					_ = uc.SetReadBuffer(1 << 20)
					if err := uc.SetDeadline(time.Now().Add(time.Minute)); err != nil {
						t.Fatal(err)
					}
				}
				peerAt := addrPort(peerUC)

				toPeer, toSrv, rx := make([]Message, count), make([]Message, count), make([]Message, count)
				for i := range count {
					toPeer[i].Buf, toSrv[i].Buf = payload(6, i), payload(7, i)
					if mode.gro {
						toPeer[i].Buf, toSrv[i].Buf = dgram(6, i, 1000), dgram(7, i, 1000)
					}
					toSrv[i].Addr = srvAt
					if !top.connected {
						toPeer[i].Addr = peerAt
					}
					rx[i].Buf = make([]byte, 2048)
				}
				if mode.gro {
					rx = rx[:13] // a coalesced run of 64 takes several reads
				}
				var failure error
				exchange := func() {
					if failure != nil {
						return
					}
					for _, dir := range []struct {
						from, to *Conn
						msgs     []Message
					}{{srv, peer, toPeer}, {peer, srv, toSrv}} {
						if n, err := dir.from.WriteBatch(dir.msgs); err != nil {
							failure = fmt.Errorf("WriteBatch = %d, %v", n, err)
							return
						}
						for got := 0; got < count; {
							n, err := dir.to.ReadBatch(rx)
							if err != nil {
								failure = fmt.Errorf("ReadBatch after %d of %d: %v", got, count, err)
								return
							}
							got += n
						}
					}
				}
				for range 3 {
					exchange() // warm up: scratch, netpoller, zone and unique caches
				}
				allocs := testing.AllocsPerRun(20, exchange)
				if failure != nil {
					t.Fatal(failure)
				}
				if allocs != 0 {
					t.Errorf("%v allocations per exchange of 2×%d datagrams, want 0", allocs, count)
				}
				if mode.gro && (srv.Coalesced() == 0 || peer.Coalesced() == 0) {
					t.Errorf("Coalesced() = %d and %d: the runs did not arrive coalesced", srv.Coalesced(), peer.Coalesced())
				}
			})
		}
	}
}

// TestWaitThenTryRead: WaitRead blocks until a datagram is queued and reads
// nothing; TryReadBatch then takes what is queued and returns 0 at once
// when nothing is; Close ends a WaitRead.
func TestWaitThenTryRead(t *testing.T) {
	srv, peer := listen(t, "udp4", lo4), listen(t, "udp4", lo4)
	c := newConn(t, srv, false, 8)
	msgs := make([]Message, 8)
	for i := range msgs {
		msgs[i].Buf = make([]byte, 2048)
	}
	if n, err := c.TryReadBatch(msgs); n != 0 || err != nil {
		t.Fatalf("TryReadBatch with nothing queued: %d, %v", n, err)
	}
	waited := make(chan error, 1)
	go func() { waited <- c.WaitRead() }()
	select {
	case err := <-waited:
		t.Fatalf("WaitRead returned with nothing queued: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	for i := range 3 {
		if _, err := peer.WriteToUDPAddrPort(payload(1, i), addrPort(srv)); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	if err := c.WaitRead(); err != nil { // still queued: WaitRead read nothing
		t.Fatal(err)
	}
	got := 0
	for got < 3 {
		n, err := c.TryReadBatch(msgs)
		if err != nil {
			t.Fatal(err)
		}
		for i := range msgs[:n] {
			if !bytes.Equal(msgs[i].Buf[:msgs[i].N], payload(1, got+i)) {
				t.Fatalf("datagram %d changed", got+i)
			}
		}
		got += n
	}
	if n, err := c.TryReadBatch(msgs); n != 0 || err != nil {
		t.Fatalf("TryReadBatch after draining: %d, %v", n, err)
	}
	go func() { waited <- c.WaitRead() }()
	time.Sleep(20 * time.Millisecond)
	c.Close()
	if err := <-waited; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WaitRead after Close: %v, want net.ErrClosed", err)
	}
}
