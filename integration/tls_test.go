package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/dial"
)

// vpnName is the server's TLS name in these tests.
const vpnName = "vpn.iketcp.test"

// serverPKI is a test's TLS material for the server, in files in the lab
// directory: a CA, and a certificate for vpnName that it signed.
type serverPKI struct {
	ca                *lab.CA
	cert              *lab.Certificate
	caFile            string
	certFile, keyFile string
}

func newServerPKI(t *testing.T, l *lab.Lab) *serverPKI {
	t.Helper()
	ca, err := lab.NewCA("iketcp lab CA")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Server(vpnName)
	if err != nil {
		t.Fatal(err)
	}
	p := &serverPKI{
		ca: ca, cert: cert,
		caFile:   filepath.Join(l.Dir, "ca.pem"),
		certFile: filepath.Join(l.Dir, "server.pem"),
		keyFile:  filepath.Join(l.Dir, "server.key"),
	}
	if err := ca.WriteCA(p.caFile); err != nil {
		t.Fatal(err)
	}
	if err := cert.Write(p.certFile, p.keyFile); err != nil {
		t.Fatal(err)
	}
	return p
}

// serverArgs are the server's TLS flags.
func (p *serverPKI) serverArgs() []string {
	return []string{"--tls-cert", p.certFile, "--tls-key", p.keyFile}
}

// clientArgs are the flags of a client that checks the server by the CA
// and the name.
func (p *serverPKI) clientArgs() []string {
	return []string{"--tls", "--tls-server-name", vpnName, "--tls-ca", p.caFile}
}

// pinOf is --tls-pin for a certificate's key.
func pinOf(t *testing.T, c *lab.Certificate) string {
	t.Helper()
	pin, err := dial.PinOf(c.CertPEM)
	if err != nil {
		t.Fatal(err)
	}
	return pin
}

// extraClientPort is the first UDP port of the clients a test starts
// beside the tunnel's (which has lab.ClientListenPort).
const extraClientPort = lab.ClientListenPort + 1

