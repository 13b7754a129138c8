package relaytest

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/nat/tun"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// Logger logs to the test's output when -v is given, else nowhere.
func Logger(tb testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", tb.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// IKE returns an IKEv2 message of size bytes (header included) behind the
// non-ESP marker, with the given SPIs, exchange and flags, and message ID
// 0.
func IKE(ispi, rspi uint64, xchg framing.ExchangeType, flags uint8, size int) []byte {
	return IKEMsg(ispi, rspi, xchg, flags, 0, size)
}

// IKEMsg is IKE with a message ID.
func IKEMsg(ispi, rspi uint64, xchg framing.ExchangeType, flags uint8, msgID uint32, size int) []byte {
	b := make([]byte, framing.MarkerSize+size)
	m := b[framing.MarkerSize:]
	binary.BigEndian.PutUint64(m[0:], ispi)
	binary.BigEndian.PutUint64(m[8:], rspi)
	m[17] = 0x20
	m[18] = byte(xchg)
	m[19] = flags
	binary.BigEndian.PutUint32(m[20:], msgID)
	binary.BigEndian.PutUint32(m[24:], uint32(size))
	return b
}

// Init is an IKE_SA_INIT request for ispi; InitResponse the backend's
// answer, which confirms the session.
func Init(ispi uint64) []byte { return IKE(ispi, 0, framing.IKESAInit, framing.FlagInitiator, 100) }

// InitResponse answers Init(ispi).
func InitResponse(ispi uint64) []byte {
	return IKE(ispi, ispi^0x5151, framing.IKESAInit, framing.FlagResponse, 90)
}

// Rig is a client and a server relaying between two fake IKE daemons on
// loopback: Site (talks to the client) and Backend (the server's).
type Rig struct {
	T       testing.TB
	IP      string
	Site    *net.UDPConn // connected to the client's listen address
	Backend *net.UDPConn // the server's backend daemon
	Srv     *server.Server
	Cl      *client.Client
	SrvAddr string
	Dialed  chan net.Conn // connections the client opened
	Middle  *Middle       // the network between client and server, with RigOptions.Middle
	Ctx     context.Context
	cancel  context.CancelFunc
	done    sync.WaitGroup
}

// RigOptions configures NewRig.
type RigOptions struct {
	IP     string            // "127.0.0.1" (the default) or "::1"
	Server server.Config     // Backend and Logger are the rig's
	Link   streamlink.Config // the server's listener
	Client client.Config     // Peer, Logger and Dialer are the rig's
	NoCl   bool              // server only
	Middle bool              // the client's connections go through a Middle
	// UDPTarget, if set, picks the client's UDPPort (the UDP transport's
	// destination on the server's host) once the backend exists.
	UDPTarget func(r *Rig) uint16
}

// NewRig starts a rig for the test's life.
func NewRig(tb testing.TB, o RigOptions) *Rig {
	tb.Helper()
	if o.IP == "" {
		o.IP = "127.0.0.1"
	}
	r := &Rig{T: tb, IP: o.IP, Dialed: make(chan net.Conn, 16)}
	any0 := net.JoinHostPort(o.IP, "0")
	backend, err := net.ListenPacket("udp", any0)
	if err != nil {
		tb.Fatal(err)
	}
	r.Backend = backend.(*net.UDPConn)
	relay.SizeSocketBuffers(r.Backend)
	tb.Cleanup(func() { r.Backend.Close() })

	o.Server.Backend = r.Backend.LocalAddr().(*net.UDPAddr).AddrPort()
	if o.Server.Logger == nil {
		o.Server.Logger = Logger(tb)
	}
	srv, err := server.New(o.Server)
	if err != nil {
		tb.Fatal(err)
	}
	r.Srv = srv
	ln, err := net.Listen("tcp", any0)
	if err != nil {
		tb.Fatal(err)
	}
	r.SrvAddr = ln.Addr().String()
	o.Link.Counters, o.Link.Logger = srv.Counters(), Logger(tb)
	r.Ctx, r.cancel = context.WithCancel(context.Background())
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		if err := srv.Serve(r.Ctx, streamlink.NewListener(ln, o.Link)); err != nil {
			tb.Errorf("server: %v", err)
		}
	}()
	if !o.NoCl {
		o.Client.Peer = r.SrvAddr
		if o.UDPTarget != nil {
			o.Client.UDPPort = o.UDPTarget(r)
		}
		o.Client.Logger = Logger(tb)
		o.Client.ReconnectMin = relay.OrDefault(o.Client.ReconnectMin, 20*time.Millisecond)
		o.Client.Counters = new(relay.Counters)
		d := streamlink.NewDialer(streamlink.Config{MaxDatagram: o.Client.MaxDatagram, Counters: o.Client.Counters, Logger: o.Client.Logger})
		if o.Middle {
			r.Middle = NewMiddle(tb, r)
		}
		d.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			var err error
			if r.Middle != nil {
				c, err = r.Middle.Dial(ctx, network, addr)
			} else {
				var nd net.Dialer
				c, err = nd.DialContext(ctx, network, addr)
			}
			if err == nil {
				select {
				case r.Dialed <- c:
				default:
				}
			}
			return c, err
		}
		o.Client.Dialer = d
		cl, err := client.New(o.Client)
		if err != nil {
			tb.Fatal(err)
		}
		r.Cl = cl
		pc, err := client.ListenUDP(any0)
		if err != nil {
			tb.Fatal(err)
		}
		r.done.Add(1)
		go func() {
			defer r.done.Done()
			if err := cl.Serve(r.Ctx, pc); err != nil {
				tb.Errorf("client: %v", err)
			}
		}()
		site, err := net.DialUDP("udp", nil, pc.LocalAddr().(*net.UDPAddr))
		if err != nil {
			tb.Fatal(err)
		}
		r.Site = site
		relay.SizeSocketBuffers(site)
		tb.Cleanup(func() { r.Site.Close() })
	}
	tb.Cleanup(r.Stop)
	return r
}

