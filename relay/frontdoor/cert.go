package frontdoor

import (
	"crypto/tls"
	"errors"
	"fmt"
	"sync/atomic"
)

// A CertSource gives the front door the certificate for each TLS
// handshake; it is asked anew each time, so a source can change its
// certificate at run time.
type CertSource interface {
	GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error)
}

// CertFunc is a function as a CertSource.
type CertFunc func(*tls.ClientHelloInfo) (*tls.Certificate, error)

// GetCertificate calls f.
func (f CertFunc) GetCertificate(chi *tls.ClientHelloInfo) (*tls.Certificate, error) { return f(chi) }

// CertFile is a certificate chain and its private key in PEM files. Load
// reads them; calling it again (on SIGHUP, say) replaces the certificate
// atomically: handshakes from then on use the new one, established
// connections are not touched, and a failed reload keeps the old one.
type CertFile struct {
	CertPath, KeyPath string

	cert atomic.Pointer[tls.Certificate]
}

// Load reads the certificate and key, and uses them from now on. On error
// the certificate in use, if any, stays.
func (f *CertFile) Load() error {
	c, err := tls.LoadX509KeyPair(f.CertPath, f.KeyPath)
	if err != nil {
		if f.cert.Load() != nil {
			return fmt.Errorf("reloading the TLS certificate (the old one stays in use): %w", err)
		}
		return fmt.Errorf("loading the TLS certificate: %w", err)
	}
	f.cert.Store(&c)
	return nil
}

// Certificate is the certificate in use, or nil before a Load succeeded.
func (f *CertFile) Certificate() *tls.Certificate { return f.cert.Load() }

// GetCertificate returns the certificate in use.
func (f *CertFile) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c := f.cert.Load(); c != nil {
		return c, nil
	}
	return nil, errors.New("no TLS certificate loaded (CertFile.Load has not succeeded)")
}
