package frontdoor_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/frontdoor"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/streamlink"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const serverName = "vpn.example.test"

// testLogger logs to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// door is a front door on loopback with a streamlink.Listener over it, and
// the links it accepts.
type door struct {
	fd       *frontdoor.Listener
	addr     string
	counters *relay.Counters
	links    chan relay.Link
}

// startDoor starts a front door with cfg, and a streamlink.Listener that
// accepts links from it into d.links until the test ends.
func startDoor(t *testing.T, cfg frontdoor.Config) *door {
	t.Helper()
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Counters == nil {
		cfg.Counters = new(relay.Counters)
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	fd := frontdoor.Listen(nl, cfg)
	ln := streamlink.NewListener(fd, streamlink.Config{Counters: cfg.Counters, Logger: cfg.Logger})
	d := &door{fd: fd, addr: nl.Addr().String(), counters: cfg.Counters, links: make(chan relay.Link, 64)}
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		for {
			link, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			d.links <- link
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-accepted
		for {
			select {
			case link := <-d.links:
				link.Close()
			default:
				return
			}
		}
	})
	return d
}

// link waits for the next link the door accepts.
func (d *door) link(t *testing.T) relay.Link {
	t.Helper()
	select {
	case link := <-d.links:
		t.Cleanup(func() { link.Close() })
		return link
	case <-time.After(5 * time.Second):
		t.Fatal("no link accepted")
		return nil
	}
}

// noLink checks that the door accepts no link for a while.
func (d *door) noLink(t *testing.T) {
	t.Helper()
	select {
	case link := <-d.links:
		link.Close()
		t.Fatalf("a link from %s was accepted", link.RemoteAddr())
	case <-time.After(200 * time.Millisecond):
	}
}

// waitFor waits until cond holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitCount waits until a counter reaches want.
func waitCount(t *testing.T, name string, c *atomic.Uint64, want uint64) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%s = %d", name, want), func() bool { return c.Load() >= want })
	if got := c.Load(); got != want {
		t.Fatalf("%s = %d, want %d", name, got, want)
	}
}

// collector is a relay.Receiver that keeps copies of what it receives.
type collector struct{ got chan []byte }

func (c *collector) Receive(burst []relay.Datagram) error {
	for _, d := range burst {
		c.got <- bytes.Clone(d.Bytes())
	}
	return nil
}

// served is a link being served into a collector.
type served struct {
	link relay.Link
	rx   *collector
}

// serve serves link until it is closed (the test's cleanup closes it).
func serve(link relay.Link) *served {
	sv := &served{link: link, rx: &collector{got: make(chan []byte, 16)}}
	go link.Serve(sv.rx)
	return sv
}