// Stop stops the rig's server and client and waits for them.
func (r *Rig) Stop() {
	r.cancel()
	r.done.Wait()
}

// DialServer dials the rig's server whatever addr says: a dialer for
// clients of the test's own.
func (r *Rig) DialServer(ctx context.Context, network, _ string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, network, r.SrvAddr)
}

// Recv reads one datagram from c within two seconds.
func Recv(tb testing.TB, c *net.UDPConn) ([]byte, netip.AddrPort) {
	tb.Helper()
	buf := make([]byte, 70000)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		tb.Fatalf("waiting for a datagram on %v: %v", c.LocalAddr(), err)
	}
	return buf[:n], from
}

// ExpectNothing checks that nothing arrives on c for a short while.
func ExpectNothing(tb testing.TB, c *net.UDPConn, what string) {
	tb.Helper()
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(150 * time.Millisecond))
	if n, _, err := c.ReadFromUDPAddrPort(buf); err == nil {
		tb.Fatalf("%s: got a %d-byte datagram, want none", what, n)
	}
}

// Eventually waits up to 5 s for cond.
func Eventually(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	tb.Fatalf("timed out waiting for %s", what)
}

// Counter returns the counter of either role called name.
func Counter(c *relay.Counters, name string) uint64 {
	for _, role := range []string{relay.RoleServer, relay.RoleClient} {
		for _, v := range c.Snapshot(role) {
			if v.Name == name {
				return v.Value
			}
		}
	}
	panic("no counter " + name)
}

// Establish runs an IKE_SA_INIT exchange and one ESP packet each way
// through the rig and returns the backend-side address of the session.
func (r *Rig) Establish(ispi uint64, espToHub, espToSite uint32) netip.AddrPort {
	t := r.T
	t.Helper()
	init := IKE(ispi, 0, framing.IKESAInit, framing.FlagInitiator, 300)
	r.Site.Write(init)
	got, from := Recv(t, r.Backend)
	if !bytes.Equal(got, init) {
		t.Fatalf("backend got %d bytes, want the IKE_SA_INIT as sent (%d bytes)", len(got), len(init))
	}
	resp := IKE(ispi, 0x5151, framing.IKESAInit, framing.FlagResponse, 280)
	r.Backend.WriteToUDPAddrPort(resp, from)
	if got, _ := Recv(t, r.Site); !bytes.Equal(got, resp) {
		t.Fatalf("site got %d bytes, want the IKE_SA_INIT response", len(got))
	}
	esp := ESP(espToHub, 1, 1400)
	r.Site.Write(esp)
	if got, from2 := Recv(t, r.Backend); !bytes.Equal(got, esp) || from2 != from {
		t.Fatalf("backend: ESP from %v (session socket %v), equal=%v", from2, from, bytes.Equal(got, esp))
	}
	esp = ESP(espToSite, 1, 1400)
	r.Backend.WriteToUDPAddrPort(esp, from)
	if got, _ := Recv(t, r.Site); !bytes.Equal(got, esp) {
		t.Fatal("site: ESP from the hub changed on the way")
	}
	return from
}

// RawConn opens a TCP connection to the server as a hand-written client.
func (r *Rig) RawConn(prefix bool) net.Conn {
	r.T.Helper()
	c, err := net.Dial("tcp", r.SrvAddr)
	if err != nil {
		r.T.Fatal(err)
	}
	r.T.Cleanup(func() { c.Close() })
	if prefix {
		c.Write([]byte(framing.Prefix))
	}
	return c
}

