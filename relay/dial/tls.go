package dial

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
)

// InsecureWarning is what the command logs, loudly, when TLS runs with
// TLSOptions.Insecure: what the client gives up.
const InsecureWarning = "--tls-insecure: the server's TLS certificate is not checked at all: " +
	"anyone on the path can pose as the server, see the tunnel's traffic (IKE and ESP, which IPsec still protects) " +
	"and claim the client's sessions; TLS then only hides the traffic from middleboxes. " +
	"Outside a lab, check the server with --tls-ca or --tls-pin"

// The checks of the server's certificate, one sentinel each: a failed
// check's error matches its sentinel with errors.Is, and its message says
// what to do.
var (
	// ErrUnknownCA: the certificate is not signed by a CA in --tls-ca, or
	// in the system's roots without it.
	ErrUnknownCA = errors.New("the server's certificate is not signed by a trusted CA")
	// ErrWrongName: the certificate is not for the name checked.
	ErrWrongName = errors.New("the server's certificate is for another name")
	// ErrWrongPin: the certificate's key does not hash to --tls-pin.
	ErrWrongPin = errors.New("the server's certificate key does not match --tls-pin")
	// ErrBadCertificate: the chain is signed by a trusted CA but is not
	// valid: expired, not yet valid, not for TLS servers.
	ErrBadCertificate = errors.New("the server's certificate is not valid")
)

// TLSOptions says how a client checks its server's TLS certificate (see
// the package doc). The zero value checks it against the system's roots
// for the host the client dials.
type TLSOptions struct {
	// ServerName (--tls-server-name) is the name the certificate must be
	// for, and the SNI sent; "" means the host the client dials.
	ServerName string
	// CAFile (--tls-ca) is a PEM bundle of the CAs that may sign the
	// certificate, in place of the system's roots.
	CAFile string
	// Pin (--tls-pin) is the SHA-256 of the certificate's
	// SubjectPublicKeyInfo in hex, optionally after "sha256:". Without
	// CAFile it is the only check.
	Pin string
	// Insecure (--tls-insecure) checks nothing: for labs.
	Insecure bool
	// ClientCert and ClientKey (--tls-client-cert, --tls-client-key) are
	// PEM files of the certificate (and chain) the client presents, and
	// its key, for servers that ask for one.
	ClientCert, ClientKey string
}

// TLSConfig returns the client's TLS configuration for opts: TLS 1.3, with
// the checks of opts in VerifyConnection (crypto/tls's own verification
// is off, so that the errors say which check failed). Its errors name the
// option at fault.
func TLSConfig(opts TLSOptions) (*tls.Config, error) {
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: opts.ServerName,
		// The checks are VerifyConnection's.
		InsecureSkipVerify: true,
	}
	if opts.ClientCert != "" || opts.ClientKey != "" {
		if opts.ClientCert == "" || opts.ClientKey == "" {
			return nil, errors.New("--tls-client-cert and --tls-client-key go together: give both")
		}
		cert, err := tls.LoadX509KeyPair(opts.ClientCert, opts.ClientKey)
		if err != nil {
			return nil, fmt.Errorf("the client certificate (--tls-client-cert %s, --tls-client-key %s): %w", opts.ClientCert, opts.ClientKey, err)
		}
		// Sent whenever the server asks, whichever CAs it names: the
		// server is the one to say what it makes of it.
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	}
	if opts.Insecure {
		if opts.CAFile != "" || opts.Pin != "" {
			return nil, errors.New("--tls-insecure checks nothing: it cannot go with --tls-ca or --tls-pin")
		}
		return cfg, nil
	}
	v := &verifier{serverName: opts.ServerName, caFile: opts.CAFile, checkChain: opts.Pin == "" || opts.CAFile != ""}
	if opts.Pin != "" {
		pin, err := ParsePin(opts.Pin)
		if err != nil {
			return nil, err
		}
		v.pin = pin
	}
	if opts.CAFile != "" {
		roots, err := readCAs(opts.CAFile)
		if err != nil {
			return nil, err
		}
		v.roots = roots
	}
	cfg.VerifyConnection = v.verify
	return cfg, nil
}

// readCAs reads a PEM bundle of CA certificates.
func readCAs(file string) (*x509.CertPool, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading --tls-ca: %w", err)
	}
	pool := x509.NewCertPool()
	n := 0
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca %s: certificate %d: %w", file, n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, fmt.Errorf("--tls-ca %s holds no PEM certificate (-----BEGIN CERTIFICATE-----)", file)
	}
	return pool, nil
}

// verifier checks a server's certificate, as TLSOptions say.
type verifier struct {
	serverName string         // "": the name the dialer sets, ConnectionState.ServerName
	checkChain bool           // check the chain and the name
	roots      *x509.CertPool // nil: the system's
	caFile     string         // where roots come from, for messages
	pin        []byte         // nil: none
}

// verify is the configuration's VerifyConnection.
func (v *verifier) verify(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("the server sent no certificate")
	}
	leaf := cs.PeerCertificates[0]
	if v.checkChain {
		if err := v.verifyChain(cs.PeerCertificates); err != nil {
			return err
		}
		name := v.serverName
		if name == "" {
			name = cs.ServerName
		}
		if name == "" {
			return errors.New("no name to check the server's certificate against: give --tls-server-name")
		}
		if err := leaf.VerifyHostname(name); err != nil {
			return wrongName(leaf, name, err)
		}
	}
	if v.pin != nil {
		if got := pinOf(leaf); !bytes.Equal(got, v.pin) {
			return &checkError{check: ErrWrongPin, msg: fmt.Sprintf(
				"the server's certificate key hashes to %s, but --tls-pin is %s: if the server's key was changed on purpose, update --tls-pin; if not, someone may be posing as the server",
				FormatPin(got), FormatPin(v.pin))}
		}
	}
	return nil
}

