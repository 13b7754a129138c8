package relay

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/relaytest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testLogger logs to the test's output when -v is given, else nowhere.
func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

func ikeDatagram(ispi, rspi uint64, xchg framing.ExchangeType, flags uint8, size int) []byte {
	b := make([]byte, framing.MarkerSize+size)
	m := b[framing.MarkerSize:]
	binary.BigEndian.PutUint64(m[0:], ispi)
	binary.BigEndian.PutUint64(m[8:], rspi)
	m[17] = 0x20
	m[18] = byte(xchg)
	m[19] = flags
	binary.BigEndian.PutUint32(m[24:], uint32(size))
	return b
}

// espDatagram builds an ESP packet (relaytest.ESP).
var espDatagram = relaytest.ESP

// rig is a client and a server relaying between two fake IKE daemons on
// loopback: site (talks to the client) and backend (the server's).
type rig struct {
	t       testing.TB
	ip      string
	site    *net.UDPConn // connected to the client's listen address
	backend *net.UDPConn // the server's backend daemon
	srv     *Server
	cl      *Client
	srvAddr string
	dialed  chan net.Conn // connections the client opened
	cancel  context.CancelFunc
	done    sync.WaitGroup
}

type rigOptions struct {
	ip     string // "127.0.0.1" or "::1"
	server ServerConfig
	client ClientConfig
	noCl   bool // server only
	// udpTarget, if set, picks the client's UDPPort (the UDP transport's
	// destination on the server's host) once the backend exists.
	udpTarget func(r *rig) uint16
}

func newRig(t testing.TB, o rigOptions) *rig {
	t.Helper()
	if o.ip == "" {
		o.ip = "127.0.0.1"
	}
	r := &rig{t: t, ip: o.ip, dialed: make(chan net.Conn, 16)}
	ap := func(port int) string { return net.JoinHostPort(o.ip, "0") }
	backend, err := net.ListenPacket("udp", ap(0))
	if err != nil {
		t.Fatal(err)
	}
	r.backend = backend.(*net.UDPConn)
	growSocketBuffers(r.backend)
	t.Cleanup(func() { r.backend.Close() })

	o.server.Backend = r.backend.LocalAddr().(*net.UDPAddr).AddrPort()
	o.server.Logger = testLogger(t)
	srv, err := NewServer(o.server)
	if err != nil {
		t.Fatal(err)
	}
	r.srv = srv
	ln, err := net.Listen("tcp", ap(0))
	if err != nil {
		t.Fatal(err)
	}
	r.srvAddr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		if err := srv.Serve(ctx, ln); err != nil {
			t.Errorf("server: %v", err)
		}
	}()
	if !o.noCl {
		o.client.Peer = r.srvAddr
		if o.udpTarget != nil {
			o.client.UDPPort = o.udpTarget(r)
		}
		o.client.Logger = testLogger(t)
		o.client.ReconnectMin = orDefault(o.client.ReconnectMin, 20*time.Millisecond)
		o.client.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err == nil {
				select {
				case r.dialed <- c:
				default:
				}
			}
			return c, err
		}
		cl, err := NewClient(o.client)
		if err != nil {
			t.Fatal(err)
		}
		r.cl = cl
		pc, err := ListenUDP(ap(0))
		if err != nil {
			t.Fatal(err)
		}
		r.done.Add(1)
		go func() {
			defer r.done.Done()
			if err := cl.Serve(ctx, pc); err != nil {
				t.Errorf("client: %v", err)
			}
		}()
		site, err := net.DialUDP("udp", nil, pc.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		r.site = site
		growSocketBuffers(site)
		t.Cleanup(func() { r.site.Close() })
	}
	t.Cleanup(r.stop)
	return r
}

func (r *rig) stop() {
	r.cancel()
	r.done.Wait()
}

// recv reads one datagram from c within a second.
func recv(t testing.TB, c *net.UDPConn) ([]byte, netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 70000)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("waiting for a datagram on %v: %v", c.LocalAddr(), err)
	}
	return buf[:n], from
}

// expectNothing checks that nothing arrives on c for a short while.
func expectNothing(t testing.TB, c *net.UDPConn, what string) {
	t.Helper()
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(150 * time.Millisecond))
	if n, _, err := c.ReadFromUDPAddrPort(buf); err == nil {
		t.Fatalf("%s: got a %d-byte datagram, want none", what, n)
	}
}