// exchange checks that a datagram goes each way between a client's link and
// the server's.
func exchange(t *testing.T, client, server *served) {
	t.Helper()
	for i, pair := range [][2]*served{{client, server}, {server, client}} {
		from, to := pair[0], pair[1]
		want := relaytest.ESP(0xc1, uint32(i+1), 100+i)
		if err := from.link.Send([][]byte{append(make([]byte, relay.Headroom), want...)}); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		select {
		case got := <-to.rx.got:
			if !bytes.Equal(got, want) {
				t.Fatalf("datagram %d: got %x, want %x", i, got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("datagram %d did not arrive", i)
		}
	}
}

// dialLink opens a link to d as a streamlink client, with TLS if tc is set.
func (d *door) dialLink(t *testing.T, tc *tls.Config) (relay.Link, error) {
	t.Helper()
	dl := streamlink.NewDialer(streamlink.Config{})
	dl.TLS = tc
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	link, err := dl.DialLink(ctx, d.addr)
	if err == nil {
		t.Cleanup(func() { link.Close() })
	}
	return link, err
}

// dialRaw opens a TCP connection to d from local (nil: any address).
func (d *door) dialRaw(t *testing.T, local net.IP) *net.TCPConn {
	t.Helper()
	nd := net.Dialer{Timeout: 5 * time.Second}
	if local != nil {
		nd.LocalAddr = &net.TCPAddr{IP: local}
	}
	nc, err := nd.Dial("tcp", d.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return nc.(*net.TCPConn)
}

// closedByServer checks that the server closes nc.
func closedByServer(t *testing.T, nc net.Conn) {
	t.Helper()
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the front door did not close the connection")
	}
}

// tlsSetup is a CA, the server's certificate for serverName, and the
// client's TLS configuration that trusts it.
type tlsSetup struct {
	ca     *testCA
	server tls.Certificate
	client *tls.Config
}

func newTLSSetup(t *testing.T) *tlsSetup {
	ca := newCA(t, "iketcp test CA")
	return &tlsSetup{
		ca:     ca,
		server: ca.issue(t, 2, serverName, serverName),
		client: &tls.Config{RootCAs: ca.pool, ServerName: serverName},
	}
}

func (s *tlsSetup) source() frontdoor.CertSource {
	return frontdoor.CertFunc(func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &s.server, nil })
}

// TestClearPassesThrough: IKETCP in clear reaches Accept byte for byte,
// the sniffed bytes replayed, and the way back is untouched.
func TestClearPassesThrough(t *testing.T) {
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fd := frontdoor.Listen(nl, frontdoor.Config{Logger: testLogger(t)})
	defer fd.Close()
	nc, err := net.Dial("tcp", nl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	sent := []byte("IKETCP")
	for i := range 20000 { // more than the front door reads before deciding
		sent = append(sent, byte(i*7))
	}
	go nc.Write(sent)
	c, err := fd.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.RemoteAddr().String() != nc.LocalAddr().String() {
		t.Errorf("RemoteAddr %v, want %v", c.RemoteAddr(), nc.LocalAddr())
	}
	got := make([]byte, len(sent))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, sent) {
		t.Fatal("the stream changed on the way through")
	}
	c.Write([]byte("back"))
	back := make([]byte, 4)
	if _, err := io.ReadFull(nc, back); err != nil || string(back) != "back" {
		t.Fatalf("way back: %q, %v", back, err)
	}
}

// TestStreamlinkInClear: a streamlink.Listener over the front door serves
// a streamlink.Dialer's client in clear.
func TestStreamlinkInClear(t *testing.T) {
	d := startDoor(t, frontdoor.Config{})
	client, err := d.dialLink(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	server := d.link(t)
	exchange(t, serve(client), serve(server))
	if server.RemoteAddr() != client.LocalAddr() {
		t.Errorf("server link's RemoteAddr %s, want the client's %s", server.RemoteAddr(), client.LocalAddr())
	}
}

// TestTLS: a client naming the server gets TLS 1.3, and its IKETCP inside.
func TestTLS(t *testing.T) {
	s := newTLSSetup(t)
	d := startDoor(t, frontdoor.Config{Certificate: s.source(), ServerNames: []string{serverName}})
	tc := s.client.Clone()
	var version atomic.Uint32
	tc.VerifyConnection = func(cs tls.ConnectionState) error {
		version.Store(uint32(cs.Version))
		return nil
	}
	client, err := d.dialLink(t, tc)
	if err != nil {
		t.Fatal(err)
	}
	server := d.link(t)
	exchange(t, serve(client), serve(server))
	if version.Load() != tls.VersionTLS13 {
		t.Errorf("TLS version %x, want 1.3", version.Load())
	}
	if id := relay.IdentityOf(server); id != "" {
		t.Errorf("identity %q without a client certificate", id)
	}
}

// TestTLS12Refused: a TLS 1.2-only client fails, counted in tls_failures.
func TestTLS12Refused(t *testing.T) {
	s := newTLSSetup(t)
	d := startDoor(t, frontdoor.Config{Certificate: s.source(), ServerNames: []string{serverName}})
	tc := s.client.Clone()
	tc.MaxVersion = tls.VersionTLS12
	if _, err := d.dialLink(t, tc); err == nil {
		t.Fatal("a TLS 1.2 client connected")
	}
	waitCount(t, "tls_failures", &d.counters.TLSFailures, 1)
	d.noLink(t)
}

// TestClientCertificates: with ClientCAs, a client without a certificate
// is refused, and one with a certificate the CA signed gets in, its
// subject the link's identity.
func TestClientCertificates(t *testing.T) {
	s := newTLSSetup(t)
	clientCA := newCA(t, "iketcp client CA")
	d := startDoor(t, frontdoor.Config{Certificate: s.source(), ServerNames: []string{serverName}, ClientCAs: clientCA.pool})

	// In TLS 1.3 the client's handshake ends before the server checks its
	// certificate: the dial may succeed; the server refuses it.
	if link, err := d.dialLink(t, s.client); err == nil {
		link.Close()
	}
	waitCount(t, "tls_failures", &d.counters.TLSFailures, 1)
	d.noLink(t)

	stranger := newCA(t, "someone else's CA").issue(t, 9, "mallory")
	tc := s.client.Clone()
	tc.Certificates = []tls.Certificate{stranger}
	if link, err := d.dialLink(t, tc); err == nil {
		link.Close()
	}
	waitCount(t, "tls_failures", &d.counters.TLSFailures, 2)
	d.noLink(t)

	cert := clientCA.issue(t, 3, "site-17")
	tc = s.client.Clone()
	tc.Certificates = []tls.Certificate{cert}
	client, err := d.dialLink(t, tc)
	if err != nil {
		t.Fatal(err)
	}
	server := d.link(t)
	if got, want := relay.IdentityOf(server), cert.Leaf.Subject.String(); got != want {
		t.Errorf("identity %q, want %q", got, want)
	}
	exchange(t, serve(client), serve(server))
}

// TestCertificateReload: after CertFile.Load, new connections see the new
// certificate while an established connection stays up; a failed reload
// keeps the certificate in use.
func TestCertificateReload(t *testing.T) {
	s := newTLSSetup(t)
	dir := t.TempDir()
	cf := &frontdoor.CertFile{CertPath: filepath.Join(dir, "cert.pem"), KeyPath: filepath.Join(dir, "key.pem")}
	if _, err := cf.GetCertificate(nil); err == nil {
		t.Fatal("a certificate before Load")
	}
	writePEM(t, s.server, cf.CertPath, cf.KeyPath)
	if err := cf.Load(); err != nil {
		t.Fatal(err)
	}
	d := startDoor(t, frontdoor.Config{Certificate: cf, ServerNames: []string{serverName}})

	// dial returns a link and the serial number of the certificate it saw.
	dial := func() (relay.Link, int64) {
		t.Helper()
		tc := s.client.Clone()
		var serial atomic.Int64
		tc.VerifyConnection = func(cs tls.ConnectionState) error {
			serial.Store(cs.PeerCertificates[0].SerialNumber.Int64())
			return nil
		}
		link, err := d.dialLink(t, tc)
		if err != nil {
			t.Fatal(err)
		}
		return link, serial.Load()
	}
	oldLink, serial := dial()
	if serial != 2 {
		t.Fatalf("first certificate: serial %d, want 2", serial)
	}
	oldClient, oldServer := serve(oldLink), serve(d.link(t))
	exchange(t, oldClient, oldServer)

	writePEM(t, s.ca.issue(t, 5, serverName, serverName), cf.CertPath, cf.KeyPath)
	if err := cf.Load(); err != nil {
		t.Fatal(err)
	}
	newClient, serial := dial()
	if serial != 5 {
		t.Fatalf("after the reload: serial %d, want 5", serial)
	}
	exchange(t, serve(newClient), serve(d.link(t)))
	exchange(t, oldClient, oldServer) // still up

	writePEM(t, s.ca.issue(t, 6, serverName, serverName), cf.CertPath, filepath.Join(dir, "other-key.pem"))
	if err := cf.Load(); err == nil {
		t.Fatal("a certificate with the wrong key loaded")
	}
	if _, serial := dial(); serial != 5 {
		t.Fatalf("after a failed reload: serial %d, want 5", serial)
	}
}

// proxyHeader returns a PROXY header of version (1 or 2) for a TCP
// connection from src to dst.
func proxyHeader(t *testing.T, version byte, src, dst string) []byte {
	t.Helper()
	h := proxyproto.HeaderProxyFromAddrs(version, net.TCPAddrFromAddrPort(netip.MustParseAddrPort(src)),
		net.TCPAddrFromAddrPort(netip.MustParseAddrPort(dst)))
	b, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sendFrame writes the IKETCP prefix (if prefix) and one frame to nc.
func sendIKETCP(t *testing.T, nc net.Conn, before []byte, payload []byte) {
	t.Helper()
	b := append(bytes.Clone(before), framing.Prefix...)
	b = framing.AppendFrame(b, payload)
	if _, err := nc.Write(b); err != nil {
		t.Fatal(err)
	}
}

// serveOne serves link until it receives one datagram, and returns it.
func serveOne(t *testing.T, link relay.Link) []byte {
	t.Helper()
	rx := &collector{got: make(chan []byte, 4)}
	go link.Serve(rx)
	select {
	case got := <-rx.got:
		return got
	case <-time.After(5 * time.Second):
		t.Fatal("no datagram")
		return nil
	}
}

// TestProxyProtocol: from a trusted source, a PROXY header (v1 or v2)
// names the client the link reports; the stream after it is intact.
func TestProxyProtocol(t *testing.T) {
	s := newTLSSetup(t)
	for _, tc := range []struct {
		name    string
		version byte
		src     string
		tls     bool
	}{
		{"v1", 1, "192.0.2.7:40000", false},
		{"v2", 2, "192.0.2.8:40001", false},
		{"v2-ipv6", 2, "[2001:db8::9]:40002", false},
		{"v1-tls", 1, "198.51.100.3:40003", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := "203.0.113.1:443"
			if strings.HasPrefix(tc.src, "[") {
				dst = "[2001:db8::1]:443"
			}
			d := startDoor(t, frontdoor.Config{ProxyFrom: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
				Certificate: s.source(), ServerNames: []string{serverName}})
			nc := d.dialRaw(t, nil)
			header := proxyHeader(t, tc.version, tc.src, dst)
			esp := relaytest.ESP(0xabc, 1, 64)
			if tc.tls {
				if _, err := nc.Write(header); err != nil {
					t.Fatal(err)
				}
				tlsc := tls.Client(nc, s.client)
				sendIKETCP(t, tlsc, nil, esp)
			} else {
				sendIKETCP(t, nc, header, esp)
			}
			link := d.link(t)
			if link.RemoteAddr() != tc.src {
				t.Errorf("RemoteAddr %s, want %s", link.RemoteAddr(), tc.src)
			}
			if got := serveOne(t, link); !bytes.Equal(got, esp) {
				t.Errorf("got %x, want %x", got, esp)
			}
		})
	}
}

// TestProxyLocal: a LOCAL header (a proxy's own health check) keeps the
// proxy's address.
func TestProxyLocal(t *testing.T) {
	d := startDoor(t, frontdoor.Config{ProxyFrom: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}})
	nc := d.dialRaw(t, nil)
	local := &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
	b, err := local.Format()
	if err != nil {
		t.Fatal(err)
	}
	sendIKETCP(t, nc, b, relaytest.ESP(1, 1, 10))
	if link := d.link(t); link.RemoteAddr() != nc.LocalAddr().String() {
		t.Errorf("RemoteAddr %s, want the proxy's %s", link.RemoteAddr(), nc.LocalAddr())
	}
}

// TestProxyRefused: a PROXY header from a source not in ProxyFrom is
// refused, and so is a trusted source's connection without one, or with
// a broken one; all count as proxy_refused.
func TestProxyRefused(t *testing.T) {
	t.Run("untrusted", func(t *testing.T) {
		d := startDoor(t, frontdoor.Config{ProxyFrom: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}})
		for i, version := range []byte{1, 2} {
			nc := d.dialRaw(t, nil)
			sendIKETCP(t, nc, proxyHeader(t, version, "192.0.2.7:40000", "203.0.113.1:443"), relaytest.ESP(1, 1, 10))
			closedByServer(t, nc)
			waitCount(t, "proxy_refused", &d.counters.ProxyRefused, uint64(i+1))
		}
		d.noLink(t)
	})
	t.Run("trusted-without", func(t *testing.T) {
		d := startDoor(t, frontdoor.Config{ProxyFrom: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
		nc := d.dialRaw(t, nil)
		sendIKETCP(t, nc, nil, relaytest.ESP(1, 1, 10))
		closedByServer(t, nc)
		waitCount(t, "proxy_refused", &d.counters.ProxyRefused, 1)
		d.noLink(t)
	})
	t.Run("trusted-broken", func(t *testing.T) {
		d := startDoor(t, frontdoor.Config{ProxyFrom: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
		for i, header := range []string{
			"PROXY TCP4 192.0.2.1 nonsense 1 2\r\n",
			"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", // no CR
			"PROXY " + strings.Repeat("A", 120) + "\r\n",
			framing.ProxyV2Signature + "\x21\x11\xff\xff",
		} {
			nc := d.dialRaw(t, nil)
			sendIKETCP(t, nc, []byte(header), relaytest.ESP(1, 1, 10))
			closedByServer(t, nc)
			waitCount(t, "proxy_refused", &d.counters.ProxyRefused, uint64(i+1))
		}
		d.noLink(t)
	})
	t.Run("second-header", func(t *testing.T) {
		d := startDoor(t, frontdoor.Config{ProxyFrom: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}})
		nc := d.dialRaw(t, nil)
		h := proxyHeader(t, 1, "192.0.2.7:40000", "203.0.113.1:443")
		sendIKETCP(t, nc, append(bytes.Clone(h), h...), relaytest.ESP(1, 1, 10))
		closedByServer(t, nc)
		waitCount(t, "proxy_refused", &d.counters.ProxyRefused, 1)
	})
}

// TestShareTLS: TLS for another name goes to the share backend, which an
// HTTP client reaches through the front door, its certificate and all;
// iketcp's TLS clients still get in on the same port.
func TestShareTLS(t *testing.T) {
	backend := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "the web site, for %s", r.Host)
	}))
	defer backend.Close()
	s := newTLSSetup(t)
	d := startDoor(t, frontdoor.Config{Certificate: s.source(), ServerNames: []string{serverName},
		ShareBackend: backend.Listener.Addr().String()})

	pool := x509.NewCertPool()
	pool.AddCert(backend.Certificate())
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool},
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var nd net.Dialer
			return nd.DialContext(ctx, network, d.addr)
		},
	}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("https://example.com/")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(body) != "the web site, for example.com" {
		t.Fatalf("body %q, %v", body, err)
	}
	if !resp.TLS.PeerCertificates[0].Equal(backend.Certificate()) {
		t.Error("the client did not see the backend's certificate")
	}
	waitCount(t, "shared_conns", &d.counters.SharedConns, 1)

	client, err := d.dialLink(t, s.client)
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, serve(client), serve(d.link(t)))
}