// verifyChain checks that certs[0] chains to a root, through the others,
// and is valid for a TLS server now.
func (v *verifier) verifyChain(certs []*x509.Certificate) error {
	opts := x509.VerifyOptions{Roots: v.roots, Intermediates: x509.NewCertPool()}
	for _, c := range certs[1:] {
		opts.Intermediates.AddCert(c)
	}
	_, err := certs[0].Verify(opts)
	if err == nil {
		return nil
	}
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var noRoots x509.SystemRootsError
	switch {
	case errors.As(err, &unknown):
		where := "the system's roots (for a private CA, give its certificate with --tls-ca, or pin the server's key with --tls-pin)"
		if v.caFile != "" {
			where = fmt.Sprintf("--tls-ca (%s)", v.caFile)
		}
		return &checkError{check: ErrUnknownCA, err: err, msg: fmt.Sprintf(
			"the server's certificate is not signed by a CA in %s: it is issued by %q", where, issuerOf(certs))}
	case errors.As(err, &noRoots):
		return &checkError{check: ErrUnknownCA, err: err, msg: fmt.Sprintf(
			"the system's CA roots cannot be read (%v): give the server's CA with --tls-ca, or pin its key with --tls-pin", err)}
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		c := invalid.Cert
		return &checkError{check: ErrBadCertificate, err: err, msg: fmt.Sprintf(
			"the certificate %q in the server's chain is valid from %s to %s, and it is now %s: renew it, or check the clocks of both ends",
			c.Subject, c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339), time.Now().UTC().Format(time.RFC3339))}
	case errors.As(err, &invalid) && invalid.Reason == x509.IncompatibleUsage:
		return &checkError{check: ErrBadCertificate, err: err, msg: fmt.Sprintf(
			"the server's certificate is not for TLS servers (its extended key usage lacks serverAuth): %v", err)}
	}
	return &checkError{check: ErrBadCertificate, err: err, msg: fmt.Sprintf("the server's certificate chain does not verify: %v", err)}
}

// issuerOf names who issued the last certificate the server sent: the CA
// the client would need.
func issuerOf(certs []*x509.Certificate) string {
	return certs[len(certs)-1].Issuer.String()
}

// wrongName is the error of a certificate that is not for name.
func wrongName(leaf *x509.Certificate, name string, err error) error {
	var names []string
	names = append(names, leaf.DNSNames...)
	for _, ip := range leaf.IPAddresses {
		names = append(names, ip.String())
	}
	var msg string
	switch {
	case len(names) > 0:
		msg = fmt.Sprintf("the server's certificate is for %s, not %s: check --tls-server-name", strings.Join(names, ", "), name)
	case leaf.Subject.CommonName != "":
		msg = fmt.Sprintf("the server's certificate has no subject alternative names, only the common name %q, which TLS no longer checks: reissue it with %s as a subject alternative name",
			leaf.Subject.CommonName, name)
	default:
		msg = fmt.Sprintf("the server's certificate names no host at all (no subject alternative names): reissue it with %s as a subject alternative name", name)
	}
	return &checkError{check: ErrWrongName, err: err, msg: msg}
}

// checkError is a failed check: its message says which and what to do;
// it matches the check's sentinel and wraps the error behind it, if any.
type checkError struct {
	check error
	msg   string
	err   error
}

func (e *checkError) Error() string { return e.msg }

func (e *checkError) Unwrap() []error {
	if e.err == nil {
		return []error{e.check}
	}
	return []error{e.check, e.err}
}

// pinOf returns the SHA-256 of c's SubjectPublicKeyInfo.
func pinOf(c *x509.Certificate) []byte {
	h := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return h[:]
}

// PinOf returns the pin of the first certificate in certPEM, in the form
// --tls-pin takes: "sha256:" and the SHA-256 of its SubjectPublicKeyInfo
// in lowercase hex.
func PinOf(certPEM []byte) (string, error) {
	for {
		var b *pem.Block
		b, certPEM = pem.Decode(certPEM)
		if b == nil {
			return "", errors.New("no PEM certificate (-----BEGIN CERTIFICATE-----) to pin")
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return "", fmt.Errorf("the certificate to pin: %w", err)
		}
		return FormatPin(pinOf(c)), nil
	}
}

// FormatPin writes a SHA-256 as PinOf does: "sha256:" and lowercase hex.
func FormatPin(sum []byte) string { return "sha256:" + hex.EncodeToString(sum) }

// ParsePin parses a --tls-pin: a SHA-256 in hex (64 digits, either case),
// optionally after "sha256:". Its error says what a pin looks like; one
// given in base64 (as HPKP and curl write them) is refused with its hex
// form, to keep a single notation in configurations and logs.
func ParsePin(s string) ([]byte, error) {
	h := strings.TrimSpace(s)
	if len(h) >= 7 && strings.EqualFold(h[:7], "sha256:") {
		h = h[7:]
	}
	if b, err := hex.DecodeString(h); err == nil && len(b) == sha256.Size {
		return b, nil
	}
	b64 := strings.TrimPrefix(strings.TrimSpace(s), "sha256//") // curl's --pinnedpubkey form
	if b, err := base64.StdEncoding.DecodeString(b64); err == nil && len(b) == sha256.Size {
		return nil, fmt.Errorf("--tls-pin %q is in base64: give it in hex, %s", s, FormatPin(b))
	}
	return nil, fmt.Errorf("--tls-pin %q is not a SHA-256 in hex: give 64 hex digits, optionally after sha256: (the SHA-256 of the server certificate's SubjectPublicKeyInfo)", s)
}