func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func counter(c *Counters, name string) uint64 {
	for _, v := range c.Snapshot() {
		if v.Name == name {
			return v.Value
		}
	}
	panic("no counter " + name)
}

// establish runs an IKE_SA_INIT exchange and one ESP packet each way
// through the rig and returns the backend-side address of the session.
func (r *rig) establish(ispi uint64, espToHub, espToSite uint32) netip.AddrPort {
	t := r.t
	t.Helper()
	init := ikeDatagram(ispi, 0, framing.IKESAInit, framing.FlagInitiator, 300)
	r.site.Write(init)
	got, from := recv(t, r.backend)
	if !bytes.Equal(got, init) {
		t.Fatalf("backend got %d bytes, want the IKE_SA_INIT as sent (%d bytes)", len(got), len(init))
	}
	resp := ikeDatagram(ispi, 0x5151, framing.IKESAInit, framing.FlagResponse, 280)
	r.backend.WriteToUDPAddrPort(resp, from)
	if got, _ := recv(t, r.site); !bytes.Equal(got, resp) {
		t.Fatalf("site got %d bytes, want the IKE_SA_INIT response", len(got))
	}
	esp := espDatagram(espToHub, 1, 1400)
	r.site.Write(esp)
	if got, from2 := recv(t, r.backend); !bytes.Equal(got, esp) || from2 != from {
		t.Fatalf("backend: ESP from %v (session socket %v), equal=%v", from2, from, bytes.Equal(got, esp))
	}
	esp = espDatagram(espToSite, 1, 1400)
	r.backend.WriteToUDPAddrPort(esp, from)
	if got, _ := recv(t, r.site); !bytes.Equal(got, esp) {
		t.Fatal("site: ESP from the hub changed on the way")
	}
	return from
}

func TestRelayEndToEnd(t *testing.T) {
	for _, ip := range []string{"127.0.0.1", "::1"} {
		t.Run(ip, func(t *testing.T) {
			r := newRig(t, rigOptions{ip: ip})
			from := r.establish(0xf050ac7a151a3b31, 0xc0000001, 0xd0000001)
			if !from.Addr().Is4() && ip == "127.0.0.1" || from.Addr().Is4() && ip == "::1" {
				t.Fatalf("backend saw the session from %v", from)
			}

			// The daemon's NAT keepalives stay off the TCP stream.
			r.site.Write([]byte{0xff})
			expectNothing(t, r.backend, "keepalive from the site")
			eventually(t, "client counts the keepalive", func() bool { return counter(r.cl.Counters(), "keepalives_dropped") == 1 })
			// And so do the hub's.
			r.backend.WriteToUDPAddrPort([]byte{0xff}, from)
			expectNothing(t, r.site, "keepalive from the hub")
			eventually(t, "server counts the keepalive", func() bool { return counter(r.srv.Counters(), "keepalives_dropped") == 1 })

			// Many datagrams at once arrive complete and in order.
			for i := range 200 {
				r.site.Write(espDatagram(0xc0000001, uint32(i+2), 100+i))
			}
			for i := range 200 {
				got, _ := recv(t, r.backend)
				if want := espDatagram(0xc0000001, uint32(i+2), 100+i); !bytes.Equal(got, want) {
					t.Fatalf("datagram %d: got %d bytes (seq %d), want %d bytes", i, len(got), binary.BigEndian.Uint32(got[4:]), len(want))
				}
			}

			st := r.srv.Status()
			if len(st.Sessions) != 1 {
				t.Fatalf("server sessions: %d", len(st.Sessions))
			}
			s := st.Sessions[0]
			if s.State != "up" || s.Local != from.String() || s.Transport != "TCP" || s.PacketsIn != 202 || s.PacketsOut != 2 {
				t.Fatalf("server session status: %+v", s)
			}
			if len(s.IKESAs) != 1 || s.IKESAs[0].InitiatorSPI != "f050ac7a151a3b31" || s.IKESAs[0].ResponderSPI != "0000000000005151" {
				t.Fatalf("IKE SAs: %+v", s.IKESAs)
			}
			if len(s.ESPIn) != 1 || s.ESPIn[0] != "c0000001" || len(s.ESPOut) != 1 || s.ESPOut[0] != "d0000001" {
				t.Fatalf("ESP SPIs: in %v out %v", s.ESPIn, s.ESPOut)
			}
			cs := r.cl.Status()
			if len(cs.Sessions) != 1 || cs.Sessions[0].State != "up" || cs.Sessions[0].PacketsOut != 202 || cs.Sessions[0].PacketsIn != 2 {
				t.Fatalf("client status: %+v", cs.Sessions)
			}
			var text strings.Builder
			if err := st.WriteText(&text, time.Now()); err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{"transport: TCP", "IKE SA: spi f050ac7a151a3b31/0000000000005151", "stat: rxp=202 txp=2", "ESP SPI: in c0000001  out d0000001"} {
				if !strings.Contains(text.String(), want) {
					t.Errorf("status text lacks %q:\n%s", want, text.String())
				}
			}
		})
	}
}

