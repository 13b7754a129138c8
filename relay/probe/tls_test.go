package probe

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/relay/dial"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// TestTLS: the probe reaches an iketcp server inside TLS 1.3, reports its
// certificate and pin, says the check iketcp client --tls would make fails
// for a self-signed certificate and passes with its pin, and gets the
// server's Observe answer through TLS.
func TestTLS(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "hub.iketcp.test"},
		DNSNames: []string{"hub.iketcp.test"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	sum := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	pin := dial.FormatPin(sum[:])

	backend, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	srv, err := server.New(server.Config{Backend: backend.LocalAddr().(*net.UDPAddr).AddrPort(), Logger: relaytest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := tls.NewListener(tcp, &tls.Config{
		MinVersion: tls.VersionTLS13, NextProtos: []string{ALPN},
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- srv.Serve(ctx, streamlink.NewListener(ln, streamlink.Config{Counters: srv.Counters(), Logger: relaytest.Logger(t)}))
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	}()
	port := netip.MustParseAddrPort(tcp.Addr().String()).Port()

	for _, tc := range []struct {
		name  string
		opts  dial.TLSOptions
		check string // what the check says; "" passes
	}{
		{"self-signed", dial.TLSOptions{ServerName: "hub.iketcp.test"}, "not signed"},
		{"pinned", dial.TLSOptions{ServerName: "hub.iketcp.test", Pin: pin}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := Run(context.Background(), Options{Host: "127.0.0.1", UDPPorts: []uint16{deadUDPPort(t)}, TCPPorts: []uint16{port},
				TLS: true, TLSOptions: tc.opts, Tries: 1, Wait: time.Second})
			if err != nil {
				t.Fatal(err)
			}
			t.Log("\n" + rep.Format())
			if len(rep.TCP) != 2 {
				t.Fatalf("TCP results %+v", rep.TCP)
			}
			clear, withTLS := rep.TCP[0], rep.TCP[1]
			if !clear.Connected || clear.Iketcp {
				t.Errorf("in clear to a TLS-only port: %+v", clear)
			}
			if !withTLS.TLS || withTLS.TLSVersion != "TLS 1.3" || withTLS.TLSProtocol != ALPN || withTLS.TLSPin != pin ||
				!strings.Contains(withTLS.TLSSubject, "hub.iketcp.test") || !withTLS.Iketcp || len(withTLS.Observed) != 2 {
				t.Fatalf("TLS: %+v", withTLS)
			}
			if (tc.check == "") != (withTLS.TLSCheck == "") || !strings.Contains(withTLS.TLSCheck, tc.check) {
				t.Errorf("check %q, want %q", withTLS.TLSCheck, tc.check)
			}
			if v := strings.Join(rep.Verdict, "\n"); !strings.Contains(v, "use --transport tcp --tls") || (tc.check != "") != strings.Contains(v, pin) {
				t.Errorf("verdict:\n%s", v)
			}
		})
	}
}
