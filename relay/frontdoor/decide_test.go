package frontdoor

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/iketcp/iketcp/framing"
)

// clientHello returns the first flight of a TLS client configured by cfg:
// its ClientHello record(s).
func clientHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c := &captureConn{}
	tls.Client(c, cfg).Handshake() // fails at its first read
	if len(c.out) == 0 {
		t.Fatal("no ClientHello written")
	}
	return c.out
}

// captureConn keeps what is written to it; reads fail.
type captureConn struct {
	recorder
	out []byte
}

func (c *captureConn) Write(p []byte) (int, error) { c.out = append(c.out, p...); return len(p), nil }
func (c *captureConn) Read([]byte) (int, error)    { return 0, io.EOF }

// helloFor is a ClientHello for name, offering protos.
func helloFor(t testing.TB, name string, protos ...string) []byte {
	return clientHello(t, &tls.Config{ServerName: name, NextProtos: protos, InsecureSkipVerify: true})
}

func proxyV1(src, dst string) []byte {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	h := proxyproto.HeaderProxyFromAddrs(1, net.TCPAddrFromAddrPort(s), net.TCPAddrFromAddrPort(d))
	b, _ := h.Format()
	return b
}

func proxyV2(src, dst string) []byte {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	h := proxyproto.HeaderProxyFromAddrs(2, net.TCPAddrFromAddrPort(s), net.TCPAddrFromAddrPort(d))
	b, _ := h.Format()
	return b
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// timeoutReader returns its bytes, then a timeout.
type timeoutReader struct{ r io.Reader }

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

func (r timeoutReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err == io.EOF {
		return n, timeoutError{}
	}
	return n, err
}

func TestDecide(t *testing.T) {
	ours := rules{terminate: true, names: []string{"vpn.example.test", "*.vpn.example.net"}, protocols: []string{"iketcp"}}
	sharing := ours
	sharing.share = true
	anyName := rules{terminate: true}
	strict := ours
	strict.requireTLS = true
	clear := rules{}
	iketcp := []byte("IKETCP\x00\x0a\x00\x00\x00\x01\x00\x00\x00\x01")
	http := []byte("GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n")
	ourHello := helloFor(t, "vpn.example.test")
	for _, tc := range []struct {
		name    string
		rules   rules
		trusted bool
		in      []byte
		timeout bool // the stream ends in a timeout, not EOF
		action  action
		refusal refusal
		remote  string
		replay  []byte // nil: everything after the PROXY header
	}{
		{name: "iketcp", rules: clear, in: iketcp, action: actionClear},
		{name: "iketcp-required-tls", rules: strict, in: iketcp, refusal: refusalClear},
		{name: "tls-ours", rules: ours, in: helloFor(t, "vpn.example.test"), action: actionTLS},
		{name: "tls-ours-case", rules: ours, in: helloFor(t, "VPN.Example.Test"), action: actionTLS},
		{name: "tls-wildcard", rules: ours, in: helloFor(t, "hub1.vpn.example.net"), action: actionTLS},
		{name: "tls-wildcard-two-labels", rules: sharing, in: helloFor(t, "a.hub1.vpn.example.net"), action: actionShare},
		{name: "tls-alpn", rules: sharing, in: helloFor(t, "www.example.test", "h2", "iketcp"), action: actionTLS},
		{name: "tls-other-name-shared", rules: sharing, in: helloFor(t, "www.example.test", "h2"), action: actionShare},
		{name: "tls-other-name-alone", rules: ours, in: helloFor(t, "www.example.test"), refusal: refusalUnrecognized},
		{name: "tls-no-name-alone", rules: ours, in: helloFor(t, ""), action: actionTLS},
		{name: "tls-no-name-shared", rules: sharing, in: helloFor(t, ""), action: actionShare},
		{name: "tls-any-name", rules: anyName, in: helloFor(t, "whatever.example"), action: actionTLS},
		{name: "tls-no-certificate", rules: rules{share: true}, in: helloFor(t, "vpn.example.test"), action: actionShare},
		{name: "tls-broken-shared", rules: sharing, in: []byte("\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"), action: actionShare},
		{name: "tls-truncated", rules: sharing, in: helloFor(t, "vpn.example.test")[:100], refusal: refusalUnrecognized},
		{name: "tls-stalled", rules: sharing, in: helloFor(t, "vpn.example.test")[:100], timeout: true, refusal: refusalTimeout},
		{name: "http-shared", rules: sharing, in: http, action: actionShare},
		{name: "http-alone", rules: ours, in: http, refusal: refusalUnrecognized},
		{name: "garbage", rules: sharing, in: []byte("\x00\x01\x02\x03garbage"), refusal: refusalUnrecognized},
		{name: "nothing", rules: sharing, in: nil, refusal: refusalSilent},
		{name: "nothing-in-time", rules: sharing, in: nil, timeout: true, refusal: refusalTimeout},
		{name: "partial-prefix", rules: clear, in: []byte("IKE"), timeout: true, refusal: refusalTimeout},
		{name: "too-long", rules: sharing, in: []byte("GET /" + strings.Repeat("a", MaxSniff) + " HTTP/1.1\r\n"), refusal: refusalUnrecognized},
		{name: "proxy-untrusted", rules: clear, in: cat(proxyV1("192.0.2.1:1000", "192.0.2.2:443"), iketcp), refusal: refusalProxy},
		{name: "proxy-v2-untrusted", rules: clear, in: cat(proxyV2("192.0.2.1:1000", "192.0.2.2:443"), iketcp), refusal: refusalProxy},
		{name: "proxy-v1", rules: clear, trusted: true, in: cat(proxyV1("192.0.2.1:1000", "192.0.2.2:443"), iketcp),
			action: actionClear, remote: "192.0.2.1:1000", replay: iketcp},
		{name: "proxy-v2", rules: clear, trusted: true, in: cat(proxyV2("[2001:db8::1]:1000", "[2001:db8::2]:443"), iketcp),
			action: actionClear, remote: "[2001:db8::1]:1000", replay: iketcp},
		{name: "proxy-v2-tls", rules: ours, trusted: true, in: cat(proxyV2("192.0.2.1:1000", "192.0.2.2:443"), ourHello),
			action: actionTLS, remote: "192.0.2.1:1000", replay: ourHello},
		{name: "proxy-v2-shared", rules: sharing, trusted: true, in: cat(proxyV2("192.0.2.1:1000", "192.0.2.2:443"), http),
			action: actionShare, remote: "192.0.2.1:1000", replay: http},
		{name: "proxy-missing", rules: clear, trusted: true, in: iketcp, refusal: refusalProxy},
		{name: "proxy-twice", rules: clear, trusted: true, in: cat(proxyV1("192.0.2.1:1000", "192.0.2.2:443"), proxyV1("192.0.2.1:1000", "192.0.2.2:443")), refusal: refusalProxy},
		{name: "proxy-v1-too-long", rules: clear, trusted: true, in: []byte("PROXY TCP4 " + strings.Repeat("1", 200)), refusal: refusalProxy},
		{name: "proxy-v2-too-long", rules: clear, trusted: true, in: []byte(framing.ProxyV2Signature + "\x21\x11\x20\x00"), refusal: refusalProxy},
		{name: "proxy-v2-udp", rules: clear, trusted: true, in: cat([]byte(framing.ProxyV2Signature+"\x21\x12\x00\x0c"), make([]byte, 12), iketcp), refusal: refusalProxy},
		{name: "proxy-v2-local", rules: clear, trusted: true, in: cat([]byte(framing.ProxyV2Signature+"\x20\x00\x00\x00"), iketcp),
			action: actionClear, replay: iketcp},
		{name: "proxy-v1-unknown", rules: clear, trusted: true, in: cat([]byte("PROXY UNKNOWN\r\n"), iketcp),
			action: actionClear, replay: iketcp},
		{name: "proxy-stalled", rules: clear, trusted: true, in: []byte("PROXY TCP4 192.0.2.1"), timeout: true, refusal: refusalTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, chunked := range []bool{false, true} {
				var r io.Reader = bytes.NewReader(tc.in)
				if chunked {
					r = iotest.HalfReader(r)
				}
				if tc.timeout {
					r = timeoutReader{r}
				}
				v := tc.rules.decide(r, tc.trusted, make([]byte, 0, MaxSniff))
				if v.action != tc.action || v.action == actionRefuse && v.refusal != tc.refusal {
					t.Fatalf("chunked %v: action %d refusal %d (%s), want %d, %d", chunked, v.action, v.refusal, v.reason, tc.action, tc.refusal)
				}
				if v.action == actionRefuse {
					continue
				}
				remote := ""
				if v.remote != nil {
					remote = v.remote.String()
				}
				if remote != tc.remote {
					t.Errorf("remote %q, want %q", remote, tc.remote)
				}
				want := tc.replay
				if want == nil {
					want = tc.in
				}
				if !bytes.HasPrefix(want, v.replay) || len(v.replay) == 0 {
					t.Errorf("a replay of %d bytes, beginning %q, is not the beginning of what was sent after any header (%d bytes, beginning %q)",
						len(v.replay), v.replay[:min(len(v.replay), 16)], len(want), want[:min(len(want), 16)])
				}
			}
		})
	}
}