// TestReconnectKeepsSession cuts the client's connection mid-traffic: the
// client reconnects, the session follows, and the backend keeps seeing the
// same source port (so a daemon with MOBIKE on keeps its SAs working).
func TestReconnectKeepsSession(t *testing.T) {
	r := newRig(t, rigOptions{})
	from := r.establish(0x1111, 0xc1, 0xd1)
	first := <-r.dialed
	first.Close() // as if a middlebox reset it

	deadline := time.Now().Add(5 * time.Second)
	var got []byte
	var from2 netip.AddrPort
	buf := make([]byte, 2048)
	for seq := uint32(10); time.Now().Before(deadline); seq++ {
		r.site.Write(espDatagram(0xc1, seq, 200))
		r.backend.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		n, f, err := r.backend.ReadFromUDPAddrPort(buf)
		if err == nil {
			got, from2 = buf[:n], f
			break
		}
	}
	if got == nil {
		t.Fatal("traffic did not resume after the connection was cut")
	}
	if from2 != from {
		t.Fatalf("backend sees the session move from %v to %v", from, from2)
	}
	// Return traffic uses the new connection.
	r.backend.WriteToUDPAddrPort(espDatagram(0xd1, 50, 300), from)
	if got, _ := recv(t, r.site); binary.BigEndian.Uint32(got[4:]) != 50 {
		t.Fatal("return traffic lost after reconnect")
	}
	st := r.srv.Status()
	if len(st.Sessions) != 1 || st.Sessions[0].Connections != 2 {
		t.Fatalf("want one session carried by 2 connections, got %+v", st.Sessions)
	}
	if counter(r.srv.Counters(), "rebinds") != 1 || counter(r.cl.Counters(), "conns_dialed") != 2 {
		t.Fatalf("rebinds %d, dialed %d", counter(r.srv.Counters(), "rebinds"), counter(r.cl.Counters(), "conns_dialed"))
	}
}

// rawConn opens a TCP connection to the server as a hand-written client.
func (r *rig) rawConn(prefix bool) net.Conn {
	r.t.Helper()
	c, err := net.Dial("tcp", r.srvAddr)
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { c.Close() })
	if prefix {
		c.Write([]byte(framing.Prefix))
	}
	return c
}

// closedByServer waits until the server closes c (with FIN or RST).
func closedByServer(t testing.TB, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("server did not close the connection: %v", err)
	}
}

// victim keeps a session busy through the real client while bad input
// hits the server. It owns the backend socket meanwhile: it counts its own
// datagrams (ESP with its SPI) and passes every other one to the test on
// other.
type victim struct {
	r        *rig
	stop     chan struct{}
	done     sync.WaitGroup
	other    chan []byte
	mu       sync.Mutex // guards the following
	sent     int
	received int
}

const victimSPI = 0xc7

func startVictim(r *rig) *victim {
	v := &victim{r: r, stop: make(chan struct{}), other: make(chan []byte, 16)}
	r.establish(0xbeef, victimSPI, 0xd7)
	v.done.Add(2)
	go func() { // sender, paced so that loss would show
		defer v.done.Done()
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for seq := uint32(2); ; seq++ {
			select {
			case <-v.stop:
				return
			case <-t.C:
			}
			r.site.Write(espDatagram(victimSPI, seq, 500))
			v.mu.Lock()
			v.sent++
			v.mu.Unlock()
		}
	}()
	go func() { // backend reader
		defer v.done.Done()
		buf := make([]byte, 70000)
		for {
			r.backend.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			n, _, err := r.backend.ReadFromUDPAddrPort(buf)
			if err != nil {
				select {
				case <-v.stop:
					return
				default:
					continue
				}
			}
			if n >= 8 && binary.BigEndian.Uint32(buf) == victimSPI {
				v.mu.Lock()
				v.received++
				v.mu.Unlock()
				continue
			}
			v.other <- bytes.Clone(buf[:n])
		}
	}()
	return v
}