// TestShareHTTP: a plain HTTP request goes to the share backend.
func TestShareHTTP(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "admin page, %s %s", r.Method, r.URL.Path)
	}))
	defer backend.Close()
	d := startDoor(t, frontdoor.Config{ShareBackend: backend.Listener.Addr().String()})
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Post("http://"+d.addr+"/status", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(body) != "admin page, POST /status" {
		t.Fatalf("body %q, %v", body, err)
	}
	waitCount(t, "shared_conns", &d.counters.SharedConns, 1)

	// IKETCP in clear still gets in.
	client, err := d.dialLink(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, serve(client), serve(d.link(t)))
}

// TestShareHalfClose: a client that half-closes still gets the backend's
// answer, which the backend sends after it read everything.
func TestShareHalfClose(t *testing.T) {
	bl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer bl.Close()
	backendDone := make(chan error, 1)
	go func() {
		bc, err := bl.Accept()
		if err != nil {
			backendDone <- err
			return
		}
		defer bc.Close()
		got, err := io.ReadAll(bc) // until the client's half-close
		if err == nil {
			_, err = fmt.Fprintf(bc, "read %d bytes ending %q", len(got), got[len(got)-4:])
		}
		backendDone <- err
	}()
	d := startDoor(t, frontdoor.Config{ShareBackend: bl.Addr().String()})
	nc := d.dialRaw(t, nil)
	req := "PUT /upload HTTP/1.1\r\nHost: x\r\n\r\n" + strings.Repeat("z", 100000) + "done"
	if _, err := nc.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	if err := nc.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	answer, err := io.ReadAll(nc)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("read %d bytes ending \"done\"", len(req)); string(answer) != want {
		t.Fatalf("answer %q, want %q", answer, want)
	}
	if err := <-backendDone; err != nil {
		t.Fatal(err)
	}
}