// Frame sends datagrams to the server on c as frames.
func Frame(tb testing.TB, c net.Conn, dgs ...[]byte) {
	tb.Helper()
	var b []byte
	for _, d := range dgs {
		b = framing.AppendFrame(b, d)
	}
	if _, err := c.Write(b); err != nil {
		tb.Fatalf("writing to the server: %v", err)
	}
}

// ReadFrame reads the next datagram the server sends on c, within two
// seconds, through d (a decoder of c's, kept for the connection).
func ReadFrame(tb testing.TB, c net.Conn, d *framing.Decoder) []byte {
	tb.Helper()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	p, err := d.Next()
	if err != nil {
		tb.Fatalf("waiting for a frame from the server: %v", err)
	}
	return bytes.Clone(p)
}

// ExpectNoFrame checks that the server sends nothing on c for a short
// while.
func ExpectNoFrame(tb testing.TB, c net.Conn, what string) {
	tb.Helper()
	c.SetReadDeadline(time.Now().Add(150 * time.Millisecond))
	var b [64]byte
	if n, err := c.Read(b[:]); err == nil || n > 0 {
		tb.Fatalf("%s: the server sent %d bytes, want none", what, n)
	}
	c.SetReadDeadline(time.Time{})
}

// OpenSession opens a confirmed session for ispi on c, a raw client
// connection: an IKE_SA_INIT that the backend answers, the answer read
// back on c through d. It returns the backend side's address.
func (r *Rig) OpenSession(c net.Conn, d *framing.Decoder, ispi uint64) netip.AddrPort {
	r.T.Helper()
	Frame(r.T, c, Init(ispi))
	got, from := Recv(r.T, r.Backend)
	if !bytes.Equal(got, Init(ispi)) {
		r.T.Fatalf("backend got %d bytes, want the IKE_SA_INIT", len(got))
	}
	r.Backend.WriteToUDPAddrPort(InitResponse(ispi), from)
	if got := ReadFrame(r.T, c, d); !bytes.Equal(got, InitResponse(ispi)) {
		r.T.Fatalf("client got %d bytes, want the IKE_SA_INIT response", len(got))
	}
	return from
}

// ClosedByServer waits until the server closes c (with FIN or RST).
func ClosedByServer(tb testing.TB, c net.Conn) {
	tb.Helper()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		tb.Fatalf("server did not close the connection: %v", err)
	}
}

// ServeTUN starts a transparent-mode client on dev for the test's life.
// Unless cfg has a Dialer, the client dials the rig's server, whatever the
// peer's address.
func ServeTUN(tb testing.TB, r *Rig, cfg client.Config, dev tun.Device) *client.Client {
	tb.Helper()
	cfg.Logger = Logger(tb)
	if cfg.Dialer == nil {
		d := streamlink.NewDialer(streamlink.Config{Logger: cfg.Logger})
		d.Dial = r.DialServer
		cfg.Dialer = d
	}
	cl, err := client.New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cl.ServeTUN(ctx, dev, "tun-under-test") }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("ServeTUN: %v", err)
		}
	})
	return cl
}

// ServeExplicit starts an explicit-mode client with cfg (its Peer and
// Dialer the caller's) on a loopback socket for the test's life, and
// returns it and a "daemon" socket connected to it.
func ServeExplicit(tb testing.TB, cfg client.Config) (*client.Client, *net.UDPConn) {
	tb.Helper()
	if cfg.Logger == nil {
		cfg.Logger = Logger(tb)
	}
	cl, err := client.New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	pc, err := client.ListenUDP("127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cl.Serve(ctx, pc) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("Serve: %v", err)
		}
	})
	daemon, err := net.DialUDP("udp", nil, pc.LocalAddr().(*net.UDPAddr))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { daemon.Close() })
	relay.SizeSocketBuffers(daemon)
	return cl, daemon
}

// SessionLocal returns the backend-side address of the server's session
// of IKE SA ispi, waiting for it to exist.
func (r *Rig) SessionLocal(tb testing.TB, ispi uint64) netip.AddrPort {
	tb.Helper()
	want := relay.SPI64(ispi)
	var local netip.AddrPort
	Eventually(tb, "session "+want, func() bool {
		for _, ss := range r.Srv.Status().Sessions {
			for _, sa := range ss.IKESAs {
				if sa.InitiatorSPI == want {
					local = netip.MustParseAddrPort(ss.Local)
					return true
				}
			}
		}
		return false
	})
	return local
}
