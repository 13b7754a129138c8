package dial_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/dial"
	"github.com/iketcp/iketcp/relay/streamlink"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// seen is what a test server saw of one connection.
type seen struct {
	prefix string // the first bytes inside TLS
	client string // the subject of the client's verified certificate
	err    error  // why the handshake or the read failed
}

// tlsServer serves TLS with cfg on loopback: each connection's handshake,
// then its first bytes, the length of the IKETCP prefix, go to the
// channel. It returns its address.
func tlsServer(t *testing.T, cfg *tls.Config) (string, <-chan seen) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	results := make(chan seen, 16)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				results <- serveTLS(nc, cfg)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String(), results
}

// serveTLS is one connection of tlsServer.
func serveTLS(nc net.Conn, cfg *tls.Config) seen {
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(5 * time.Second))
	tc := tls.Server(nc, cfg)
	if err := tc.Handshake(); err != nil {
		// Read until the client closes, so that it reads the alert
		// rather than a reset.
		io.Copy(io.Discard, nc)
		return seen{err: err}
	}
	var s seen
	if st := tc.ConnectionState(); len(st.VerifiedChains) > 0 {
		s.client = st.VerifiedChains[0][0].Subject.String()
	}
	buf := make([]byte, len(framing.Prefix))
	if _, err := io.ReadFull(tc, buf); err != nil {
		s.err = err
		return s
	}
	s.prefix = string(buf)
	return s
}

// dialTLS opens a link to addr with TLS configured by opts.
func dialTLS(t *testing.T, addr string, opts dial.TLSOptions) (relay.Link, error) {
	t.Helper()
	cfg, err := dial.TLSConfig(opts)
	if err != nil {
		t.Fatal(err)
	}
	d := streamlink.NewDialer(streamlink.Config{})
	d.TLS = cfg
	return dialLink(t, d, addr)
}

func dialLink(t *testing.T, d *streamlink.Dialer, addr string) (relay.Link, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	link, err := d.DialLink(ctx, addr)
	if err == nil {
		t.Cleanup(func() { link.Close() })
	}
	return link, err
}

// next returns what the server saw of the next connection.
func next(t *testing.T, results <-chan seen) seen {
	t.Helper()
	select {
	case s := <-results:
		return s
	case <-time.After(5 * time.Second):
		t.Fatal("the server saw no connection")
		return seen{}
	}
}

// pinOf is the pin of a certificate, as the docs define it.
func pinOf(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return dial.FormatPin(sum[:])
}