// TestShareBound: over MaxShared, the newest connection to share is
// refused.
func TestShareBound(t *testing.T) {
	bl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer bl.Close()
	go func() {
		for {
			bc, err := bl.Accept()
			if err != nil {
				return
			}
			defer bc.Close() // held open until the test ends
		}
	}()
	d := startDoor(t, frontdoor.Config{ShareBackend: bl.Addr().String(), MaxShared: 2})
	for range 2 {
		nc := d.dialRaw(t, nil)
		nc.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
	}
	waitCount(t, "shared_conns", &d.counters.SharedConns, 2)
	nc := d.dialRaw(t, nil)
	nc.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
	closedByServer(t, nc)
	waitCount(t, "conns_rejected", &d.counters.ConnsRejected, 1)
}

// TestShareLinger: a client that keeps its side open after the backend
// finished is cut after a while, and its slot goes to the next.
func TestShareLinger(t *testing.T) {
	frontdoor.SetShareLinger(t, 200*time.Millisecond)
	bl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer bl.Close()
	go func() {
		for {
			bc, err := bl.Accept()
			if err != nil {
				return
			}
			bc.Read(make([]byte, 100)) // the request: closing with it unread would reset
			bc.Write([]byte("bye"))
			bc.Close()
		}
	}()
	d := startDoor(t, frontdoor.Config{ShareBackend: bl.Addr().String(), MaxShared: 1})
	// get sends a request and reads the answer, until the backend's end.
	get := func() string {
		nc := d.dialRaw(t, nil)
		nc.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
		nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, _ := io.ReadAll(nc)
		return string(got)
	}
	if got := get(); got != "bye" {
		t.Fatalf("got %q", got)
	}
	// The first client still holds the slot.
	if got := get(); got != "" {
		t.Fatalf("a second client over the bound got %q", got)
	}
	waitCount(t, "conns_rejected", &d.counters.ConnsRejected, 1)
	start := time.Now()
	waitFor(t, "the lingering client cut", func() bool { return get() == "bye" })
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("slot free after %v", took)
	}
}

