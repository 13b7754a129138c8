package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// pingsDuring pings across the tunnel, count pings interval apart, while
// fn runs, and fails the test unless every ping came back.
func pingsDuring(t *testing.T, ctx context.Context, tun *lab.Tunnel, count int, interval time.Duration, fn func()) {
	t.Helper()
	type result struct {
		n   int
		err error
	}
	pinged := make(chan result, 1)
	go func() {
		n, err := tun.PingThrough(ctx, count, interval)
		pinged <- result{n, err}
	}()
	fn()
	p := <-pinged
	if p.err != nil || p.n != count {
		t.Fatalf("pings through the tunnel meanwhile: %d of %d (%v)", p.n, count, p.err)
	}
	t.Logf("pings through the tunnel meanwhile: %d of %d", p.n, count)
}

// haproxySource is the address HAProxy connects to the server from: one
// of the hub's own, apart from the server's, so that
// --proxy-protocol-from trusts HAProxy and no one else.
const haproxySource = "203.0.113.10"

// TestPROXYv2FromHAProxy puts Debian's HAProxy in front of the server at
// the hub: HAProxy takes the public port 4500 and passes each connection
// on, with a PROXY v2 header (send-proxy-v2), from its own address, to
// the server on port 4501, which trusts that address alone. The tunnel
// comes up through HAProxy, and the server's status and logs show the
// client's carrier address and port, which HAProxy's log shows too, never
// HAProxy's. The same kind of header sent straight to the server from the
// carrier is refused and counted (proxy_refused), and makes no session.
func TestPROXYv2FromHAProxy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Hub.Run(ctx, "ip", "addr", "add", haproxySource+"/32", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	public := net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort))
	behind := net.JoinHostPort(lab.HubOuter, "4501")
	haproxy, err := l.Hub.StartHAProxy(ctx, lab.HAProxyOptions{Listen: public, Server: behind, Source: haproxySource})
	if err != nil {
		t.Fatal(err)
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:       iketcpBinary,
		ServerListen: []string{behind},
		ServerArgs:   []string{"--proxy-protocol-from", haproxySource + "/32"},
		Peer:         public,
	})
	if err != nil {
		t.Fatal(err)
	}
	sa := initiateAndPing(t, ctx, tun, 5)

	// Who is who: the client's connection to HAProxy, and HAProxy's to
	// the server.
	front, err := l.Hub.EstablishedTCP(ctx, lab.ServerPort)
	if err != nil {
		t.Fatal(err)
	}
	back, err := l.Hub.EstablishedTCP(ctx, 4501)
	if err != nil {
		t.Fatal(err)
	}
	front = onlyLocal(front, public)
	back = onlyLocal(back, behind)
	if len(front) != 1 || len(back) != 1 || front[0].Remote.Addr().String() != lab.CarrierHub || back[0].Remote.Addr().String() != haproxySource {
		t.Fatalf("connections at the hub: to HAProxy %v, to the server %v; want one from %s and one from %s", front, back, lab.CarrierHub, haproxySource)
	}
	client, proxy := front[0].Remote.String(), back[0].Remote.String()
	t.Logf("the client %s reached HAProxy at %s; HAProxy reached the server from %s", client, public, proxy)

	s := serverSession(t, ctx, tun)
	if s.Peer != client || !hasIKESA(s, sa.InitiatorSPI) {
		t.Fatalf("the server's session is from %s, want the client %s (HAProxy is %s): %+v", s.Peer, client, proxy, s)
	}
	text, err := tun.StatusText(ctx, l.Hub, tun.ServerControl)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text, "addr: "+client+" -> ") || strings.Contains(text, haproxySource) {
		t.Fatalf("iketcp status at the hub does not show the client %s as the session's address, or shows HAProxy's %s:\n%s", client, haproxySource, text)
	}
	for _, want := range []string{"connection accepted", "session created"} {
		line, err := tun.Server.WaitLog(ctx, want, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(line, "remote="+client) {
			t.Errorf("the server logged %q without the client's address %s: %s", want, client, line)
		}
		t.Logf("server: %s", line)
	}
	if line := firstLine(tun.Server.Log(), "remote="+haproxySource); line != "" {
		t.Errorf("the server's log names HAProxy's address %s as a remote: %s", haproxySource, line)
	}
	if line, err := haproxy.WaitLog(ctx, client, time.Second); err != nil {
		t.Error(err)
	} else {
		t.Logf("HAProxy: %s", line)
	}

	// A PROXY header from anyone but HAProxy is refused.
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	refusedBefore := counter(t, st, "proxy_refused")
	spoofed := netip.MustParseAddrPort("198.51.100.77:40000")
	header, err := lab.ProxyV2Header(spoofed, netip.MustParseAddrPort(public))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := l.Carrier.Dial(ctx, "tcp", behind)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream := append(header, lab.RFC9329Prefix...)
	stream = lab.AppendFrame(stream, lab.IKESAInitDatagram(0x1122334455667788))
	if _, err := conn.Write(stream); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, rerr := conn.Read(make([]byte, 64))
	if n != 0 || !(errors.Is(rerr, io.EOF) || errors.Is(rerr, net.ErrClosed) || isReset(rerr)) {
		t.Fatalf("the server answered a PROXY header from the carrier %s with %d bytes (%v), want the connection closed", conn.LocalAddr(), n, rerr)
	}
	var refused uint64
	waitFor(t, "proxy_refused to count the carrier's header", func() bool {
		st, err = tun.ServerStatus(ctx)
		if err == nil {
			refused = counter(t, st, "proxy_refused")
		}
		return refused == refusedBefore+1
	})
	if len(st.Sessions) != 1 || strings.Contains(st.Sessions[0].Peer, spoofed.Addr().String()) {
		t.Fatalf("sessions after the spoofed header: %+v", st.Sessions)
	}
	line, err := tun.Server.WaitLog(ctx, "PROXY protocol refused", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(line, "remote="+lab.CarrierHub+":") {
		t.Errorf("the refusal does not name the carrier %s: %s", lab.CarrierHub, line)
	}
	t.Logf("a PROXY v2 header for %s sent from the carrier %s: connection closed (%v), proxy_refused %d -> %d; server: %s",
		spoofed, conn.LocalAddr(), rerr, refusedBefore, refused, line)
	if got, err := tun.PingThrough(ctx, 3, 100*time.Millisecond); err != nil || got != 3 {
		t.Fatalf("ping after the refusal: %d of 3 (%v)", got, err)
	}
}

// onlyLocal keeps the connections whose local end is addr.
func onlyLocal(conns []lab.TCPConn, addr string) []lab.TCPConn {
	var mine []lab.TCPConn
	for _, c := range conns {
		if c.Local.String() == addr {
			mine = append(mine, c)
		}
	}
	return mine
}

// isReset reports whether err is a connection reset.
func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset by peer")
}

