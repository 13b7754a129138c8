package framing

// Opening says what a stream's first bytes are, as a server's front door
// sees them before it decides who gets the connection.
type Opening uint8

// Openings.
const (
	// OpeningMore: not decided yet; read more.
	OpeningMore Opening = iota
	// OpeningIKETCP: the RFC 9329 prefix, in clear.
	OpeningIKETCP
	// OpeningTLS: a TLS handshake record that carries a ClientHello.
	OpeningTLS
	// OpeningHTTP: an HTTP/1 request line (or HTTP/2's preface, whose
	// first line has the same form).
	OpeningHTTP
	// OpeningProxyV1: a PROXY protocol version 1 header ("PROXY ").
	OpeningProxyV1
	// OpeningProxyV2: the signature of a PROXY protocol version 2 header.
	OpeningProxyV2
	// OpeningOther: none of these.
	OpeningOther
)

var openingNames = [...]string{"more", "IKETCP", "TLS", "HTTP", "PROXY v1", "PROXY v2", "other"}

func (o Opening) String() string {
	if int(o) < len(openingNames) {
		return openingNames[o]
	}
	return "invalid"
}

// ProxyV1Signature and ProxyV2Signature begin PROXY protocol headers
// (haproxy's proxy-protocol.txt, sections 2.1 and 2.2).
const (
	ProxyV1Signature = "PROXY "
	ProxyV2Signature = "\r\n\r\n\x00\r\nQUIT\n"
)

// Bounds of an HTTP request line's method, as Sniff accepts it: the
// registered methods are 3 to 17 upper-case letters, some with a hyphen.
const (
	minMethod = 3
	maxMethod = 24
)

// maxTLSRecord is the largest TLS plaintext record (RFC 8446 5.1).
const maxTLSRecord = 1 << 14

// match is how one candidate opening fits the bytes so far.
type match uint8

const (
	no match = iota
	more
	yes
)

// Sniff says what a stream that begins with b is. Its answer is final as
// soon as it is not OpeningMore: no bytes that follow can change it, so a
// caller reads until it is. The caller bounds how much it reads: an HTTP
// request line is OpeningMore until its end. Sniff does not allocate.
func Sniff(b []byte) Opening {
	// The candidates, in an order in which none can still be undecided
	// when a later one matches: what matches early comes first.
	candidates := [...]struct {
		o Opening
		m match
	}{
		{OpeningIKETCP, literal(b, Prefix)},
		{OpeningTLS, sniffTLS(b)},
		{OpeningProxyV2, literal(b, ProxyV2Signature)},
		{OpeningProxyV1, literal(b, ProxyV1Signature)},
		{OpeningHTTP, sniffHTTP(b)},
	}
	undecided := false
	for _, c := range candidates {
		switch c.m {
		case yes:
			return c.o
		case more:
			undecided = true
		}
	}
	if undecided {
		return OpeningMore
	}
	return OpeningOther
}

// literal matches b against a fixed opening.
func literal(b []byte, lit string) match {
	n := min(len(b), len(lit))
	if string(b[:n]) != lit[:n] {
		return no
	}
	if n < len(lit) {
		return more
	}
	return yes
}

// sniffTLS matches a TLS record header of type handshake (22), legacy
// version 3.0 to 3.4, a length a plaintext record can have, and a first
// handshake message of type ClientHello (1).
func sniffTLS(b []byte) match {
	switch {
	case len(b) < 1:
		return more
	case b[0] != 22:
		return no
	case len(b) < 2:
		return more
	case b[1] != 3:
		return no
	case len(b) < 3:
		return more
	case b[2] > 4:
		return no
	case len(b) < 5:
		return more
	}
	switch n := int(b[3])<<8 | int(b[4]); {
	case n < 4 || n > maxTLSRecord:
		return no
	case len(b) < 6:
		return more
	case b[5] != 1:
		return no
	}
	return yes
}

// sniffHTTP matches an HTTP/1 request line (RFC 9112 3): a method of
// upper-case letters, '-' or '_', a space, a request target of visible
// characters, a space, HTTP/d.d and the end of the line (CRLF, or a bare
// LF, which RFC 9112 2.2 lets a recipient accept).
func sniffHTTP(b []byte) match {
	i := 0
	for ; i < len(b) && i <= maxMethod; i++ {
		c := b[i]
		if c == ' ' {
			break
		}
		if !('A' <= c && c <= 'Z' || c == '-' || c == '_') {
			return no
		}
	}
	switch {
	case i == len(b):
		return more
	case i < minMethod || i > maxMethod:
		return no
	}
	i++ // the space
	target := i
	for ; i < len(b) && b[i] != ' '; i++ {
		if b[i] <= ' ' || b[i] >= 0x7f {
			return no
		}
	}
	switch {
	case i == len(b):
		return more
	case i == target:
		return no
	}
	i++ // the space
	const version = "HTTP/d.d"
	for k := range len(version) {
		if i == len(b) {
			return more
		}
		c := b[i]
		if version[k] == 'd' {
			if c < '0' || c > '9' {
				return no
			}
		} else if c != version[k] {
			return no
		}
		i++
	}
	if i == len(b) {
		return more
	}
	if b[i] == '\n' {
		return yes
	}
	if b[i] != '\r' {
		return no
	}
	if i+1 == len(b) {
		return more
	}
	if b[i+1] == '\n' {
		return yes
	}
	return no
}
