// Package dial is how an iketcp client reaches its server: through an
// HTTP proxy (ViaHTTPProxy), and with TLS whose server certificate is
// checked by CA, name or pin (TLSConfig). Both plug into
// relay/streamlink's Dialer: its Dial hook opens the connection (through
// the proxy's tunnel), its TLS field runs TLS over it, and the IKETCP
// prefix goes inside TLS (RFC 9329's appendix).
//
//	d := streamlink.NewDialer(cfg)
//	d.Dial = dial.ViaHTTPProxy(proxyURL, dial.Direct(control)) // optional
//	d.TLS, err = dial.TLSConfig(dial.TLSOptions{CAFile: "ca.pem"})
//
// # What TLS checks, and what each option gives up
//
// TLS is 1.3 only: a server that offers nothing newer fails the handshake.
// The checks run in the configuration's VerifyConnection, so that each
// failure says which check failed and what to do, and matches one of
// ErrUnknownCA, ErrWrongName, ErrWrongPin or ErrBadCertificate with
// errors.Is.
//
//   - By default the server's certificate must chain to one of the
//     system's roots, be valid now and for TLS servers, and be for the
//     name checked: ServerName (--tls-server-name), or else the host the
//     client dials (a DNS name or an IP address).
//   - CAFile (--tls-ca) replaces the system's roots with the CAs of a PEM
//     bundle: only they may sign the server's certificate. The name is
//     checked as by default.
//   - Pin (--tls-pin) is the SHA-256 of the server certificate's
//     SubjectPublicKeyInfo, in hex: 64 hex digits, optionally after
//     "sha256:" (the form PinOf returns). A pin alone is the whole check:
//     the server must hold that key, and neither its chain, its name nor
//     its dates are checked, which is what a self-signed server needs.
//     With CAFile as well, all three checks apply: chain, name and pin.
//     The pin hashes the key, not the certificate, so it survives a
//     certificate renewed with the same key. PinOf computes it (and so
//     does openssl, below).
//   - Insecure (--tls-insecure) checks nothing. The traffic is hidden from
//     middleboxes, but anyone on the path can pose as the server; see
//     InsecureWarning, which the command logs. It cannot be combined with
//     CAFile or Pin.
//   - ClientCert and ClientKey (--tls-client-cert, --tls-client-key) are
//     the certificate the client presents when the server asks for one.
//     In TLS 1.3 a server that requires one and gets none refuses after
//     the client's side of the handshake is done: the link then fails on
//     its first read with "remote error: tls: certificate required".
//
// ServerName is also what the client sends as SNI (never an IP address).
//
// The pin of a server's certificate, with openssl:
//
//	openssl x509 -in server.pem -noout -pubkey | openssl pkey -pubin -outform der | openssl dgst -sha256
//
// # HTTP proxies
//
// ViaHTTPProxy opens connections through an http:// proxy with CONNECT,
// with Basic credentials taken from the URL's user info. The proxy sees
// the server's address and, without TLS, the whole stream; with TLS it
// sees the server's address and SNI only, and the certificate checks
// above run against the server, end to end through the tunnel. Proxies
// reached over TLS (https://) are not supported, and no proxy is taken
// from the environment (HTTP_PROXY and the like): only the one given.
package dial