// TestTLSChecks: every check of the server's certificate, passed and
// failed, through a streamlink Dialer to a TLS server on loopback; a
// failure matches its sentinel and says what to fix.
func TestTLSChecks(t *testing.T) {
	ca := newAuthority(t, "Test CA")
	other := newAuthority(t, "Other CA")
	srv := ca.issue(t, leaf{cn: "vpn.test", dns: []string{"vpn.test"}, ips: []net.IP{net.IPv4(127, 0, 0, 1)}})
	named := ca.issue(t, leaf{cn: "vpn.test", dns: []string{"vpn.test"}}) // no IP address
	strange := other.issue(t, leaf{cn: "strange", dns: []string{"strange.invalid"}})
	expired := ca.issue(t, leaf{cn: "vpn.test", dns: []string{"vpn.test"}, notAfter: time.Now().Add(-time.Hour)})
	cnOnly := ca.issue(t, leaf{cn: "vpn.test"})
	nameless := ca.issue(t, leaf{})
	srvPin, err := dial.PinOf(srv.certPEM)
	if err != nil {
		t.Fatal(err)
	}
	strangePin := pinOf(strange.x509)

	for _, tc := range []struct {
		name string
		cert *issued
		opts dial.TLSOptions
		err  error    // nil: the link is up
		msg  []string // in the error's message
	}{
		{name: "CA and the address dialled", cert: srv, opts: dial.TLSOptions{CAFile: ca.file}},
		{name: "CA and server name", cert: srv, opts: dial.TLSOptions{CAFile: ca.file, ServerName: "vpn.test"}},
		{name: "CA and pin", cert: srv, opts: dial.TLSOptions{CAFile: ca.file, Pin: srvPin}},
		{name: "another CA", cert: srv, opts: dial.TLSOptions{CAFile: other.file},
			err: dial.ErrUnknownCA, msg: []string{"not signed by a CA in --tls-ca (" + other.file + ")", `issued by "CN=Test CA"`}},
		{name: "system roots", cert: srv, opts: dial.TLSOptions{},
			err: dial.ErrUnknownCA, msg: []string{"not signed by a CA in the system's roots", "--tls-ca", "--tls-pin"}},
		{name: "wrong server name", cert: srv, opts: dial.TLSOptions{CAFile: ca.file, ServerName: "other.test"},
			err: dial.ErrWrongName, msg: []string{"the server's certificate is for vpn.test, 127.0.0.1, not other.test: check --tls-server-name"}},
		{name: "not for the address dialled", cert: named, opts: dial.TLSOptions{CAFile: ca.file},
			err: dial.ErrWrongName, msg: []string{"is for vpn.test, not 127.0.0.1"}},
		{name: "name only in the common name", cert: cnOnly, opts: dial.TLSOptions{CAFile: ca.file, ServerName: "vpn.test"},
			err: dial.ErrWrongName, msg: []string{`has no subject alternative names, only the common name "vpn.test"`, "reissue it with vpn.test as a subject alternative name"}},
		{name: "no names at all", cert: nameless, opts: dial.TLSOptions{CAFile: ca.file, ServerName: "vpn.test"},
			err: dial.ErrWrongName, msg: []string{"names no host at all", "reissue it with vpn.test as a subject alternative name"}},
		{name: "expired", cert: expired, opts: dial.TLSOptions{CAFile: ca.file, ServerName: "vpn.test"},
			err: dial.ErrBadCertificate, msg: []string{`"CN=vpn.test"`, "renew it, or check the clocks"}},
		{name: "right pin, no CA, another name", cert: strange, opts: dial.TLSOptions{Pin: strangePin, ServerName: "vpn.test"}},
		{name: "right pin in upper case without sha256:", cert: strange, opts: dial.TLSOptions{Pin: strings.ToUpper(strings.TrimPrefix(strangePin, "sha256:"))}},
		{name: "right pin, wrong CA", cert: strange, opts: dial.TLSOptions{Pin: strangePin, CAFile: ca.file, ServerName: "strange.invalid"},
			err: dial.ErrUnknownCA, msg: []string{"--tls-ca"}},
		{name: "wrong pin", cert: srv, opts: dial.TLSOptions{Pin: strangePin},
			err: dial.ErrWrongPin, msg: []string{"the server's certificate key hashes to " + srvPin + ", but --tls-pin is " + strangePin}},
		{name: "insecure", cert: strange, opts: dial.TLSOptions{Insecure: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, results := tlsServer(t, &tls.Config{Certificates: []tls.Certificate{tc.cert.tls}})
			link, err := dialTLS(t, addr, tc.opts)
			s := next(t, results)
			if tc.err == nil {
				if err != nil {
					t.Fatalf("dial: %v", err)
				}
				if s.err != nil || s.prefix != framing.Prefix {
					t.Fatalf("the server read %q inside TLS, err %v; want %q", s.prefix, s.err, framing.Prefix)
				}
				link.Close()
				return
			}
			if err == nil {
				t.Fatalf("dial worked; want %v", tc.err)
			}
			t.Logf("error: %v", err)
			for _, sentinel := range []error{dial.ErrUnknownCA, dial.ErrWrongName, dial.ErrWrongPin, dial.ErrBadCertificate} {
				if got := errors.Is(err, sentinel); got != (sentinel == tc.err) {
					t.Errorf("errors.Is(err, %q) = %v", sentinel, got)
				}
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not say %q", err, m)
				}
			}
			if s.err == nil {
				t.Error("the server completed a handshake the client refused")
			}
		})
	}
}