// TestNotOursWithoutBackend: without a share backend, HTTP and TLS for
// another name are closed, counted as unrecognized.
func TestNotOursWithoutBackend(t *testing.T) {
	s := newTLSSetup(t)
	d := startDoor(t, frontdoor.Config{Certificate: s.source(), ServerNames: []string{serverName}})
	nc := d.dialRaw(t, nil)
	nc.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	closedByServer(t, nc)
	waitCount(t, "unrecognized", &d.counters.Unrecognized, 1)

	tc := s.client.Clone()
	tc.ServerName = "www.example.test"
	tc.InsecureSkipVerify = true
	if _, err := d.dialLink(t, tc); err == nil {
		t.Fatal("TLS for another name got a handshake")
	}
	waitCount(t, "unrecognized", &d.counters.Unrecognized, 2)
	if n := d.counters.TLSFailures.Load(); n != 0 {
		t.Errorf("tls_failures %d: TLS for another name is not ours to fail", n)
	}
	d.noLink(t)
}

// TestRequireTLS: with RequireTLS, IKETCP in clear is refused
// (clear_refused) and TLS gets in.
func TestRequireTLS(t *testing.T) {
	s := newTLSSetup(t)
	d := startDoor(t, frontdoor.Config{Certificate: s.source(), RequireTLS: true})
	if link, err := d.dialLink(t, nil); err == nil {
		link.Close()
	}
	waitCount(t, "clear_refused", &d.counters.ClearRefused, 1)
	d.noLink(t)
	// Without ServerNames and a share backend, every name is iketcp's.
	client, err := d.dialLink(t, s.client)
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, serve(client), serve(d.link(t)))
}

