package server_test

import (
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

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// testCA makes a CA and issues certificates from it.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

func (ca *testCA) issue(t *testing.T, cn string, usage x509.ExtKeyUsage, ips ...net.IP) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{usage}, IPAddresses: ips}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestSessionBelongsToItsIdentity: over TLS with client certificates, a
// session belongs to the identity that opened it: frames of it from a
// connection with another certificate are dropped and counted, and its
// replies never go there, even once its own connection is gone.
func TestSessionBelongsToItsIdentity(t *testing.T) {
	ca := newTestCA(t)
	srvCert := ca.issue(t, "hub", x509.ExtKeyUsageServerAuth, net.IPv4(127, 0, 0, 1))
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{}})
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tlsLn := tls.NewListener(inner, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{srvCert},
		ClientCAs: ca.pool, ClientAuth: tls.RequireAndVerifyClientCert})
	go r.Srv.Serve(r.Ctx, streamlink.NewListener(tlsLn, streamlink.Config{Counters: r.Srv.Counters()}))
	dial := func(cn string) net.Conn {
		t.Helper()
		c, err := tls.Dial("tcp", inner.Addr().String(), &tls.Config{RootCAs: ca.pool, ServerName: "127.0.0.1",
			Certificates: []tls.Certificate{ca.issue(t, cn, x509.ExtKeyUsageClientAuth)}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.Write([]byte(framing.Prefix))
		return c
	}
	alice := dial("alice")
	from := r.OpenSession(alice, framing.NewDecoder(alice, 0, false), 0xa11ce)
	relaytest.Frame(t, alice, relaytest.ESP(0xc0a11ce0, 1, 100))
	relaytest.Recv(t, r.Backend)
	mallory := dial("mallory")
	relaytest.Frame(t, mallory, relaytest.ESP(0xc0a11ce0, 2, 100), relaytest.IKEMsg(0xa11ce, 0xa11ce^0x5151, framing.IKEAuth, framing.FlagInitiator, 5, 80))
	relaytest.Eventually(t, "identity_refused", func() bool { return r.Srv.Counters().IdentityRefused.Load() == 2 })
	relaytest.ExpectNothing(t, r.Backend, "another identity's frames")
	// Alice's connection goes; Mallory's frames still do not take her
	// session.
	alice.Close()
	relaytest.Eventually(t, "alice's session to wait", func() bool { return r.Srv.Status().Sessions[0].State == "waiting" })
	relaytest.Frame(t, mallory, relaytest.ESP(0xc0a11ce0, 3, 100))
	relaytest.Eventually(t, "identity_refused", func() bool { return r.Srv.Counters().IdentityRefused.Load() == 3 })
	r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd0a11ce0, 1, 100), from)
	relaytest.ExpectNoFrame(t, mallory, "alice's replies")
	// Alice comes back, with her certificate: her session is hers again.
	alice2 := dial("alice")
	relaytest.Frame(t, alice2, relaytest.ESP(0xc0a11ce0, 4, 100))
	if _, f := relaytest.Recv(t, r.Backend); f != from {
		t.Fatalf("alice's ESP came from %v, want her session %v", f, from)
	}
	r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd0a11ce0, 2, 100), from)
	if got := relaytest.ReadFrame(t, alice2, framing.NewDecoder(alice2, 0, false)); len(got) != 100 {
		t.Fatalf("alice got %d bytes back", len(got))
	}
}
