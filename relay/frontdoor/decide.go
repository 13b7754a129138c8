package frontdoor

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/iketcp/iketcp/framing"
)

// maxSniffReads bounds the reads before a decision: a client sends its
// first flight in a few segments, and a stream trickled a byte at a time
// must not make the front door rescan its buffer thousands of times.
const maxSniffReads = 64

// Sizes of PROXY protocol headers (haproxy's proxy-protocol.txt).
const (
	proxyV1Max   = 107 // the longest version 1 line, CRLF included
	proxyV2Fixed = 16  // a version 2 header before its addresses and TLVs
)

// rules is what decides a connection: the parts of a Config that do,
// fixed when the listener starts.
type rules struct {
	proxyFrom  []netip.Prefix
	requireTLS bool
	terminate  bool // a certificate is configured
	share      bool // a share backend is configured
	names      []string
	protocols  []string
}

func newRules(cfg *Config) rules {
	return rules{
		proxyFrom:  slices.Clone(cfg.ProxyFrom),
		requireTLS: cfg.RequireTLS,
		terminate:  cfg.Certificate != nil,
		share:      cfg.ShareBackend != "",
		names:      slices.Clone(cfg.ServerNames),
		protocols:  slices.Clone(cfg.Protocols),
	}
}

// trusted reports whether a connection from ap must begin with a PROXY
// header.
func (r *rules) trusted(ap netip.AddrPort) bool {
	a := ap.Addr().Unmap()
	for _, p := range r.proxyFrom {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// ours reports whether a ClientHello is for iketcp.
func (r *rules) ours(h hello) bool {
	switch {
	case !r.terminate:
		return false
	case slices.ContainsFunc(h.protocols, func(p string) bool { return slices.Contains(r.protocols, p) }):
		return true
	case h.serverName == "" || len(r.names) == 0:
		return !r.share
	}
	return matchName(r.names, h.serverName)
}

// matchName reports whether name is one of names, without regard to case
// or a trailing dot; "*.example.com" stands for one label and the rest.
func matchName(names []string, name string) bool {
	name = strings.TrimSuffix(name, ".")
	for _, n := range names {
		n = strings.TrimSuffix(n, ".")
		if strings.EqualFold(n, name) {
			return true
		}
		if rest, ok := strings.CutPrefix(n, "*."); ok {
			if i := strings.IndexByte(name, '.'); i > 0 && strings.EqualFold(name[i+1:], rest) {
				return true
			}
		}
	}
	return false
}

// action is what the front door does with a connection.
type action uint8

const (
	actionRefuse action = iota // close it
	actionClear                // hand it to Accept as it is
	actionTLS                  // terminate TLS, then hand it to Accept
	actionShare                // splice it to the share backend
)

// refusal says why a connection is refused, and so what counts it.
type refusal uint8

const (
	refusalSilent       refusal = iota // closed or failed before sending a byte: not counted
	refusalProxy                       // proxy_refused
	refusalClear                       // clear_refused
	refusalTimeout                     // prefix_timeouts
	refusalUnrecognized                // unrecognized
)

// verdict is what the front door decided about a connection.
type verdict struct {
	action  action
	refusal refusal  // for actionRefuse
	reason  string   // for actionRefuse: why, for the log
	remote  net.Addr // the client a PROXY header named; nil: the connection's own address
	replay  []byte   // what was read after any PROXY header, aliasing the buffer decide was given
	hello   hello    // for TLS: what the ClientHello asked for
}

// hello is what a ClientHello asked for.
type hello struct {
	serverName string
	protocols  []string
}

// decide reads from nc, into buf (of capacity MaxSniff or less), until it
// knows what nc is. The caller bounds its time with a deadline.
func (r *rules) decide(nc io.Reader, trusted bool, buf []byte) verdict {
	s := &sniffer{r: nc, buf: buf[:0]}
	var v verdict
	off := 0
	if trusted {
		n, remote, err := s.proxyHeader()
		if err != nil {
			return s.refused(refusalProxy, err)
		}
		off, v.remote, s.remote = n, remote, remote
	}
	o, err := s.opening(off)
	if err != nil {
		return s.refused(refusalUnrecognized, err)
	}
	switch o {
	case framing.OpeningProxyV1, framing.OpeningProxyV2:
		if trusted {
			return s.refused(refusalProxy, errors.New("a second PROXY header"))
		}
		return s.refused(refusalProxy, errors.New("a PROXY header from a source not trusted to send one"))
	case framing.OpeningIKETCP:
		if r.requireTLS {
			return s.refused(refusalClear, errors.New("IKETCP in clear"))
		}
		v.action = actionClear
	case framing.OpeningTLS:
		v.action = actionShare
		if !r.terminate {
			break
		}
		// A ClientHello that crypto/tls cannot parse is somebody else's
		// TLS, as much as one for another name.
		switch h, err := s.peekHello(off); {
		case err == nil:
			v.hello = h
			if r.ours(h) {
				v.action = actionTLS
			}
		case err == s.err:
			return s.refused(refusalUnrecognized, err)
		}
	case framing.OpeningHTTP:
		v.action = actionShare
	default:
		return s.refused(refusalUnrecognized, fmt.Errorf("begins with neither IKETCP, TLS nor HTTP (%q)", s.buf[off:min(len(s.buf), off+8)]))
	}
	if v.action == actionShare && !r.share {
		what := "HTTP"
		switch {
		case o == framing.OpeningTLS && v.hello.serverName != "":
			what = fmt.Sprintf("TLS for server name %q", v.hello.serverName)
		case o == framing.OpeningTLS:
			what = "TLS not for iketcp"
		}
		return s.refused(refusalUnrecognized, errors.New(what+", and no share backend"))
	}
	v.replay = s.buf[off:]
	return v
}

// sniffer reads a connection's first bytes into a buffer of fixed
// capacity.
type sniffer struct {
	r      io.Reader
	buf    []byte
	reads  int
	err    error    // the error that ended reading
	remote net.Addr // the client a PROXY header named, for a refusal's log
}

var (
	errTooLong       = fmt.Errorf("nothing recognizable in the first %d bytes", MaxSniff)
	errTooFragmented = fmt.Errorf("nothing recognizable in %d reads", maxSniffReads)
)

// fill reads once more.
func (s *sniffer) fill() error {
	if s.err != nil {
		return s.err
	}
	switch {
	case len(s.buf) == cap(s.buf):
		s.err = errTooLong
	case s.reads == maxSniffReads:
		s.err = errTooFragmented
	default:
		s.reads++
		n, err := s.r.Read(s.buf[len(s.buf):cap(s.buf)])
		s.buf = s.buf[:len(s.buf)+n]
		if n > 0 || err == nil {
			return nil
		}
		s.err = err
	}
	return s.err
}

// refused is the verdict on a connection refused for err. A read error
// decides the count instead of why: a timeout is a prefix timeout, and a
// connection that ended before sending a byte is not counted.
func (s *sniffer) refused(why refusal, err error) verdict {
	var ne net.Error
	switch {
	case err == s.err && errors.As(err, &ne) && ne.Timeout():
		why = refusalTimeout
		err = errors.New("nothing recognizable within the deadline")
	case err == s.err && len(s.buf) == 0:
		why = refusalSilent
		if err == io.EOF {
			err = errors.New("closed before sending anything")
		}
	case err == s.err && err == io.EOF:
		err = fmt.Errorf("closed after %d bytes, before it could be recognized", len(s.buf))
	}
	return verdict{action: actionRefuse, refusal: why, reason: err.Error(), remote: s.remote}
}

// opening reads until framing.Sniff decides what the bytes from off on
// are.
func (s *sniffer) opening(off int) (framing.Opening, error) {
	for {
		if o := framing.Sniff(s.buf[off:]); o != framing.OpeningMore {
			return o, nil
		}
		if err := s.fill(); err != nil {
			return framing.OpeningMore, err
		}
	}
}

var errNoProxyHeader = errors.New("no PROXY header from a source trusted to send one")

// proxyHeader reads a PROXY protocol header and returns its length and the
// client it names (nil for a LOCAL header: a proxy's own connection).
// A header may arrive in pieces, within the deadline and the budget; the
// bytes are parsed by go-proxyproto once they are all here.
func (s *sniffer) proxyHeader() (int, net.Addr, error) {
	var n int
	for n == 0 {
		switch framing.Sniff(s.buf) {
		case framing.OpeningProxyV1:
			if i := bytes.IndexByte(s.buf[:min(len(s.buf), proxyV1Max)], '\n'); i >= 0 {
				n = i + 1
			} else if len(s.buf) >= proxyV1Max {
				return 0, nil, errors.New("a PROXY v1 header longer than 107 bytes")
			}
		case framing.OpeningProxyV2:
			if len(s.buf) < proxyV2Fixed {
				break
			}
			length := binary.BigEndian.Uint16(s.buf[14:16])
			if length > proxyproto.MaxV2HeaderSize {
				return 0, nil, fmt.Errorf("a PROXY v2 header of %d bytes", proxyV2Fixed+int(length))
			}
			if len(s.buf) >= proxyV2Fixed+int(length) {
				n = proxyV2Fixed + int(length)
			}
		case framing.OpeningMore:
		default:
			return 0, nil, errNoProxyHeader
		}
		if n > 0 {
			break
		}
		if err := s.fill(); err != nil {
			return 0, nil, err
		}
	}
	// The whole header is buffered, so the reader proxyproto.Read parses
	// from hands it over in one read, as its version 1 parser requires.
	h, err := proxyproto.Read(bufio.NewReaderSize(bytes.NewReader(s.buf[:n]), max(n, 16)))
	if err != nil {
		return 0, nil, fmt.Errorf("an invalid PROXY header: %w", err)
	}
	if h.Command.IsLocal() {
		return n, nil, nil
	}
	src, _, ok := h.TCPAddrs()
	if !ok || src.IP == nil {
		return 0, nil, fmt.Errorf("a PROXY header for a %v connection, not TCP", h.TransportProtocol)
	}
	return n, src, nil
}

// errPeeked ends a handshake once it has shown its ClientHello.
var errPeeked = errors.New("ClientHello peeked")

// peekHello reads the ClientHello that begins at off and says what it asks
// for, without answering it: crypto/tls parses it through a recorder that
// reads into the sniffer's buffer and writes nothing.
func (s *sniffer) peekHello(off int) (hello, error) {
	var h hello
	rec := &recorder{s: s, pos: off}
	cfg := &tls.Config{GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
		h = hello{serverName: chi.ServerName, protocols: slices.Clone(chi.SupportedProtos)}
		if h.protocols == nil {
			h.protocols = []string{}
		}
		return nil, errPeeked
	}}
	err := tls.Server(rec, cfg).Handshake()
	switch {
	case h.protocols != nil:
		return h, nil
	case s.err != nil:
		return h, s.err
	}
	return h, fmt.Errorf("a ClientHello that does not parse: %w", err)
}

// recorder is a read-only net.Conn over a sniffer: what crypto/tls reads
// stays in the sniffer's buffer, to be replayed.
type recorder struct {
	s   *sniffer
	pos int
}

func (r *recorder) Read(p []byte) (int, error) {
	for r.pos == len(r.s.buf) {
		if err := r.s.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.s.buf[r.pos:])
	r.pos += n
	return n, nil
}

var errReadOnly = errors.New("the front door does not answer while it looks")

func (r *recorder) Write([]byte) (int, error)        { return 0, errReadOnly }
func (r *recorder) Close() error                     { return nil }
func (r *recorder) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (r *recorder) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (r *recorder) SetDeadline(time.Time) error      { return nil }
func (r *recorder) SetReadDeadline(time.Time) error  { return nil }
func (r *recorder) SetWriteDeadline(time.Time) error { return nil }