// webName is the name of the web site that shares the server's port.
const webName = "www.iketcp.test"

// TestShareWithNginx shares the server's port 443 with Debian's nginx,
// which serves HTTPS with a certificate of its own from another CA: the
// server terminates TLS for vpnName (and iketcp's ALPN) and splices
// everything else to nginx. While pings cross the tunnel through 443,
// curl from the site fetches nginx's page through the same port and sees
// nginx's certificate, and a plain HTTP request reaches nginx too.
func TestShareWithNginx(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	pki := newServerPKI(t, l)
	webCA, err := lab.NewCA("iketcp lab web CA")
	if err != nil {
		t.Fatal(err)
	}
	webCert, err := webCA.Server(webName)
	if err != nil {
		t.Fatal(err)
	}
	webCAFile, webCertFile, webKeyFile := filepath.Join(l.Dir, "web-ca.pem"), filepath.Join(l.Dir, "web.pem"), filepath.Join(l.Dir, "web.key")
	if err := webCA.WriteCA(webCAFile); err != nil {
		t.Fatal(err)
	}
	if err := webCert.Write(webCertFile, webKeyFile); err != nil {
		t.Fatal(err)
	}
	token := make([]byte, 8)
	rand.Read(token)
	page := "nginx behind iketcp " + hex.EncodeToString(token) + "\n"
	nginx, err := l.Hub.StartNginx(ctx, lab.NginxOptions{Listen: "127.0.0.1:8443", CertFile: webCertFile, KeyFile: webKeyFile, Index: page})
	if err != nil {
		t.Fatal(err)
	}
	shared := net.JoinHostPort(lab.HubOuter, "443")
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:       iketcpBinary,
		ServerListen: []string{shared},
		ServerArgs:   append(pki.serverArgs(), "--tls-server-name", vpnName, "--share-backend", nginx.Listen),
		Peer:         shared,
		ClientArgs:   pki.clientArgs(),
	})
	if err != nil {
		t.Fatal(err)
	}
	sa := initiateAndPing(t, ctx, tun, 3)

	var body, verbose, plain string
	pingsDuring(t, ctx, tun, 20, 100*time.Millisecond, func() {
		time.Sleep(300 * time.Millisecond)
		var err error
		body, verbose, err = curl(ctx, l.Site, "-v", "--cacert", webCAFile, "--resolve", webName+":443:"+lab.HubOuter, "https://"+webName+"/")
		if err != nil {
			t.Errorf("curl https://%s/ through %s: %v\n%s", webName, shared, err, verbose)
		}
		plain, _, err = curl(ctx, l.Site, "http://"+shared+"/")
		if err != nil {
			t.Errorf("curl http://%s/: %v", shared, err)
		}
	})
	if body != page {
		t.Errorf("curl fetched %q through %s, want nginx's page %q", body, shared, page)
	}
	// The certificate curl checked is nginx's, from the web CA.
	for _, want := range []string{"subject: O=iketcp lab; CN=" + webName, "issuer: O=iketcp lab; CN=iketcp lab web CA", "SSL certificate verify ok"} {
		if !strings.Contains(verbose, want) {
			t.Errorf("curl -v lacks %q:\n%s", want, verbose)
		}
	}
	if !strings.Contains(plain, "The plain HTTP request was sent to HTTPS port") || !strings.Contains(plain, "nginx") {
		t.Errorf("plain HTTP to %s did not reach nginx: %q", shared, plain)
	}
	t.Logf("curl https://%s/ through %s: %q, %s, %s; plain HTTP: nginx's %s", webName, shared, body,
		firstLine(verbose, "subject:"), firstLine(verbose, "issuer:"), firstLine(plain, "<title>"))

	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := counter(t, st, "shared_conns"); n != 2 {
		t.Errorf("shared_conns = %d after curl's two connections for nginx", n)
	}
	if s := serverSession(t, ctx, tun); s.Connections != 1 || !hasIKESA(s, sa.InitiatorSPI) || s.State != "up" {
		t.Errorf("the tunnel's session: %+v", s)
	}
	var access string
	waitFor(t, "nginx to log the request", func() bool {
		b, _ := os.ReadFile(nginx.File("access.log"))
		access = firstLine(string(b), `"GET / HTTP/1.1" 200`)
		return access != ""
	})
	t.Logf("nginx: %s", access)
	t.Logf("shared_conns = %d; the tunnel kept its one connection", counter(t, st, "shared_conns"))
}