// TestGarbage: what is neither IKETCP, TLS nor HTTP is closed and counted;
// a connection that closes without a byte is not.
func TestGarbage(t *testing.T) {
	d := startDoor(t, frontdoor.Config{})
	for i, garbage := range []string{"SSH-2.0-OpenSSH_9.2\r\n", "\x00\x00\x00\x00\x00\x00", "\x16\x03\x01\x00\x00\x01", "IKETCX"} {
		nc := d.dialRaw(t, nil)
		nc.Write([]byte(garbage))
		if garbage == "IKETCX" {
			nc.CloseWrite() // undecided until the stream ends
		}
		closedByServer(t, nc)
		waitCount(t, "unrecognized", &d.counters.Unrecognized, uint64(i+1))
	}
	nc := d.dialRaw(t, nil)
	nc.CloseWrite()
	closedByServer(t, nc)
	time.Sleep(50 * time.Millisecond)
	if n := d.counters.Unrecognized.Load(); n != 4 {
		t.Errorf("unrecognized %d after a silent connection, want 4", n)
	}
	d.noLink(t)
}

// TestSlowLoris: connections that send too little, or trickle, are cut at
// the deadline (prefix_timeouts); the deadline runs from accept, so
// trickling does not extend it.
func TestSlowLoris(t *testing.T) {
	const timeout = 300 * time.Millisecond
	d := startDoor(t, frontdoor.Config{SniffTimeout: timeout})
	stalled := d.dialRaw(t, nil)
	stalled.Write([]byte("IKE"))
	trickler := d.dialRaw(t, nil)
	stop := make(chan struct{})
	trickled := make(chan struct{})
	go func() {
		defer close(trickled)
		for _, c := range []byte("GET /a/very/long/path/indeed HTTP/1.1\r\n") {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if _, err := trickler.Write([]byte{c}); err != nil {
				return
			}
		}
	}()
	defer func() { close(stop); <-trickled }()
	start := time.Now()
	closedByServer(t, stalled)
	closedByServer(t, trickler)
	if took := time.Since(start); took < timeout/2 || took > 3*time.Second {
		t.Errorf("closed after %v, deadline %v", took, timeout)
	}
	waitCount(t, "prefix_timeouts", &d.counters.PrefixTimeouts, 2)
}

