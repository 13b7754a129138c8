package dial

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/iketcp/iketcp/relay"
)

// DialFunc opens a connection as net.Dialer's DialContext does; it is the
// type of streamlink.Dialer's Dial hook.
type DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error)

// Direct returns a DialFunc that opens TCP connections itself, as
// streamlink's Dialer does without a Dial hook: with relay.TCPKeepAlive,
// and control applied to every socket (nil: none; transparent mode's
// bypass mark). It is the next hop to give ViaHTTPProxy.
func Direct(control func(network, address string, c syscall.RawConn) error) DialFunc {
	d := &net.Dialer{KeepAliveConfig: relay.TCPKeepAlive, Control: control}
	return d.DialContext
}

// maxProxyResponse bounds the size of a proxy's response to CONNECT: its
// status line and headers, and any 1xx responses before them.
const maxProxyResponse = 16 << 10

// ParseProxyURL parses an --http-proxy: http://[user:password@]host[:port],
// or host:port with http:// implied; the port defaults to 80. Its errors
// never show the password.
func ParseProxyURL(s string) (*url.URL, error) {
	if !strings.Contains(s, "://") {
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // without the URL and its password
		}
		return nil, fmt.Errorf("--http-proxy is not a URL like http://user:password@host:port: %w", err)
	}
	if _, err := proxyAddress(u); err != nil {
		return nil, err
	}
	return u, nil
}

// proxyAddress returns the host:port of a proxy URL, or why iketcp cannot
// use it.
func proxyAddress(u *url.URL) (string, error) {
	switch u.Scheme {
	case "http":
	case "https":
		return "", fmt.Errorf("--http-proxy %s: proxies reached over TLS (https://) are not supported: give the proxy as http://host:port (with --tls, the tunnel to the server is TLS inside it all the same)", u.Redacted())
	default:
		return "", fmt.Errorf("--http-proxy %s: only http:// proxies (HTTP CONNECT) are supported, not %s://", u.Redacted(), u.Scheme)
	}
	host := u.Hostname()
	if host == "" {
		return "", fmt.Errorf("--http-proxy %s names no host", u.Redacted())
	}
	port := u.Port()
	if port == "" {
		port = "80"
	}
	return net.JoinHostPort(host, port), nil
}

// ViaHTTPProxy returns a DialFunc that reaches addr through the HTTP proxy
// at proxyURL (an http:// URL, see ParseProxyURL): it opens a connection
// to the proxy with next (nil: Direct(nil)), asks for a tunnel with
// CONNECT, with Basic credentials if the URL has user info, and returns
// the tunnel. The proxy's response is bounded in size, and in time by
// ctx. A refusal is a *ProxyError. Bytes the proxy sends past its response
// are kept: the connection returned reads them first.
//
// For TLS to the server, set the streamlink Dialer's TLS as well: TLS runs
// inside the tunnel, end to end.
func ViaHTTPProxy(proxyURL *url.URL, next DialFunc) DialFunc {
	if next == nil {
		next = Direct(nil)
	}
	proxy, err := proxyAddress(proxyURL)
	if err != nil {
		return func(context.Context, string, string) (net.Conn, error) { return nil, err }
	}
	var auth string
	if proxyURL.User != nil {
		pass, _ := proxyURL.User.Password()
		auth = "Basic " + base64.StdEncoding.EncodeToString([]byte(proxyURL.User.Username()+":"+pass))
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		switch network {
		case "tcp", "tcp4", "tcp6":
		default:
			return nil, fmt.Errorf("an HTTP proxy carries TCP, not %s", network)
		}
		nc, err := next(ctx, "tcp", proxy)
		if err != nil {
			return nil, fmt.Errorf("connecting to the HTTP proxy %s: %w", proxy, err)
		}
		c, err := connect(ctx, nc, addr, auth)
		if err != nil {
			nc.Close()
			var pe *ProxyError
			if errors.As(err, &pe) {
				return nil, err
			}
			return nil, fmt.Errorf("CONNECT %s through the HTTP proxy %s: %w", addr, proxy, err)
		}
		return c, nil
	}
}

// connect asks the proxy at the other end of nc for a tunnel to addr,
// within ctx.
func connect(ctx context.Context, nc net.Conn, addr, auth string) (net.Conn, error) {
	if d, ok := ctx.Deadline(); ok {
		nc.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	c, err := connectConn(nc, addr, auth)
	if !stop() {
		// ctx ended: nc's deadline is past, or about to be.
		return nil, context.Cause(ctx)
	}
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("the proxy did not answer in time: %w", err)
		}
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	return c, nil
}

