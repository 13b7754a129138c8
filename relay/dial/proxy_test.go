package dial_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/dial"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// proxy is an HTTP CONNECT proxy on loopback, for tests.
type proxy struct {
	user, pass string // credentials it requires; "": none
	answer     string // if set, its whole answer to CONNECT, instead of a tunnel
	early      string // bytes it sends right behind its 200, in the same write
	silent     bool   // it never answers
	hangUp     bool   // it closes without answering

	ln net.Listener
	wg sync.WaitGroup

	mu       sync.Mutex // guards the following
	conns    []net.Conn
	requests []*http.Request
}

// start runs p on loopback until the test ends, and returns its URL with
// the given user info (nil: none).
func (p *proxy) start(t *testing.T, user *url.Userinfo) *url.URL {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.ln = ln
	p.wg.Add(1)
	go p.acceptConns()
	t.Cleanup(p.close)
	return &url.URL{Scheme: "http", Host: ln.Addr().String(), User: user}
}

func (p *proxy) acceptConns() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.track(c)
		p.wg.Add(1)
		go p.serveConn(c)
	}
}

func (p *proxy) track(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.conns = append(p.conns, c)
}

func (p *proxy) close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// serveConn answers one CONNECT and relays the tunnel.
func (p *proxy) serveConn(c net.Conn) {
	defer p.wg.Done()
	defer c.Close()
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	p.mu.Lock()
	p.requests = append(p.requests, req)
	p.mu.Unlock()
	switch {
	case p.silent:
		io.Copy(io.Discard, br)
		return
	case p.hangUp:
		return
	case req.Method != http.MethodConnect:
		io.WriteString(c, "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
		return
	case p.user != "" && req.Header.Get("Proxy-Authorization") != "Basic "+base64.StdEncoding.EncodeToString([]byte(p.user+":"+p.pass)):
		io.WriteString(c, "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Type: text/html\r\nContent-Length: 23\r\n\r\n<h1>who are you?</h1>\r\n")
		return
	case p.answer != "":
		io.WriteString(c, p.answer)
		return
	}
	target, err := net.Dial("tcp", req.RequestURI)
	if err != nil {
		io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
		return
	}
	p.track(target)
	defer target.Close()
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n"+p.early); err != nil {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		io.Copy(target, br)
		target.(*net.TCPConn).CloseWrite()
	}()
	io.Copy(c, target)
}

// request returns the k-th request the proxy read.
func (p *proxy) request(t *testing.T, k int) *http.Request {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if k >= len(p.requests) {
		t.Fatalf("the proxy read %d requests; want %d", len(p.requests), k+1)
	}
	return p.requests[k]
}

// echoServer echoes what each connection sends, after a greeting if one
// is given, on loopback until the test ends.
func echoServer(t *testing.T, greeting string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				io.WriteString(c, greeting)
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func dialVia(t *testing.T, proxyURL *url.URL, addr string) (net.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := dial.ViaHTTPProxy(proxyURL, nil)(ctx, "tcp", addr)
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// expectRead reads len(want) bytes from c and compares.
func expectRead(t *testing.T, c net.Conn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
		t.Fatalf("read %q, %v; want %q", got, err, want)
	}
}

// TestProxyReachesTarget: the dialer asks for the target with CONNECT and
// Host, and the tunnel carries both ways.
func TestProxyReachesTarget(t *testing.T) {
	target := echoServer(t, "")
	p := &proxy{}
	c, err := dialVia(t, p.start(t, nil), target)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	expectRead(t, c, "ping")
	req := p.request(t, 0)
	if req.Method != http.MethodConnect || req.RequestURI != target || req.Host != target || req.Header.Get("Proxy-Authorization") != "" {
		t.Fatalf("the proxy read %s %s, Host %s, headers %v", req.Method, req.RequestURI, req.Host, req.Header)
	}
}

// TestProxyAuth: without credentials, or with wrong ones, the proxy's 407
// comes back with what to do; right ones open the tunnel.
func TestProxyAuth(t *testing.T) {
	target := echoServer(t, "")
	p := &proxy{user: "alice", pass: "s3cret:x"}
	u := p.start(t, nil)
	with := func(user *url.Userinfo) *url.URL {
		u := *u
		u.User = user
		return &u
	}
	for _, tc := range []struct {
		name string
		user *url.Userinfo
		msg  string // "": works
	}{
		{"none", nil, "the proxy refused CONNECT to " + target + ": 407 Proxy Authentication Required: the proxy wants credentials: give them in --http-proxy as http://user:password@host:port"},
		{"wrong", url.UserPassword("alice", "guess"), "the proxy refused CONNECT to " + target + ": 407 Proxy Authentication Required: check the credentials in --http-proxy"},
		{"right", url.UserPassword("alice", "s3cret:x"), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := dialVia(t, with(tc.user), target)
			if tc.msg == "" {
				if err != nil {
					t.Fatal(err)
				}
				io.WriteString(c, "ping")
				expectRead(t, c, "ping")
				return
			}
			var pe *dial.ProxyError
			if !errors.As(err, &pe) || pe.StatusCode != 407 || err.Error() != tc.msg {
				t.Fatalf("err = %v; want %s", err, tc.msg)
			}
			if strings.Contains(err.Error(), "guess") {
				t.Fatalf("error %q shows the password", err)
			}
		})
	}
}