// startNudgedClient starts another `iketcp client` at the site, in
// explicit mode on 127.0.0.1:port, toward peer, with args, and sends it a
// datagram like a daemon's first IKE_SA_INIT so that it dials the server.
func startNudgedClient(t *testing.T, ctx context.Context, l *lab.Lab, name string, port int, peer string, args ...string) *lab.Iketcp {
	t.Helper()
	c, err := l.StartIketcp(ctx, l.Site, iketcpBinary, name, append([]string{"client",
		"--listen", "127.0.0.1:" + strconv.Itoa(port), "--peer", peer}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	nudge(t, ctx, l, port)
	return c
}

// nudge sends the client on 127.0.0.1:port at the site an IKE_SA_INIT
// request header, as a daemon's first datagram begins.
func nudge(t *testing.T, ctx context.Context, l *lab.Lab, port int) {
	t.Helper()
	var spi [8]byte
	rand.Read(spi[:])
	conn, err := l.Site.Dial(ctx, "udp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write(lab.IKESAInitDatagram(binary.BigEndian.Uint64(spi[:]))); err != nil {
		t.Fatal(err)
	}
}

// waitCounter polls the instance's status until the counter reaches at
// least want, and returns its value.
func waitCounter(t *testing.T, ctx context.Context, inst statuser, name string, want uint64) uint64 {
	t.Helper()
	var got uint64
	waitFor(t, fmt.Sprintf("counter %s to reach %d", name, want), func() bool {
		st, err := inst.Status(ctx)
		if err != nil {
			return false
		}
		got = counter(t, st, name)
		return got >= want
	})
	return got
}

// TestTLSTunnel brings the tunnel up through TLS 1.3, with the server
// requiring TLS and the client checking its certificate by CA and name.
// The carrier's capture shows a TLS 1.3 handshake for vpnName with ALPN
// iketcp, then only application data, and never the cleartext IKETCP.
// A client in clear is refused and counted.
func TestTLSTunnel(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	pki := newServerPKI(t, l)
	capture, err := l.Carrier.Capture(ctx, lab.CarrierHubIface, "tcp port 4500", "")
	if err != nil {
		t.Fatal(err)
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:     iketcpBinary,
		ServerArgs: append(pki.serverArgs(), "--tls-required"),
		ClientArgs: pki.clientArgs(),
	})
	if err != nil {
		t.Fatal(err)
	}
	sa := initiateAndPing(t, ctx, tun, 5)
	if s := serverSession(t, ctx, tun); s.State != "up" || !hasIKESA(s, sa.InitiatorSPI) || s.PacketsIn < 5 {
		t.Fatalf("server session: %+v", s)
	}
	if err := capture.Stop(); err != nil {
		t.Fatal(err)
	}

	streams, err := lab.TCPStreams(capture.Path, lab.ServerPort)
	if err != nil {
		t.Fatal(err)
	}
	if len(streams) != 1 {
		t.Fatalf("the carrier saw %d connections to the server, want 1", len(streams))
	}
	s := streams[0]
	for dir, b := range map[string][]byte{"client": s.FromClient, "server": s.FromServer} {
		if bytes.Contains(b, []byte(lab.RFC9329Prefix)) {
			t.Errorf("the %s's %d bytes on the carrier hold the cleartext %q", dir, len(b), lab.RFC9329Prefix)
		}
	}
	fromClient, err := lab.SplitTLSRecords(s.FromClient)
	if err != nil {
		t.Fatalf("the client's stream on the carrier is not TLS: %v", err)
	}
	fromServer, err := lab.SplitTLSRecords(s.FromServer)
	if err != nil {
		t.Fatalf("the server's stream on the carrier is not TLS: %v", err)
	}
	if len(fromClient) < 2 || len(fromServer) < 2 {
		t.Fatalf("the carrier saw %d TLS records from the client and %d from the server", len(fromClient), len(fromServer))
	}
	hello, err := lab.ParseClientHello(fromClient[0])
	if err != nil {
		t.Fatalf("the client's first record: %v", err)
	}
	version, err := lab.ServerHelloVersion(fromServer[0])
	if err != nil {
		t.Fatalf("the server's first record: %v", err)
	}
	if hello.ServerName != vpnName || !slices.Contains(hello.ALPN, "iketcp") || !slices.Contains(hello.Versions, lab.TLSVersion13) {
		t.Errorf("ClientHello on the carrier: %+v, want server name %s, ALPN iketcp, TLS 1.3 offered", hello, vpnName)
	}
	if version != lab.TLSVersion13 {
		t.Errorf("the ServerHello chose version %#04x, want TLS 1.3 (%#04x)", version, lab.TLSVersion13)
	}
	appData := 0
	for dir, recs := range map[string][]lab.TLSRecord{"client": fromClient[1:], "server": fromServer[1:]} {
		for i, r := range recs {
			switch r.Type {
			case lab.TLSRecordApplicationData:
				appData++
			case lab.TLSRecordChangeCipherSpec: // TLS 1.3's middlebox compatibility
			default:
				t.Errorf("the %s's record %d after its hello is of type %d: only application data may follow", dir, i+1, r.Type)
			}
		}
	}
	t.Logf("the carrier saw %s -> %s: ClientHello for %q, ALPN %v; ServerHello TLS %#04x; then %d application data records (%d bytes from the client, %d from the server), no %q",
		s.Client, s.Server, hello.ServerName, hello.ALPN, version, appData, len(s.FromClient), len(s.FromServer), lab.RFC9329Prefix)
	// Five pings and IKE_AUTH each way cannot fit in fewer records.
	if appData < 12 {
		t.Errorf("only %d application data records on the carrier", appData)
	}

	// The server requires TLS: a client in clear is refused.
	st, err := tun.ServerStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := counter(t, st, "tls_failures"); n != 0 {
		t.Errorf("tls_failures = %d with one good client", n)
	}
	clear := startNudgedClient(t, ctx, l, "clear", extraClientPort, net.JoinHostPort(lab.HubOuter, "4500"))
	var refused uint64
	waitFor(t, "the server to refuse the client in clear", func() bool {
		st, err := tun.ServerStatus(ctx)
		if err == nil {
			refused = counter(t, st, "clear_refused")
		}
		return refused >= 1
	})
	line, err := tun.Server.WaitLog(ctx, "RFC 9329 client in clear refused", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("a client in clear: clear_refused = %d; the server logged: %s", refused, line)
	if err := clear.Stop(); err != nil {
		t.Fatal(err)
	}
}

// TestTLSServerChecks runs clients whose check of the server's
// certificate fails, one way each: a CA that did not sign it, a name it
// is not for, a pin of another key. Each fails with its own message, and
// the server counts the failed handshakes. A client pinned to the
// server's real key connects, so the failures are the checks' own.
func TestTLSServerChecks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	pki := newServerPKI(t, l)
	otherCA, err := lab.NewCA("another CA")
	if err != nil {
		t.Fatal(err)
	}
	otherCAFile := filepath.Join(l.Dir, "other-ca.pem")
	if err := otherCA.WriteCA(otherCAFile); err != nil {
		t.Fatal(err)
	}
	impostor, err := otherCA.Server(vpnName)
	if err != nil {
		t.Fatal(err)
	}
	listen := net.JoinHostPort(lab.HubOuter, "4500")
	server, err := l.StartIketcp(ctx, l.Hub, iketcpBinary, "server", append([]string{"server", "--listen", listen}, pki.serverArgs()...)...)
	if err != nil {
		t.Fatal(err)
	}
	realPin, wrongPin := pinOf(t, pki.cert), pinOf(t, impostor)
	cases := []struct {
		name string
		args []string
		want string // in the client's log
	}{
		{"wrong CA", []string{"--tls-server-name", vpnName, "--tls-ca", otherCAFile},
			"the server's certificate is not signed by a CA in --tls-ca (" + otherCAFile + ")"},
		{"wrong name", []string{"--tls-server-name", "wrong.iketcp.test", "--tls-ca", pki.caFile},
			"the server's certificate is for " + vpnName + ", not wrong.iketcp.test: check --tls-server-name"},
		{"wrong pin", []string{"--tls-pin", wrongPin},
			"the server's certificate key hashes to " + realPin + ", but --tls-pin is " + wrongPin},
	}
	for i, c := range cases {
		client := startNudgedClient(t, ctx, l, strings.ReplaceAll(c.name, " ", "-"), extraClientPort+i, listen, append([]string{"--tls"}, c.args...)...)
		line, err := client.WaitLog(ctx, c.want, 10*time.Second)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if !strings.Contains(line, "cannot connect to the iketcp server") {
			t.Errorf("%s: the message is not on a failed connection: %s", c.name, line)
		}
		for _, other := range cases {
			if other.name != c.name && strings.Contains(client.Log(), other.want) {
				t.Errorf("%s: the client also logged the message of %s: %s", c.name, other.name, other.want)
			}
		}
		t.Logf("%s: %s", c.name, line)
		if err := client.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	failures := waitCounter(t, ctx, server, "tls_failures", uint64(len(cases)))

	// The control: pinned to the server's real key, a client connects.
	good := startNudgedClient(t, ctx, l, "right-pin", extraClientPort+len(cases), listen, "--tls", "--tls-pin", realPin)
	waitFor(t, "the client pinned to the server's key to connect", func() bool {
		st, err := good.Status(ctx)
		return err == nil && len(st.Sessions) == 1 && len(st.Sessions[0].Links) == 1 && st.Sessions[0].Links[0].State == "up"
	})
	st, err := server.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Sessions) != 1 || !strings.HasPrefix(st.Sessions[0].Peer, lab.CarrierHub+":") {
		t.Fatalf("server sessions after the pinned client's IKE_SA_INIT: %+v", st.Sessions)
	}
	if n := counter(t, st, "tls_failures"); n != failures {
		t.Errorf("tls_failures went from %d to %d with the right pin", failures, n)
	}
	t.Logf("tls_failures = %d after the three failed checks; the client pinned to %s connected and its IKE_SA_INIT made session %d (%s)",
		failures, realPin, st.Sessions[0].ID, st.Sessions[0].State)
}

// TestTLSClientCertificates runs the server with --tls-client-ca: a
// client without a certificate, or with one from another CA, is refused
// and counted; the tunnel's client, with a certificate from the client
// CA, brings the tunnel up, and the server logs its identity.
func TestTLSClientCertificates(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	pki := newServerPKI(t, l)
	clientCA, err := lab.NewCA("iketcp lab client CA")
	if err != nil {
		t.Fatal(err)
	}
	clientCAFile := filepath.Join(l.Dir, "client-ca.pem")
	if err := clientCA.WriteCA(clientCAFile); err != nil {
		t.Fatal(err)
	}
	const siteID = "site-1.iketcp.test"
	write := func(ca *lab.CA, name, base string) (cert, key string) {
		c, err := ca.Client(name)
		if err != nil {
			t.Fatal(err)
		}
		cert, key = filepath.Join(l.Dir, base+".pem"), filepath.Join(l.Dir, base+".key")
		if err := c.Write(cert, key); err != nil {
			t.Fatal(err)
		}
		return cert, key
	}
	siteCert, siteKey := write(clientCA, siteID, "site")
	strangerCert, strangerKey := write(pki.ca, "stranger.iketcp.test", "stranger") // the server's CA, not the client CA

	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:     iketcpBinary,
		ServerArgs: append(pki.serverArgs(), "--tls-client-ca", clientCAFile),
		ClientArgs: append(pki.clientArgs(), "--tls-client-cert", siteCert, "--tls-client-key", siteKey),
	})
	if err != nil {
		t.Fatal(err)
	}
	peer := net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort))
	refused := []struct {
		name, want string
		args       []string
	}{
		{"no certificate", "tls: certificate required (the server accepts only clients with a certificate: give one with --tls-client-cert", nil},
		{"another CA's certificate", "tls: unknown certificate authority", []string{"--tls-client-cert", strangerCert, "--tls-client-key", strangerKey}},
	}
	for i, r := range refused {
		st, err := tun.ServerStatus(ctx)
		if err != nil {
			t.Fatal(err)
		}
		before := counter(t, st, "tls_failures")
		c := startNudgedClient(t, ctx, l, strings.ReplaceAll(r.name, " ", "-"), extraClientPort+i, peer, append(pki.clientArgs(), r.args...)...)
		line, err := c.WaitLog(ctx, r.want, 10*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", r.name, err)
		}
		after := waitCounter(t, ctx, tunServer{tun}, "tls_failures", before+1)
		t.Logf("%s: tls_failures %d -> %d; the client logged: %s", r.name, before, after, line)
		if err := c.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	if st, err := tun.ServerStatus(ctx); err != nil || len(st.Sessions) != 0 {
		t.Fatalf("refused clients made sessions: %+v %v", st, err)
	}

	sa := initiateAndPing(t, ctx, tun, 5)
	if s := serverSession(t, ctx, tun); s.State != "up" || !hasIKESA(s, sa.InitiatorSPI) {
		t.Fatalf("server session: %+v", s)
	}
	line, err := tun.Server.WaitLog(ctx, "identity=\"CN="+siteID, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the server took the client with a certificate: %s", line)
}

// statuser is an iketcp instance whose status can be read.
type statuser interface {
	Status(context.Context) (*relay.Status, error)
}

// tunServer is the tunnel's server as a statuser.
type tunServer struct{ tun *lab.Tunnel }

func (s tunServer) Status(ctx context.Context) (*relay.Status, error) {
	return s.tun.ServerStatus(ctx)
}

// TestTLSReloadOnSIGHUP replaces the server's certificate and key files
// with a new certificate on a new key while pings cross the tunnel, and
// signals the server's PID: the live connection keeps its TLS session,
// the IKE SA and every ping; a new connection gets the new certificate,
// and a client pinned to the old key no longer connects while one pinned
// to the new key does.
func TestTLSReloadOnSIGHUP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := lab.NewForTest(t, lab.Options{})
	if err := l.BlockUDP(ctx); err != nil {
		t.Fatal(err)
	}
	pki := newServerPKI(t, l)
	renewed, err := pki.ca.Server(vpnName)
	if err != nil {
		t.Fatal(err)
	}
	oldPin, newPin := pinOf(t, pki.cert), pinOf(t, renewed)
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{
		Binary:     iketcpBinary,
		ServerArgs: pki.serverArgs(),
		ClientArgs: pki.clientArgs(),
	})
	if err != nil {
		t.Fatal(err)
	}
	sa := initiateAndPing(t, ctx, tun, 3)
	before := serverSession(t, ctx, tun)
	peer := net.JoinHostPort(lab.HubOuter, strconv.Itoa(lab.ServerPort))
	if got := serverCert(t, ctx, l, peer, pki.ca); !bytes.Equal(got.Raw, pki.cert.Cert.Raw) {
		t.Fatalf("before the reload the server presents %q (serial %x), not its certificate", got.Subject, got.SerialNumber)
	}

	const pings, interval = 40, 100 * time.Millisecond
	type result struct {
		n   int
		err error
	}
	pinged := make(chan result, 1)
	go func() {
		n, err := tun.PingThrough(ctx, pings, interval)
		pinged <- result{n, err}
	}()
	time.Sleep(500 * time.Millisecond)
	if err := renewed.Write(pki.certFile, pki.keyFile); err != nil {
		t.Fatal(err)
	}
	if err := tun.Server.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	line, err := tun.Server.WaitLog(ctx, "SIGHUP: TLS certificate reloaded", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("server (pid %d): %s", tun.Server.PID(), line)

	// New connections see the new certificate.
	got := serverCert(t, ctx, l, peer, pki.ca)
	if !bytes.Equal(got.Raw, renewed.Cert.Raw) {
		t.Errorf("after the reload a new connection gets serial %x, want the new certificate's %x", got.SerialNumber, renewed.Cert.SerialNumber)
	}
	stale := startNudgedClient(t, ctx, l, "old-pin", extraClientPort, peer, "--tls", "--tls-pin", oldPin)
	if line, err := stale.WaitLog(ctx, "but --tls-pin is "+oldPin, 10*time.Second); err != nil {
		t.Error(err)
	} else {
		t.Logf("a client pinned to the old key: %s", line)
	}
	if err := stale.Stop(); err != nil {
		t.Fatal(err)
	}
	fresh := startNudgedClient(t, ctx, l, "new-pin", extraClientPort+1, peer, "--tls", "--tls-pin", newPin)
	waitFor(t, "the client pinned to the new key to connect", func() bool {
		st, err := fresh.Status(ctx)
		return err == nil && len(st.Sessions) == 1 && len(st.Sessions[0].Links) == 1 && st.Sessions[0].Links[0].State == "up"
	})
	if err := fresh.Stop(); err != nil {
		t.Fatal(err)
	}

	// The live connection carried on.
	p := <-pinged
	if p.err != nil || p.n != pings {
		t.Errorf("pings across the reload: %d of %d (%v)", p.n, pings, p.err)
	}
	now, err := tun.Site.ListSAs(ctx)
	if err != nil || len(now) != 1 || now[0].InitiatorSPI != sa.InitiatorSPI || now[0].ResponderSPI != sa.ResponderSPI {
		t.Fatalf("site IKE SAs after the reload: %+v %v; want only %s/%s", now, err, sa.InitiatorSPI, sa.ResponderSPI)
	}
	var after relay.SessionStatus
	for _, s := range mustStatus(t, ctx, tunServer{tun}).Sessions {
		if s.ID == before.ID {
			after = s
		}
	}
	if after.ID != before.ID || after.Connections != 1 || after.Peer != before.Peer || after.State != "up" {
		t.Errorf("the tunnel's session after the reload: %+v; before: id %d from %s, 1 connection", after, before.ID, before.Peer)
	}
	cst, err := tun.ClientStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := counter(t, cst, "conns_dialed"); n != 1 {
		t.Errorf("the tunnel's client dialled %d connections, want its one", n)
	}
	t.Logf("across the reload: %d of %d pings, IKE SA %s unchanged, session %d still on its one connection from %s (pin %s -> %s)",
		p.n, pings, sa.InitiatorSPI, after.ID, after.Peer, oldPin, newPin)
}

// serverCert connects from the site to the server at addr with TLS, as an
// iketcp client would (the server's name, ALPN iketcp, the CA), and
// returns the certificate the server presents.
func serverCert(t *testing.T, ctx context.Context, l *lab.Lab, addr string, ca *lab.CA) *x509.Certificate {
	t.Helper()
	conn, err := l.Site.Dial(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	tc := tls.Client(conn, &tls.Config{ServerName: vpnName, RootCAs: roots, NextProtos: []string{"iketcp"}, MinVersion: tls.VersionTLS13})
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.HandshakeContext(ctx); err != nil {
		t.Fatalf("TLS to %s: %v", addr, err)
	}
	return tc.ConnectionState().PeerCertificates[0]
}

// mustStatus returns an instance's status.
func mustStatus(t *testing.T, ctx context.Context, inst statuser) *relay.Status {
	t.Helper()
	st, err := inst.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st
}