// curl runs curl in ns with args (and -sS, a 10 s limit), and returns its
// output and its diagnostics apart.
func curl(ctx context.Context, ns *lab.Namespace, args ...string) (stdout, stderr string, err error) {
	cmd := ns.Command(ctx, "curl", append([]string{"-sS", "--max-time", "10"}, args...)...)
	var out, diag bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &diag
	err = cmd.Run()
	return out.String(), diag.String(), err
}

// firstLine returns the first line of s that contains substr, trimmed.
func firstLine(s, substr string) string {
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, substr) {
			return strings.TrimSpace(line)
		}
	}
	return ""
}

// proxyPort is where tinyproxy listens at the carrier.
const proxyPort = 8888

// TestHTTPProxy runs Debian's tinyproxy at the carrier, which drops every
// forwarded TCP segment toward the hub's port: the site cannot reach the
// server but through the proxy. The client reaches it with CONNECT and
// Basic credentials, in clear and with TLS, and the tunnel comes up. The
// captures show the CONNECT request on the site's side of the carrier and
// the RFC 9329 stream (or TLS) on the hub's.
func TestHTTPProxy(t *testing.T) {
	for _, withTLS := range []bool{false, true} {
		name := map[bool]string{false: "clear", true: "tls"}[withTLS]
		t.Run(name, func(t *testing.T) { testHTTPProxy(t, withTLS) })
	}
}

