package streamlink_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// selfSigned returns a certificate for a TLS server, signed by its own key.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "server"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestDialerTLS: the prefix and frames go inside TLS, and a
// VerifyConnection hook is told the name checked, the host dialled, even
// an IP address (for which crypto/tls sends no SNI).
func TestDialerTLS(t *testing.T) {
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := streamlink.NewListener(tls.NewListener(nl, &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}), streamlink.Config{})
	defer ln.Close()
	_, port, _ := net.SplitHostPort(nl.Addr().String())

	for _, host := range []string{"127.0.0.1", "localhost"} {
		t.Run(host, func(t *testing.T) {
			var checked string
			d := streamlink.NewDialer(streamlink.Config{})
			d.TLS = &tls.Config{
				MinVersion:         tls.VersionTLS13,
				InsecureSkipVerify: true, // the hook checks
				VerifyConnection: func(cs tls.ConnectionState) error {
					checked = cs.ServerName
					return nil
				},
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			// The server's side of the handshake runs in Serve.
			rx := &collector{got: make(chan []byte, 1)}
			served := make(chan error, 1)
			go func() {
				srv, err := ln.Accept(ctx)
				if err != nil {
					served <- err
					return
				}
				defer srv.Close()
				context.AfterFunc(ctx, func() { srv.Close() })
				served <- srv.Serve(rx)
			}()
			cl, err := d.DialLink(ctx, net.JoinHostPort(host, port))
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			if checked != host {
				t.Fatalf("VerifyConnection was told %q; want %q", checked, host)
			}
			want := relaytest.ESP(0xc1, 1, 100)
			if err := cl.Send([][]byte{withHeadroom(want)}); err != nil {
				t.Fatal(err)
			}
			select {
			case got := <-rx.got:
				if string(got) != string(want) {
					t.Fatalf("got %x; want %x", got, want)
				}
			case err := <-served:
				t.Fatalf("Serve: %v", err)
			case <-time.After(5 * time.Second):
				t.Fatal("nothing arrived")
			}
			cancel()
			<-served
		})
	}
}