// FuzzDecide runs the front door's decision on arbitrary streams, whole or
// in pieces, trusted to carry a PROXY header or not. Invariants: it never
// panics, reads no more than MaxSniff bytes, replays exactly what it read
// after a header, and its decision fits the bytes.
func FuzzDecide(f *testing.F) {
	f.Add([]byte("IKETCP\x00\x0a"), false, uint8(0))
	f.Add(helloFor(f, "vpn.example.test", "iketcp"), false, uint8(1))
	f.Add(helloFor(f, "www.example.test"), false, uint8(2))
	f.Add(cat(proxyV1("192.0.2.1:1000", "192.0.2.2:443"), []byte("IKETCP")), true, uint8(0))
	f.Add(cat(proxyV2("[2001:db8::1]:1000", "[2001:db8::2]:443"), helloFor(f, "vpn.example.test")), true, uint8(1))
	f.Add([]byte("GET / HTTP/1.1\r\n"), false, uint8(0))
	f.Add([]byte(framing.ProxyV2Signature+"\x20\x00\x00\x00IKETCP"), true, uint8(2))
	r := rules{terminate: true, share: true, names: []string{"vpn.example.test"}, protocols: []string{"iketcp"}}
	f.Fuzz(func(t *testing.T, in []byte, trusted bool, mode uint8) {
		var rd io.Reader = bytes.NewReader(in)
		switch mode % 3 {
		case 1:
			rd = iotest.HalfReader(rd)
		case 2:
			rd = iotest.OneByteReader(rd)
		}
		counting := &countingReader{r: rd}
		v := r.decide(counting, trusted, make([]byte, 0, MaxSniff))
		if counting.n > MaxSniff {
			t.Fatalf("read %d bytes", counting.n)
		}
		if v.remote != nil && !trusted {
			t.Fatal("a client address from an untrusted source")
		}
		if v.action == actionRefuse {
			if v.reason == "" {
				t.Fatal("a refusal without a reason")
			}
			return
		}
		if len(v.replay) == 0 || !bytes.HasSuffix(in[:counting.n], v.replay) {
			t.Fatalf("replay %q is not the end of what was read, %q", v.replay, in[:counting.n])
		}
		if trusted != (len(v.replay) < counting.n) {
			t.Fatalf("trusted %v, but %d bytes of %d replayed", trusted, len(v.replay), counting.n)
		}
		switch o := framing.Sniff(v.replay); {
		case v.action == actionClear && o != framing.OpeningIKETCP,
			v.action == actionTLS && o != framing.OpeningTLS,
			v.action == actionShare && o != framing.OpeningTLS && o != framing.OpeningHTTP:
			t.Fatalf("action %d for a stream that begins %v", v.action, o)
		}
	})
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestDecideStopsAtTooManyReads(t *testing.T) {
	in := []byte("GET /" + strings.Repeat("a", 200) + " HTTP/1.1\r\n")
	r := rules{share: true}
	v := r.decide(iotest.OneByteReader(bytes.NewReader(in)), false, make([]byte, 0, MaxSniff))
	if v.action != actionRefuse || v.refusal != refusalUnrecognized || !strings.Contains(v.reason, "reads") {
		t.Fatalf("a stream trickled a byte a read: action %d refusal %d (%s)", v.action, v.refusal, v.reason)
	}
}

// TestConnReplay: the conn Accept returns replays the sniffed bytes, then
// reads the socket; its raw connection reports readable while the replay
// lasts, and waits on the socket after.
func TestConnReplay(t *testing.T) {
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	client, err := net.Dial("tcp", nl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := nl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c := newConn(server, nil, []byte("IKETCP"))
	defer c.Close()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	called := false
	if err := raw.Read(func(uintptr) bool { called = true; return true }); err != nil || called {
		t.Fatalf("raw Read with a replay pending: err %v, f called %v", err, called)
	}
	buf := make([]byte, 4)
	if n, _ := c.Read(buf); string(buf[:n]) != "IKET" {
		t.Fatalf("read %q", buf[:n])
	}
	if n, _ := c.Read(buf); string(buf[:n]) != "CP" {
		t.Fatalf("read %q", buf[:n])
	}
	// Drained: the raw connection waits on the socket (here until the
	// deadline).
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	err = raw.Read(func(uintptr) bool { return false })
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("raw Read on an idle socket: %v, want a timeout", err)
	}
	c.SetReadDeadline(time.Time{})
	client.Write([]byte("more"))
	if n, err := io.ReadFull(c, buf); n != 4 || string(buf) != "more" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	if _, ok := any(c).(syscall.Conn); !ok {
		t.Fatal("conn hides its socket")
	}
}