func testHTTPProxy(t *testing.T, withTLS bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.BlockTCPToHub(ctx, lab.ServerPort); err != nil {
		t.Fatal(err)
	}
	const user, password = "lab", "not-a-secret"
	proxyAddr := net.JoinHostPort(lab.CarrierSite, strconv.Itoa(proxyPort))
	proxy, err := l.Carrier.StartTinyproxy(ctx, lab.TinyproxyOptions{Listen: proxyAddr, ConnectPorts: []int{lab.ServerPort}, User: user, Password: password})
	if err != nil {
		t.Fatal(err)
	}
	server := net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort))

	// The carrier does block the direct way.
	dialCtx, dialCancel := context.WithTimeout(ctx, time.Second)
	if c, err := l.Site.Dial(dialCtx, "tcp", server); err == nil {
		c.Close()
		dialCancel()
		t.Fatalf("the site reached %s directly: the carrier does not block it", server)
	}
	dialCancel()
	dropped, err := l.TCPDropped(ctx)
	if err != nil || dropped == 0 {
		t.Fatalf("the carrier dropped %d TCP packets of the direct attempt (%v)", dropped, err)
	}

	siteSide, err := l.Carrier.Capture(ctx, lab.CarrierSiteIface, "tcp port "+strconv.Itoa(proxyPort), "")
	if err != nil {
		t.Fatal(err)
	}
	hubSide, err := l.Carrier.Capture(ctx, lab.CarrierHubIface, "tcp port "+strconv.Itoa(lab.ServerPort), "")
	if err != nil {
		t.Fatal(err)
	}
	clientArgs := []string{"--http-proxy", "http://" + user + ":" + password + "@" + proxyAddr}
	var serverArgs []string
	if withTLS {
		pki := newServerPKI(t, l)
		clientArgs = append(clientArgs, pki.clientArgs()...)
		serverArgs = append(pki.serverArgs(), "--tls-required")
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary, ServerArgs: serverArgs, ClientArgs: clientArgs})
	if err != nil {
		t.Fatal(err)
	}
	sa := initiateAndPing(t, ctx, tun, 5)

	// The site's only connection is to the proxy; the hub's is from the
	// proxy, which is the carrier itself.
	site, err := l.Site.EstablishedTCP(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(site) != 1 || site[0].Remote.String() != proxyAddr {
		t.Fatalf("the site's TCP connections: %v, want one to the proxy %s", site, proxyAddr)
	}
	if s := serverSession(t, ctx, tun); !strings.HasPrefix(s.Peer, lab.CarrierHub+":") || !hasIKESA(s, sa.InitiatorSPI) || s.State != "up" {
		t.Fatalf("server session: %+v", s)
	}
	if now, err := l.TCPDropped(ctx); err != nil || now != dropped {
		t.Errorf("the carrier dropped %d more TCP packets toward the hub during the tunnel (%v): the client went around the proxy", now-dropped, err)
	}
	if line, err := proxy.WaitLog(ctx, "CONNECT "+server, time.Second); err != nil {
		t.Error(err)
	} else {
		t.Logf("tinyproxy: %s", line)
	}

	for _, c := range []*lab.Capture{siteSide, hubSide} {
		if err := c.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	toProxy := oneStream(t, siteSide.Path, proxyPort)
	request, tunnelled, found := bytes.Cut(toProxy.FromClient, []byte("\r\n\r\n"))
	if !found || !bytes.HasPrefix(request, []byte("CONNECT "+server+" HTTP/1.1\r\n")) || !bytes.Contains(request, []byte("\r\nProxy-Authorization: Basic ")) {
		t.Fatalf("the site's stream to the proxy does not begin with an authorized CONNECT to %s: %q", server, toProxy.FromClient[:min(len(toProxy.FromClient), 200)])
	}
	if !bytes.HasPrefix(toProxy.FromServer, []byte("HTTP/1.")) || !bytes.Contains(toProxy.FromServer[:min(len(toProxy.FromServer), 20)], []byte(" 200 ")) {
		t.Fatalf("the proxy's answer: %q", toProxy.FromServer[:min(len(toProxy.FromServer), 100)])
	}
	toHub := oneStream(t, hubSide.Path, lab.ServerPort)
	if !bytes.HasPrefix(tunnelled, toHub.FromClient[:min(len(toHub.FromClient), 64)]) {
		t.Errorf("what followed CONNECT is not what the proxy sent on to the hub")
	}
	if withTLS {
		recs, err := lab.SplitTLSRecords(toHub.FromClient)
		if err != nil || len(recs) == 0 {
			t.Fatalf("the stream toward the hub is not TLS: %v", err)
		}
		hello, err := lab.ParseClientHello(recs[0])
		if err != nil || hello.ServerName != vpnName {
			t.Fatalf("the stream toward the hub begins with no ClientHello for %s: %+v %v", vpnName, hello, err)
		}
		if bytes.Contains(toProxy.FromClient, []byte(lab.RFC9329Prefix)) || bytes.Contains(toHub.FromClient, []byte(lab.RFC9329Prefix)) {
			t.Errorf("the cleartext %q crossed the carrier with --tls", lab.RFC9329Prefix)
		}
	} else if !bytes.HasPrefix(toHub.FromClient, []byte(lab.RFC9329Prefix)) {
		t.Fatalf("the stream toward the hub begins with %q, want %q", toHub.FromClient[:min(len(toHub.FromClient), 8)], lab.RFC9329Prefix)
	}
	t.Logf("site -> proxy: %q, then %d bytes; proxy %s -> hub %s: %d bytes beginning %x",
		firstLine(string(request), "CONNECT"), len(tunnelled), toHub.Client, toHub.Server, len(toHub.FromClient), toHub.FromClient[:min(len(toHub.FromClient), 8)])
}

// oneStream returns the one TCP connection to port in a capture.
func oneStream(t *testing.T, pcap string, port uint16) lab.TCPStream {
	t.Helper()
	streams, err := lab.TCPStreams(pcap, port)
	if err != nil {
		t.Fatal(err)
	}
	if len(streams) != 1 {
		t.Fatalf("%s: %d connections to port %d, want 1", pcap, len(streams), port)
	}
	return streams[0]
}
