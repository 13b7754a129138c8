package lab

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// TLS on the wire, as anyone on the path sees it (RFC 8446): records of
// a 5-byte header (content type, legacy version, length) and a fragment.
// In TLS 1.3 only the hellos are readable: the ClientHello, with the name
// the client asks for (SNI) and its ALPN protocols, and the ServerHello,
// with the version chosen (its supported_versions extension); everything
// after them is application_data. As for RFC 9329, the lab reads it with
// a parser of its own, not the one TLS runs on.
const (
	TLSRecordChangeCipherSpec = 20
	TLSRecordAlert            = 21
	TLSRecordHandshake        = 22
	TLSRecordApplicationData  = 23

	// TLSVersion13 is TLS 1.3's version number, as supported_versions
	// carries it.
	TLSVersion13 = 0x0304

	tlsRecordHeaderSize    = 5
	tlsHandshakeHeaderSize = 4
	tlsClientHello         = 1
	tlsServerHello         = 2
	tlsExtServerName       = 0
	tlsExtALPN             = 16
	tlsExtSupportedVersion = 43
)

// TLSRecord is one TLS record: its header's fields and its fragment.
type TLSRecord struct {
	Type     uint8
	Version  uint16
	Fragment []byte
}

// SplitTLSRecords splits one direction of a TLS connection into its
// records, whose fragments alias stream. A record cut off at the end (a
// capture stopped mid-record) is left out. It fails at the first header
// that is not a TLS record's.
func SplitTLSRecords(stream []byte) ([]TLSRecord, error) {
	var recs []TLSRecord
	for len(stream) >= tlsRecordHeaderSize {
		typ, version := stream[0], binary.BigEndian.Uint16(stream[1:])
		n := int(binary.BigEndian.Uint16(stream[3:]))
		if typ < TLSRecordChangeCipherSpec || typ > TLSRecordApplicationData || version>>8 != 3 {
			return recs, fmt.Errorf("record %d is not TLS: header %x", len(recs), stream[:tlsRecordHeaderSize])
		}
		if tlsRecordHeaderSize+n > len(stream) {
			break
		}
		recs = append(recs, TLSRecord{Type: typ, Version: version, Fragment: stream[tlsRecordHeaderSize : tlsRecordHeaderSize+n]})
		stream = stream[tlsRecordHeaderSize+n:]
	}
	return recs, nil
}

// ClientHello is what a ClientHello says in clear.
type ClientHello struct {
	// ServerName is the SNI host name, "" without one.
	ServerName string
	// ALPN are the application protocols offered.
	ALPN []string
	// Versions are those of supported_versions, e.g. TLSVersion13.
	Versions []uint16
}

// ParseClientHello reads the ClientHello that rec (a handshake record)
// begins with.
func ParseClientHello(rec TLSRecord) (ClientHello, error) {
	body, err := handshakeBody(rec, tlsClientHello)
	if err != nil {
		return ClientHello{}, err
	}
	r := wireReader{b: body}
	r.skip(2 + 32) // legacy_version, random
	r.vector(1)    // legacy_session_id
	r.vector(2)    // cipher_suites
	r.vector(1)    // legacy_compression_methods
	exts := r.vector(2)
	if r.err != nil {
		return ClientHello{}, fmt.Errorf("ClientHello: %w", r.err)
	}
	var h ClientHello
	err = eachExtension(exts, func(typ uint16, data wireReader) {
		switch typ {
		case tlsExtServerName:
			list := data.vector(2)
			for list.err == nil && len(list.b) > 0 {
				nameType := list.byte()
				name := list.vector(2)
				if nameType == 0 && list.err == nil {
					h.ServerName = string(name.b)
				}
			}
		case tlsExtALPN:
			list := data.vector(2)
			for list.err == nil && len(list.b) > 0 {
				if p := list.vector(1); list.err == nil {
					h.ALPN = append(h.ALPN, string(p.b))
				}
			}
		case tlsExtSupportedVersion:
			list := data.vector(1)
			for list.err == nil && len(list.b) >= 2 {
				h.Versions = append(h.Versions, list.uint16())
			}
		}
	})
	if err != nil {
		return ClientHello{}, fmt.Errorf("ClientHello: %w", err)
	}
	return h, nil
}

// ServerHelloVersion returns the version the ServerHello that rec (a
// handshake record) begins with chose: its supported_versions extension
// (TLS 1.3), or else its legacy_version.
func ServerHelloVersion(rec TLSRecord) (uint16, error) {
	body, err := handshakeBody(rec, tlsServerHello)
	if err != nil {
		return 0, err
	}
	r := wireReader{b: body}
	version := r.uint16()
	r.skip(32)  // random
	r.vector(1) // legacy_session_id_echo
	r.skip(2 + 1)
	exts := r.vector(2)
	if r.err != nil {
		return 0, fmt.Errorf("ServerHello: %w", r.err)
	}
	err = eachExtension(exts, func(typ uint16, data wireReader) {
		if typ == tlsExtSupportedVersion {
			if v := data.uint16(); data.err == nil {
				version = v
			}
		}
	})
	if err != nil {
		return 0, fmt.Errorf("ServerHello: %w", err)
	}
	return version, nil
}

// handshakeBody returns the body of the handshake message of type want
// that rec begins with (it must fit in the record, as hellos do).
func handshakeBody(rec TLSRecord, want uint8) ([]byte, error) {
	if rec.Type != TLSRecordHandshake {
		return nil, fmt.Errorf("record of type %d, not a handshake (%d)", rec.Type, TLSRecordHandshake)
	}
	f := rec.Fragment
	if len(f) < tlsHandshakeHeaderSize {
		return nil, errors.New("handshake record too short")
	}
	if f[0] != want {
		return nil, fmt.Errorf("handshake message of type %d, want %d", f[0], want)
	}
	n := int(f[1])<<16 | int(f[2])<<8 | int(f[3])
	if tlsHandshakeHeaderSize+n > len(f) {
		return nil, fmt.Errorf("handshake message of %d bytes in a record of %d", n, len(f))
	}
	return f[tlsHandshakeHeaderSize : tlsHandshakeHeaderSize+n], nil
}

// eachExtension calls fn with each extension in exts.
func eachExtension(exts wireReader, fn func(typ uint16, data wireReader)) error {
	for exts.err == nil && len(exts.b) > 0 {
		typ := exts.uint16()
		data := exts.vector(2)
		if exts.err == nil {
			fn(typ, data)
		}
	}
	return exts.err
}

// wireReader reads big-endian fields, remembering the first shortfall.
type wireReader struct {
	b   []byte
	err error
}

func (r *wireReader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n > len(r.b) {
		r.err = fmt.Errorf("truncated: need %d bytes, have %d", n, len(r.b))
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *wireReader) skip(n int) { r.take(n) }

func (r *wireReader) byte() uint8 {
	if v := r.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *wireReader) uint16() uint16 {
	if v := r.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

// vector reads a vector with a length prefix of lenSize bytes (1 or 2).
func (r *wireReader) vector(lenSize int) wireReader {
	var n int
	if lenSize == 1 {
		n = int(r.byte())
	} else {
		n = int(r.uint16())
	}
	return wireReader{b: r.take(n), err: r.err}
}