// connectConn sends CONNECT and reads the proxy's response.
func connectConn(nc net.Conn, addr, auth string) (net.Conn, error) {
	var req strings.Builder
	req.WriteString("CONNECT " + addr + " HTTP/1.1\r\nHost: " + addr + "\r\n")
	if auth != "" {
		req.WriteString("Proxy-Authorization: " + auth + "\r\n")
	}
	req.WriteString("\r\n")
	if _, err := io.WriteString(nc, req.String()); err != nil {
		return nil, fmt.Errorf("sending CONNECT: %w", err)
	}
	lr := &io.LimitedReader{R: nc, N: maxProxyResponse}
	br := bufio.NewReaderSize(lr, 4096)
	code, status, h, err := readResponse(br)
	if err != nil {
		if lr.N == 0 {
			return nil, fmt.Errorf("the proxy's response to CONNECT is longer than %d bytes", maxProxyResponse)
		}
		return nil, err
	}
	if code/100 != 2 {
		return nil, &ProxyError{Addr: addr, StatusCode: code, Status: status, authenticate: h.Values("Proxy-Authenticate"), hasAuth: auth != ""}
	}
	// A 2xx response to CONNECT has no body (RFC 9110 9.3.6): whatever
	// follows it is the tunnel's.
	if n := br.Buffered(); n > 0 {
		early, _ := br.Peek(n)
		return &earlyConn{Conn: nc, early: append([]byte(nil), early...)}, nil
	}
	return nc, nil
}

// readResponse reads an HTTP/1.x response's status line and headers,
// skipping 1xx responses: its code, its status ("407 Proxy Authentication
// Required", printable) and its headers.
func readResponse(br *bufio.Reader) (int, string, textproto.MIMEHeader, error) {
	tp := textproto.NewReader(br)
	for {
		line, err := tp.ReadLine()
		if err != nil {
			if err == io.EOF {
				return 0, "", nil, errors.New("the proxy closed the connection without answering CONNECT")
			}
			return 0, "", nil, fmt.Errorf("reading the proxy's response to CONNECT: %w", err)
		}
		proto, rest, _ := strings.Cut(line, " ")
		codeText, reason, _ := strings.Cut(rest, " ")
		code, err := strconv.Atoi(codeText)
		if !strings.HasPrefix(proto, "HTTP/1.") || len(codeText) != 3 || err != nil || code < 100 {
			return 0, "", nil, fmt.Errorf("the proxy's response to CONNECT is not HTTP/1.x: %s (is --http-proxy an HTTP proxy?)", printable(line))
		}
		h, err := tp.ReadMIMEHeader()
		if err != nil {
			return 0, "", nil, fmt.Errorf("reading the headers of the proxy's response to CONNECT: %w", err)
		}
		if code >= 200 {
			return code, printable(strings.TrimSpace(codeText + " " + reason)), h, nil
		}
	}
}

// printable returns s, quoted if it holds anything but printable
// characters, and cut short if long: text from a proxy, for a log line.
func printable(s string) string {
	const most = 200
	if len(s) > most {
		s = s[:most] + "..."
	}
	if !utf8.ValidString(s) {
		return strconv.Quote(s)
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

// ProxyError is a proxy's refusal of CONNECT: a response other than 2xx.
// Its message has the status line and what to do.
type ProxyError struct {
	Addr       string // what the client asked for, host:port
	StatusCode int    // 407
	Status     string // "407 Proxy Authentication Required"

	authenticate []string // Proxy-Authenticate headers: the schemes it offers
	hasAuth      bool     // the proxy URL had credentials
}

func (e *ProxyError) Error() string {
	msg := fmt.Sprintf("the proxy refused CONNECT to %s: %s", e.Addr, e.Status)
	if hint := e.hint(); hint != "" {
		msg += ": " + hint
	}
	return msg
}

func (e *ProxyError) hint() string {
	switch e.StatusCode {
	case 407:
		if len(e.authenticate) > 0 && !e.offersBasic() {
			return fmt.Sprintf("the proxy asks for %s, and iketcp speaks only Basic authentication", printable(strings.Join(e.authenticate, ", ")))
		}
		if !e.hasAuth {
			return "the proxy wants credentials: give them in --http-proxy as http://user:password@host:port"
		}
		return "check the credentials in --http-proxy"
	case 403:
		return "the proxy does not let this client reach that address (many allow CONNECT to port 443 only)"
	case 400, 405, 501:
		return "the proxy does not support CONNECT tunnels"
	case 502, 503, 504:
		return "the proxy could not reach the server: check the server's address, and the proxy's own network"
	}
	return ""
}

func (e *ProxyError) offersBasic() bool {
	for _, a := range e.authenticate {
		scheme, _, _ := strings.Cut(strings.TrimSpace(a), " ")
		if strings.EqualFold(scheme, "Basic") {
			return true
		}
	}
	return false
}

// earlyConn is a tunnel whose first bytes the proxy sent along with its
// response: Read returns them first. It is no syscall.Conn (waiting for
// the socket to become readable would miss them), so a streamlink link
// over it keeps its read buffer while idle; tunnels without early bytes,
// the usual case, are the proxy's connection itself.
type earlyConn struct {
	net.Conn
	early []byte
}

func (c *earlyConn) Read(p []byte) (int, error) {
	if len(c.early) > 0 {
		n := copy(p, c.early)
		c.early = c.early[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}