// next returns the next datagram the backend got that is not the victim's.
func (v *victim) next(t testing.TB) []byte {
	t.Helper()
	select {
	case b := <-v.other:
		return b
	case <-time.After(2 * time.Second):
		t.Fatal("backend got nothing")
		return nil
	}
}

func (v *victim) finish(t *testing.T) {
	// Let the last datagrams land, then stop.
	time.Sleep(100 * time.Millisecond)
	close(v.stop)
	v.done.Wait()
	v.mu.Lock()
	defer v.mu.Unlock()
	t.Logf("victim session: sent %d, received %d", v.sent, v.received)
	if v.sent < 50 || v.received != v.sent {
		t.Errorf("victim session: sent %d, received %d: bad input harmed another session", v.sent, v.received)
	}
}

func TestBadInput(t *testing.T) {
	r := newRig(t, rigOptions{server: ServerConfig{PrefixTimeout: 300 * time.Millisecond, MaxDatagram: 1500}})
	v := startVictim(r)
	sc := r.srv.Counters()

	t.Run("no prefix", func(t *testing.T) {
		c := r.rawConn(false)
		c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		closedByServer(t, c)
		eventually(t, "bad_prefix", func() bool { return counter(sc, "bad_prefix") == 1 })
	})
	t.Run("silent", func(t *testing.T) {
		c := r.rawConn(false)
		closedByServer(t, c)
		eventually(t, "prefix_timeouts", func() bool { return counter(sc, "prefix_timeouts") == 1 })
	})
	t.Run("length 0 and 1", func(t *testing.T) {
		for i, l := range [][]byte{{0, 0}, {0, 1}} {
			c := r.rawConn(true)
			c.Write(l)
			closedByServer(t, c)
			eventually(t, "bad_length", func() bool { return counter(sc, "bad_length") == uint64(i+1) })
		}
	})
	t.Run("truncated", func(t *testing.T) {
		c := r.rawConn(true)
		f := framing.AppendFrame(nil, espDatagram(0xc7, 1, 400))
		c.Write(f[:200])
		c.(*net.TCPConn).CloseWrite()
		closedByServer(t, c)
		eventually(t, "truncated_frames", func() bool { return counter(sc, "truncated_frames") == 1 })
	})
	t.Run("unknown SPI", func(t *testing.T) {
		c := r.rawConn(true)
		c.Write(framing.AppendFrame(nil, espDatagram(0x0badbad, 1, 100)))
		eventually(t, "unknown_spi", func() bool { return counter(sc, "unknown_spi") == 1 })
		// One unknown SPI does not close the connection: an IKE message
		// on it still starts a session.
		c.Write(framing.AppendFrame(nil, ikeDatagram(0x7777, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
		if got := v.next(t); len(got) != 104 {
			t.Fatalf("IKE after an unknown SPI: backend got %d bytes", len(got))
		}
		// Sustained garbage does close it.
		c2 := r.rawConn(true)
		var burst []byte
		for i := range garbageLimit {
			burst = framing.AppendFrame(burst, espDatagram(0x0bad0000+uint32(i), 1, 60))
		}
		c2.Write(burst)
		closedByServer(t, c2)
		if counter(sc, "garbage_closes") != 1 {
			t.Fatalf("garbage_closes = %d", counter(sc, "garbage_closes"))
		}
	})
	t.Run("malformed", func(t *testing.T) {
		c := r.rawConn(true)
		c.Write(framing.AppendFrame(nil, []byte{0, 0, 0, 0, 1, 2})) // marker, no IKE header
		eventually(t, "malformed", func() bool { return counter(sc, "malformed") == 1 })
	})
	t.Run("oversized frame skipped", func(t *testing.T) {
		c := r.rawConn(true)
		var s []byte
		s = framing.AppendFrame(s, ikeDatagram(0x8888, 0, framing.IKESAInit, framing.FlagInitiator, 3000))
		s = framing.AppendFrame(s, ikeDatagram(0x8888, 0, framing.IKESAInit, framing.FlagInitiator, 1000))
		c.Write(s)
		if got := v.next(t); len(got) != 1004 {
			t.Fatalf("frame after the oversized one: backend got %d bytes", len(got))
		}
		if counter(sc, "oversized_frames") != 1 {
			t.Fatalf("oversized_frames = %d", counter(sc, "oversized_frames"))
		}
	})
	v.finish(t)
}

func TestLimits(t *testing.T) {
	r := newRig(t, rigOptions{noCl: true, server: ServerConfig{MaxConns: 2, MaxSessions: 1}})
	sc := r.srv.Counters()
	a := r.rawConn(true)
	a.Write(framing.AppendFrame(nil, ikeDatagram(1, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
	recv(t, r.backend)
	b := r.rawConn(true)
	// A second session is over the limit: dropped, counted, the
	// connection stays.
	b.Write(framing.AppendFrame(nil, ikeDatagram(2, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
	eventually(t, "sessions_rejected", func() bool { return counter(sc, "sessions_rejected") == 1 })
	expectNothing(t, r.backend, "IKE over the session limit")
	// A third connection is over the connection limit.
	c := r.rawConn(true)
	closedByServer(t, c)
	if counter(sc, "conns_rejected") != 1 {
		t.Fatalf("conns_rejected = %d", counter(sc, "conns_rejected"))
	}
	// The first session is unharmed.
	a.Write(framing.AppendFrame(nil, ikeDatagram(1, 9, framing.IKEAuth, framing.FlagInitiator, 200)))
	if got, _ := recv(t, r.backend); len(got) != 204 {
		t.Fatalf("first session after the limits: %d bytes", len(got))
	}
}

func TestSessionExpiresAfterClientLeaves(t *testing.T) {
	r := newRig(t, rigOptions{noCl: true, server: ServerConfig{SessionIdle: 200 * time.Millisecond}})
	c := r.rawConn(true)
	c.Write(framing.AppendFrame(nil, ikeDatagram(3, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
	_, from := recv(t, r.backend)
	// While the connection is open the session stays, idle or not.
	time.Sleep(400 * time.Millisecond)
	if n := len(r.srv.Status().Sessions); n != 1 {
		t.Fatalf("session expired while connected: %d sessions", n)
	}
	// Traffic from the backend with no connection is dropped and counted.
	c.Close()
	eventually(t, "session to lose its connection", func() bool { return r.srv.Status().Sessions[0].State == "waiting" })
	r.backend.WriteToUDPAddrPort(espDatagram(0xd3, 1, 100), from)
	eventually(t, "no_path", func() bool { return counter(r.srv.Counters(), "no_path") == 1 })
	eventually(t, "session expiry", func() bool { return len(r.srv.Status().Sessions) == 0 })
	if counter(r.srv.Counters(), "sessions_expired") != 1 {
		t.Fatal("sessions_expired not counted")
	}
}

// TestReturnPathFollowsLastConnection checks RFC 9329 6.1: the server
// answers on the connection that last carried the session's traffic.
func TestReturnPathFollowsLastConnection(t *testing.T) {
	r := newRig(t, rigOptions{noCl: true})
	a := r.rawConn(true)
	a.Write(framing.AppendFrame(nil, ikeDatagram(4, 0, framing.IKESAInit, framing.FlagInitiator, 100)))
	_, from := recv(t, r.backend)
	b := r.rawConn(true)
	b.Write(framing.AppendFrame(nil, ikeDatagram(4, 7, framing.IKEAuth, framing.FlagInitiator, 100)))
	if _, from2 := recv(t, r.backend); from2 != from {
		t.Fatalf("second connection got another backend socket: %v vs %v", from2, from)
	}
	reply := ikeDatagram(4, 7, framing.IKEAuth, framing.FlagResponse, 120)
	r.backend.WriteToUDPAddrPort(reply, from)
	b.SetReadDeadline(time.Now().Add(2 * time.Second))
	d := framing.NewDecoder(b, 0, false)
	got, err := d.Next()
	if err != nil || !bytes.Equal(got, reply) {
		t.Fatalf("reply on the newer connection: %v", err)
	}
	a.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _ := a.Read(make([]byte, 10)); n != 0 {
		t.Fatal("older connection also got the reply")
	}
}

// TestHotPathDoesNotAllocate relays ESP both ways through client and
// server and checks the whole process allocates far less than once per
// datagram.
func TestHotPathDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates on its own; make test runs this check without -race")
	}
	r := newRig(t, rigOptions{})
	checkHotPath(t, r, r.establish(0x4242, 0xc9, 0xd9), 0)
}

// checkHotPath relays 1400-byte ESP back and forth through r (the backend
// answering from), and fails t if the whole process allocates more than
// 0.05 times per relayed datagram, beyond wireCopies allocations per
// round trip that the test's own wire makes.
func checkHotPath(t *testing.T, r *rig, from netip.AddrPort, wireCopies int) {
	t.Helper()
	up, down := espDatagram(0xc9, 1, 1400), espDatagram(0xd9, 1, 1400)
	buf := make([]byte, 2048)
	roundTrip := func() {
		r.site.Write(up)
		r.backend.SetReadDeadline(time.Now().Add(time.Second))
		r.backend.ReadFromUDPAddrPort(buf)
		r.backend.WriteToUDPAddrPort(down, from)
		r.site.SetReadDeadline(time.Now().Add(time.Second))
		r.site.Read(buf)
	}
	for range 200 {
		roundTrip()
	}
	const n = 2000
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range n {
		roundTrip()
	}
	runtime.ReadMemStats(&after)
	perDatagram := (float64(after.Mallocs-before.Mallocs) - float64(wireCopies*n)) / (2 * n)
	t.Logf("%.3f allocations per relayed datagram (whole process, beyond the wire's copies)", perDatagram)
	if perDatagram > 0.05 {
		t.Fatalf("%.3f allocations per datagram: the hot path allocates", perDatagram)
	}
}

// TestRoutesAreBounded checks that a session which keeps learning SPIs
// (as rekeys do for as long as it lives) holds a bounded share of the
// routing table, and that expiry removes all of it.
func TestRoutesAreBounded(t *testing.T) {
	r := newRig(t, rigOptions{noCl: true, server: ServerConfig{SessionIdle: 100 * time.Millisecond}})
	c := r.rawConn(true)
	var s []byte
	s = framing.AppendFrame(s, ikeDatagram(5, 0, framing.IKESAInit, framing.FlagInitiator, 100))
	for i := range 3 * maxRouteKeys {
		s = framing.AppendFrame(s, espDatagram(0xe0000000+uint32(i), 1, 60))
		s = framing.AppendFrame(s, ikeDatagram(0x100+uint64(i), 0, framing.CreateChildSA, framing.FlagInitiator, 80))
	}
	c.Write(s)
	for range 1 + 6*maxRouteKeys {
		recv(t, r.backend)
	}
	r.srv.mu.Lock()
	ike, esp := len(r.srv.byIKE), len(r.srv.byESP)
	r.srv.mu.Unlock()
	if ike != maxRouteKeys || esp != maxRouteKeys {
		t.Fatalf("routing table holds %d IKE and %d ESP SPIs for one session, want %d each", ike, esp, maxRouteKeys)
	}
	c.Close()
	eventually(t, "session expiry", func() bool { return len(r.srv.Status().Sessions) == 0 })
	r.srv.mu.Lock()
	defer r.srv.mu.Unlock()
	if len(r.srv.byIKE) != 0 || len(r.srv.byESP) != 0 {
		t.Fatalf("expired session left %d IKE and %d ESP routes", len(r.srv.byIKE), len(r.srv.byESP))
	}
}

// TestFlowExpiresWhenDaemonIsSilent checks the client closes a flow, and
// its connection, once the daemon has sent nothing for FlowIdle, and that
// the daemon's keepalives count as something.
func TestFlowExpiresWhenDaemonIsSilent(t *testing.T) {
	r := newRig(t, rigOptions{client: ClientConfig{FlowIdle: 300 * time.Millisecond}})
	r.establish(0x6666, 0xc6, 0xd6)
	for range 6 { // keepalives alone keep the flow
		time.Sleep(100 * time.Millisecond)
		r.site.Write([]byte{0xff})
	}
	if n := len(r.cl.Status().Sessions); n != 1 {
		t.Fatalf("flow closed while the daemon sent keepalives: %d flows", n)
	}
	eventually(t, "flow expiry", func() bool { return len(r.cl.Status().Sessions) == 0 })
	if counter(r.cl.Counters(), "sessions_expired") != 1 {
		t.Fatal("flow expiry not counted")
	}
	eventually(t, "server session to lose its connection", func() bool {
		st := r.srv.Status()
		return len(st.Sessions) == 1 && st.Sessions[0].State == "waiting"
	})
}