// TestTLSUnknownCAUnwraps: behind the message, x509's error is there for
// errors.As.
func TestTLSUnknownCAUnwraps(t *testing.T) {
	ca := newAuthority(t, "Test CA")
	other := newAuthority(t, "Other CA")
	srv := ca.issue(t, leaf{cn: "vpn.test", dns: []string{"vpn.test"}})
	addr, results := tlsServer(t, &tls.Config{Certificates: []tls.Certificate{srv.tls}})
	_, err := dialTLS(t, addr, dial.TLSOptions{CAFile: other.file, ServerName: "vpn.test"})
	next(t, results)
	var ua x509.UnknownAuthorityError
	if !errors.As(err, &ua) {
		t.Fatalf("errors.As(%v, x509.UnknownAuthorityError) = false", err)
	}
}

// TestTLSClientCertificate: a server that requires a client certificate
// refuses a client without one, and takes one with --tls-client-cert.
func TestTLSClientCertificate(t *testing.T) {
	ca := newAuthority(t, "Test CA")
	srv := ca.issue(t, leaf{cn: "vpn.test", dns: []string{"vpn.test"}})
	site := ca.issue(t, leaf{cn: "site-a", client: true})
	clients := x509.NewCertPool()
	clients.AddCert(ca.cert)
	addr, results := tlsServer(t, &tls.Config{
		Certificates: []tls.Certificate{srv.tls},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clients,
	})
	opts := dial.TLSOptions{CAFile: ca.file, ServerName: "vpn.test"}

	t.Run("without", func(t *testing.T) {
		// TLS 1.3: the client's side of the handshake completes; the
		// server's refusal arrives on the link's first read.
		link, err := dialTLS(t, addr, opts)
		if err == nil {
			err = serveUntilEnd(t, link)
			link.Close()
		}
		if err == nil || !strings.Contains(err.Error(), "certificate required") {
			t.Fatalf("err = %v; want the server's certificate required", err)
		}
		if s := next(t, results); s.err == nil {
			t.Fatalf("the server took a client without a certificate")
		}
	})
	t.Run("with", func(t *testing.T) {
		opts := opts
		opts.ClientCert, opts.ClientKey = site.certFile, site.keyFile
		if _, err := dialTLS(t, addr, opts); err != nil {
			t.Fatal(err)
		}
		s := next(t, results)
		if s.err != nil || s.prefix != framing.Prefix || s.client != "CN=site-a" {
			t.Fatalf("the server saw %+v; want the prefix from CN=site-a", s)
		}
	})
}

// serveUntilEnd serves link until it ends, and returns why.
func serveUntilEnd(t *testing.T, link relay.Link) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- link.Serve(discard{}) }()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		link.Close()
		<-done
		t.Fatal("the link did not end")
		return nil
	}
}

type discard struct{}

func (discard) Receive([]relay.Datagram) error { return nil }

// TestTLS12OnlyServer: a server without TLS 1.3 fails the handshake.
func TestTLS12OnlyServer(t *testing.T) {
	ca := newAuthority(t, "Test CA")
	srv := ca.issue(t, leaf{cn: "vpn.test", dns: []string{"vpn.test"}})
	addr, results := tlsServer(t, &tls.Config{Certificates: []tls.Certificate{srv.tls}, MaxVersion: tls.VersionTLS12})
	_, err := dialTLS(t, addr, dial.TLSOptions{CAFile: ca.file, ServerName: "vpn.test"})
	next(t, results)
	if err == nil || !strings.Contains(err.Error(), "protocol version") {
		t.Fatalf("err = %v; want a failed handshake over the protocol version", err)
	}
}