// TestProxyEarlyBytes: bytes the proxy sends in the same segment as its
// 200, and a target's greeting, reach the reader in order.
func TestProxyEarlyBytes(t *testing.T) {
	target := echoServer(t, "hello from the target;")
	p := &proxy{early: "early bytes;"}
	c, err := dialVia(t, p.start(t, nil), target)
	if err != nil {
		t.Fatal(err)
	}
	expectRead(t, c, "early bytes;hello from the target;")
	io.WriteString(c, "ping")
	expectRead(t, c, "ping")
}

// TestProxyRefusals: what the dialer makes of answers other than a
// tunnel.
func TestProxyRefusals(t *testing.T) {
	target := echoServer(t, "")
	for _, tc := range []struct {
		answer string
		code   int // a *ProxyError's; 0: another error
		msg    string
	}{
		{"HTTP/1.1 403 Forbidden\r\n\r\n", 403, "403 Forbidden: the proxy does not let this client reach that address"},
		{"HTTP/1.0 502 Bad Gateway\r\nContent-Length: 5\r\n\r\nnope\n", 502, "502 Bad Gateway: the proxy could not reach the server"},
		{"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\nProxy-Authenticate: NTLM\r\n\r\n", 407, "the proxy asks for Negotiate, NTLM, and iketcp speaks only Basic"},
		{"HTTP/1.1 599\r\n\r\n", 599, "the proxy refused CONNECT to " + target + ": 599"},
		{"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 418 I'm a teapot\r\n\r\n", 418, "418 I'm a teapot"},
		{"SSH-2.0-OpenSSH_9.2\r\n", 0, `not HTTP/1.x: SSH-2.0-OpenSSH_9.2 (is --http-proxy an HTTP proxy?)`},
		{"HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", 20<<10) + "\r\n\r\n", 0, "longer than 16384 bytes"},
		{"HTTP/1.1 200 OK\r\n", 0, "reading the headers of the proxy's response to CONNECT"},
		{"", 0, "the proxy closed the connection without answering CONNECT"},
	} {
		t.Run(tc.msg, func(t *testing.T) {
			p := &proxy{answer: tc.answer, hangUp: tc.answer == ""}
			_, err := dialVia(t, p.start(t, nil), target)
			if err == nil {
				t.Fatal("dial worked")
			}
			var pe *dial.ProxyError
			if errors.As(err, &pe) != (tc.code != 0) || tc.code != 0 && pe.StatusCode != tc.code || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v; want %d, %q", err, tc.code, tc.msg)
			}
		})
	}
}

