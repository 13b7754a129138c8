package lab

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

// recorder is a net.Conn that keeps a copy of what is written to it.
type recorder struct {
	net.Conn
	mu      sync.Mutex
	written bytes.Buffer
}

func (r *recorder) Write(b []byte) (int, error) {
	r.mu.Lock()
	r.written.Write(b)
	r.mu.Unlock()
	return r.Conn.Write(b)
}

func (r *recorder) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.written.Bytes())
}

// TestTLSWire runs a real TLS 1.3 handshake (crypto/tls, over a pipe,
// with certificates from NewCA) and reads what each side sent with the
// lab's parser: the ClientHello's name, ALPN and versions, the
// ServerHello's version, then only application data.
func TestTLSWire(t *testing.T) {
	ca, err := NewCA("test CA")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.Server("vpn.example.test", "192.0.2.7")
	if err != nil {
		t.Fatal(err)
	}
	if cert.Cert.Subject.CommonName != "vpn.example.test" || len(cert.Cert.DNSNames) != 1 || len(cert.Cert.IPAddresses) != 1 {
		t.Fatalf("server certificate names: CN %q, DNS %v, IP %v", cert.Cert.Subject.CommonName, cert.Cert.DNSNames, cert.Cert.IPAddresses)
	}
	pair, err := tls.X509KeyPair(cert.CertPEM, cert.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca.CertPEM) {
		t.Fatal("CA PEM holds no certificate")
	}
	a, b := net.Pipe()
	ca1, sa1 := &recorder{Conn: a}, &recorder{Conn: b}
	client := tls.Client(ca1, &tls.Config{ServerName: "vpn.example.test", RootCAs: roots, NextProtos: []string{"iketcp"}})
	server := tls.Server(sa1, &tls.Config{Certificates: []tls.Certificate{pair}, NextProtos: []string{"iketcp"}, MinVersion: tls.VersionTLS13})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		if err := server.HandshakeContext(ctx); err != nil {
			done <- err
			return
		}
		buf := make([]byte, 5)
		_, err := io.ReadFull(server, buf)
		done <- err
	}()
	if err := client.HandshakeContext(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The pipe, not the TLS conns: their close_notify would wait for a
	// reader that is gone.
	a.Close()
	b.Close()

	fromClient, err := SplitTLSRecords(ca1.bytes())
	if err != nil {
		t.Fatal(err)
	}
	fromServer, err := SplitTLSRecords(sa1.bytes())
	if err != nil {
		t.Fatal(err)
	}
	hello, err := ParseClientHello(fromClient[0])
	if err != nil {
		t.Fatal(err)
	}
	if hello.ServerName != "vpn.example.test" || !slices.Equal(hello.ALPN, []string{"iketcp"}) || !slices.Contains(hello.Versions, TLSVersion13) {
		t.Fatalf("ClientHello: %+v", hello)
	}
	v, err := ServerHelloVersion(fromServer[0])
	if err != nil || v != TLSVersion13 {
		t.Fatalf("ServerHello version %#04x, %v", v, err)
	}
	for _, recs := range [][]TLSRecord{fromClient[1:], fromServer[1:]} {
		for _, r := range recs {
			if r.Type != TLSRecordApplicationData && r.Type != TLSRecordChangeCipherSpec {
				t.Fatalf("record of type %d after a hello", r.Type)
			}
		}
	}
	if _, err := ServerHelloVersion(fromClient[0]); err == nil {
		t.Fatal("a ClientHello read as a ServerHello")
	}
	if _, err := SplitTLSRecords([]byte("IKETCP\x00\x10")); err == nil {
		t.Fatal("IKETCP read as TLS")
	}
	// A record cut off at the end is left out.
	if recs, err := SplitTLSRecords(ca1.bytes()[:10]); err != nil || len(recs) != 0 {
		t.Fatalf("a cut record: %d records, %v", len(recs), err)
	}
	if _, err := ParseClientHello(TLSRecord{Type: TLSRecordHandshake, Fragment: []byte{1, 0, 0, 50, 3, 3}}); err == nil {
		t.Fatal("a truncated ClientHello parsed")
	}
}

// TestClientCertificate checks that a client certificate verifies for
// client authentication against its CA, and not for servers.
func TestClientCertificate(t *testing.T) {
	ca, err := NewCA("client CA")
	if err != nil {
		t.Fatal(err)
	}
	c, err := ca.Client("site-1.example.test")
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	if _, err := c.Cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("client certificate: %v", err)
	}
	if _, err := c.Cert.Verify(x509.VerifyOptions{Roots: roots}); err == nil {
		t.Fatal("a client certificate verified for a server")
	}
	if _, err := tls.X509KeyPair(c.CertPEM, c.KeyPEM); err != nil {
		t.Fatal(err)
	}
}

// TestProxyV2Header parses the lab's PROXY v2 headers with the PROXY
// protocol library the front door uses.
func TestProxyV2Header(t *testing.T) {
	for _, c := range []struct{ src, dst string }{
		{"198.51.100.77:40000", "203.0.113.2:4500"},
		{"[2001:db8::1]:40000", "[2001:db8::2]:443"},
	} {
		src, dst := netip.MustParseAddrPort(c.src), netip.MustParseAddrPort(c.dst)
		h, err := ProxyV2Header(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		got, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(append(h, "IKETCP"...))))
		if err != nil {
			t.Fatalf("%s -> %s: %v", src, dst, err)
		}
		if got.Version != 2 || got.Command != proxyproto.PROXY || got.SourceAddr.String() != src.String() || got.DestinationAddr.String() != dst.String() {
			t.Fatalf("%s -> %s parsed as %+v", src, dst, got)
		}
	}
	if _, err := ProxyV2Header(netip.MustParseAddrPort("192.0.2.1:1"), netip.MustParseAddrPort("[2001:db8::2]:443")); err == nil {
		t.Fatal("a header of two families")
	}
}

// TestIKESAInitDatagram reads the lab's IKE_SA_INIT datagram as an RFC
// 9329 frame.
func TestIKESAInitDatagram(t *testing.T) {
	h, ok := Frame(IKESAInitDatagram(0x1122334455667788)).IKE()
	if !ok || h.InitiatorSPI != 0x1122334455667788 || h.ResponderSPI != 0 || h.Exchange != ExchangeIKESAInit || h.Response || h.MessageID != 0 {
		t.Fatalf("IKE_SA_INIT datagram: %+v %v", h, ok)
	}
}

// TestListensOn reads ss's listening sockets.
func TestListensOn(t *testing.T) {
	out := []byte(strings.Join([]string{
		"LISTEN 0      4096   203.0.113.2:4500      0.0.0.0:*",
		"LISTEN 0      511      127.0.0.1:8443      0.0.0.0:*",
		"LISTEN 0      1024       0.0.0.0:8080      0.0.0.0:*",
		"LISTEN 0      1024          [::]:9090         [::]:*",
	}, "\n"))
	for addr, want := range map[string]bool{
		"203.0.113.2:4500": true, "127.0.0.1:8443": true, "100.64.0.1:8080": true, "127.0.0.1:9090": true,
		"127.0.0.1:4500": false, "203.0.113.2:8443": false, "bad": false,
	} {
		if got := listensOn(out, addr); got != want {
			t.Errorf("listensOn %s = %v, want %v", addr, got, want)
		}
	}
}