// TestTLSConfigErrors: options that cannot work fail at once, naming the
// option at fault.
func TestTLSConfigErrors(t *testing.T) {
	ca := newAuthority(t, "Test CA")
	site := ca.issue(t, leaf{cn: "site-a", client: true})
	notPEM := filepath.Join(t.TempDir(), "ca.txt")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	pin := pinOf(ca.cert)
	for _, tc := range []struct {
		name string
		opts dial.TLSOptions
		msg  []string
	}{
		{"CA file missing", dial.TLSOptions{CAFile: "/nonexistent/ca.pem"}, []string{"reading --tls-ca", "/nonexistent/ca.pem", "no such file"}},
		{"CA file not PEM", dial.TLSOptions{CAFile: notPEM}, []string{"--tls-ca " + notPEM + " holds no PEM certificate"}},
		{"pin too short", dial.TLSOptions{Pin: "sha256:abcd"}, []string{`--tls-pin "sha256:abcd" is not a SHA-256 in hex`}},
		{"pin in base64", dial.TLSOptions{Pin: "sha256//" + b64(pin)}, []string{"is in base64: give it in hex, " + pin}},
		{"cert without key", dial.TLSOptions{ClientCert: site.certFile}, []string{"--tls-client-cert and --tls-client-key go together"}},
		{"key file missing", dial.TLSOptions{ClientCert: site.certFile, ClientKey: "/nonexistent/site.key"}, []string{"--tls-client-key /nonexistent/site.key", "no such file"}},
		{"key of another cert", dial.TLSOptions{ClientCert: site.certFile, ClientKey: ca.issue(t, leaf{cn: "b", client: true}).keyFile}, []string{"--tls-client-cert", "does not match"}},
		{"insecure with a pin", dial.TLSOptions{Insecure: true, Pin: pin}, []string{"--tls-insecure checks nothing"}},
		{"insecure with a CA", dial.TLSOptions{Insecure: true, CAFile: ca.file}, []string{"--tls-insecure checks nothing"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := dial.TLSConfig(tc.opts)
			if err == nil {
				t.Fatalf("TLSConfig = %v, nil; want an error", cfg)
			}
			for _, m := range tc.msg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not say %q", err, m)
				}
			}
		})
	}
}

// TestTLSConfigVersion: TLS 1.3 only, and the name to check is kept.
func TestTLSConfigVersion(t *testing.T) {
	cfg, err := dial.TLSConfig(dial.TLSOptions{ServerName: "vpn.test"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.MinVersion != tls.VersionTLS13 || cfg.ServerName != "vpn.test" || cfg.VerifyConnection == nil {
		t.Fatalf("config %+v", cfg)
	}
}

func TestParsePin(t *testing.T) {
	sum := sha256.Sum256([]byte("key"))
	hexSum := strings.TrimPrefix(dial.FormatPin(sum[:]), "sha256:")
	for _, s := range []string{hexSum, "sha256:" + hexSum, "SHA256:" + strings.ToUpper(hexSum), " sha256:" + hexSum + "\n"} {
		got, err := dial.ParsePin(s)
		if err != nil || string(got) != string(sum[:]) {
			t.Errorf("ParsePin(%q) = %x, %v", s, got, err)
		}
	}
	for _, s := range []string{"", "sha256:", hexSum[:62], hexSum + "00", "sha1:" + hexSum, "zz" + hexSum[2:], b64(dial.FormatPin(sum[:]))} {
		if got, err := dial.ParsePin(s); err == nil {
			t.Errorf("ParsePin(%q) = %x; want an error", s, got)
		}
	}
}

func TestPinOf(t *testing.T) {
	ca := newAuthority(t, "Test CA")
	srv := ca.issue(t, leaf{cn: "vpn.test", dns: []string{"vpn.test"}})
	got, err := dial.PinOf(append([]byte("# a comment\n"), srv.certPEM...))
	if err != nil {
		t.Fatal(err)
	}
	if want := pinOf(srv.x509); got != want {
		t.Fatalf("PinOf = %s; want %s", got, want)
	}
	if _, err := dial.ParsePin(got); err != nil {
		t.Fatalf("PinOf's pin does not parse: %v", err)
	}
	if _, err := dial.PinOf([]byte("no PEM")); err == nil {
		t.Fatal("PinOf of no certificate worked")
	}
}

// b64 writes a pin in base64, as HPKP and curl do.
func b64(pin string) string {
	sum, err := dial.ParsePin(pin)
	if err != nil {
		panic(err)
	}
	return base64.StdEncoding.EncodeToString(sum)
}