// TestProxySilent: a proxy that never answers holds the dial no longer
// than its context.
func TestProxySilent(t *testing.T) {
	p := &proxy{silent: true}
	u := p.start(t, nil)
	t.Run("cancel", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(100*time.Millisecond, cancel)
		_, err := dial.ViaHTTPProxy(u, nil)(ctx, "tcp", "192.0.2.1:443")
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v; want context.Canceled", err)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := dial.ViaHTTPProxy(u, nil)(ctx, "tcp", "192.0.2.1:443")
		if err == nil || time.Since(start) > 3*time.Second {
			t.Fatalf("err = %v after %v; want a timeout after 100ms", err, time.Since(start))
		}
		t.Logf("error: %v", err)
	})
}

// TestProxyTLS: a streamlink Dialer through the proxy runs TLS with the
// iketcp server inside the tunnel, end to end: the server's certificate
// is checked, and the server reads the prefix inside TLS.
func TestProxyTLS(t *testing.T) {
	ca := newAuthority(t, "Test CA")
	srv := ca.issue(t, leaf{cn: "vpn.test", dns: []string{"vpn.test"}, ips: []net.IP{net.IPv4(127, 0, 0, 1)}})
	addr, results := tlsServer(t, &tls.Config{Certificates: []tls.Certificate{srv.tls}})
	p := &proxy{user: "alice", pass: "s3cret"}
	u := p.start(t, url.UserPassword("alice", "s3cret"))

	for _, tc := range []struct {
		name string
		opts dial.TLSOptions
		err  error
	}{
		{"CA", dial.TLSOptions{CAFile: ca.file}, nil},
		{"wrong name", dial.TLSOptions{CAFile: ca.file, ServerName: "other.test"}, dial.ErrWrongName},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := dial.TLSConfig(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			d := streamlink.NewDialer(streamlink.Config{})
			d.Dial = dial.ViaHTTPProxy(u, dial.Direct(nil))
			d.TLS = cfg
			_, err = dialLink(t, d, addr)
			s := next(t, results)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v; want %v", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.err != nil || s.prefix != framing.Prefix {
				t.Fatalf("the server read %q inside TLS, err %v", s.prefix, s.err)
			}
		})
	}
	if req := p.request(t, 0); req.RequestURI != addr {
		t.Fatalf("the proxy was asked for %s; want %s", req.RequestURI, addr)
	}
}

func TestParseProxyURL(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // the URL; "": an error
		msg  string // in the error
	}{
		{"proxy.example:3128", "http://proxy.example:3128", ""},
		{"http://proxy.example", "http://proxy.example", ""},
		{"http://alice:s3cret@[2001:db8::1]:8080", "http://alice:s3cret@[2001:db8::1]:8080", ""},
		{"https://proxy.example:443", "", "proxies reached over TLS (https://) are not supported"},
		{"socks5://proxy.example:1080", "", "only http:// proxies (HTTP CONNECT) are supported, not socks5://"},
		{"http://:3128", "", "names no host"},
		{"http://alice:s3cret@proxy.example:port", "", "not a URL"},
		{"https://alice:s3cret@proxy.example", "", "alice:xxxxx@"},
	} {
		u, err := dial.ParseProxyURL(tc.in)
		switch {
		case tc.want != "" && (err != nil || u.String() != tc.want):
			t.Errorf("ParseProxyURL(%q) = %v, %v; want %s", tc.in, u, err, tc.want)
		case tc.want == "" && (err == nil || !strings.Contains(err.Error(), tc.msg)):
			t.Errorf("ParseProxyURL(%q) = %v, %v; want an error saying %q", tc.in, u, err, tc.msg)
		case err != nil && strings.Contains(err.Error(), "s3cret"):
			t.Errorf("ParseProxyURL(%q): error %q shows the password", tc.in, err)
		}
	}
	// The dialer refuses such URLs too, on every dial.
	_, err := dial.ViaHTTPProxy(&url.URL{Scheme: "https", Host: "proxy.example"}, nil)(context.Background(), "tcp", "192.0.2.1:443")
	if err == nil || !strings.Contains(err.Error(), "https://") {
		t.Fatalf("dial via an https proxy: %v", err)
	}
}