// TestIdleSourceDoesNotKeepOthersOut: a stranger's idle connections fill
// only its own source's share of the pending bound: the newest over it are
// refused, and a client from another source still gets in.
func TestIdleSourceDoesNotKeepOthersOut(t *testing.T) {
	d := startDoor(t, frontdoor.Config{MaxPendingPerSource: 4, MaxPending: 8})
	stranger := net.IPv4(127, 0, 0, 2)
	var idle []*net.TCPConn
	for range 10 {
		idle = append(idle, d.dialRaw(t, stranger))
	}
	waitCount(t, "conns_rejected", &d.counters.ConnsRejected, 6)
	for _, nc := range idle[4:] {
		closedByServer(t, nc)
	}
	client, err := d.dialLink(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, serve(client), serve(d.link(t)))
}

// TestPendingBound: over MaxPending, the newest connection is refused;
// when a slot frees, clients get in again.
func TestPendingBound(t *testing.T) {
	d := startDoor(t, frontdoor.Config{MaxPending: 3})
	var idle []*net.TCPConn
	for _, last := range []byte{2, 3, 4} {
		idle = append(idle, d.dialRaw(t, net.IPv4(127, 0, 0, last)))
	}
	time.Sleep(50 * time.Millisecond) // all three accepted
	late := d.dialRaw(t, net.IPv4(127, 0, 0, 5))
	closedByServer(t, late)
	waitCount(t, "conns_rejected", &d.counters.ConnsRejected, 1)
	idle[0].Close()
	waitFor(t, "a free slot", func() bool {
		client, err := d.dialLink(t, nil)
		if err != nil {
			return false
		}
		select {
		case server := <-d.links:
			defer server.Close()
			exchange(t, serve(client), serve(server))
			return true
		case <-time.After(200 * time.Millisecond):
			return false
		}
	})
}

// TestCloseEndsEverything: Close ends connections being looked at,
// waiting for Accept and spliced, and Accept then returns net.ErrClosed.
// (TestMain's goleak checks that no goroutine is left.)
func TestCloseEndsEverything(t *testing.T) {
	bl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer bl.Close()
	backendConns := make(chan net.Conn, 1)
	go func() {
		bc, err := bl.Accept()
		if err == nil {
			backendConns <- bc
		}
	}()
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var counters relay.Counters
	fd := frontdoor.Listen(nl, frontdoor.Config{ShareBackend: bl.Addr().String(), Counters: &counters, Logger: testLogger(t)})
	dial := func(first string) net.Conn {
		nc, err := net.Dial("tcp", nl.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		nc.Write([]byte(first))
		return nc
	}
	looked := dial("IKE")
	waiting := dial("IKETCP")
	shared := dial("GET / HTTP/1.1\r\n\r\n")
	waitCount(t, "shared_conns", &counters.SharedConns, 1)
	bc := <-backendConns
	defer bc.Close()
	time.Sleep(50 * time.Millisecond) // the IKETCP client waits for Accept

	start := time.Now()
	if err := fd.Close(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("Close took %v", took)
	}
	for _, nc := range []net.Conn{looked, waiting, shared} {
		closedByServer(t, nc)
	}
	if _, err := fd.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
	}
	if err := fd.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestInnerClosed: when the inner listener is closed by someone else,
// Accept returns an error matching net.ErrClosed.
func TestInnerClosed(t *testing.T) {
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fd := frontdoor.Listen(nl, frontdoor.Config{Logger: testLogger(t)})
	defer fd.Close()
	nl.Close()
	if _, err := fd.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept: %v, want net.ErrClosed", err)
	}
}
