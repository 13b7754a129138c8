// Package framing owns the bytes of RFC 9329 TCP encapsulation: the
// "IKETCP" stream prefix, the 16-bit length that counts itself, the non-ESP
// marker that tells IKE from ESP, the 1-byte NAT keepalive, and the IKE and
// ESP header fields a relay needs to route a message (SPIs, exchange type,
// flags, message ID, sequence number).
//
// Everything here is pure: no sockets, no clocks. Decoders parse into
// caller-owned structs and never allocate on success, so they can run once
// per packet on the hot path.
//
// Vocabulary used throughout iketcp:
//
//   - A datagram "in port-4500 form" is what an IKE daemon sends from UDP
//     port 4500 with NAT traversal: IKE behind a 4-byte zero marker, ESP raw
//     (SPI first), or the 1-byte 0xFF keepalive. That form is exactly the
//     payload of an RFC 9329 frame, so converting between the two is adding
//     or removing the 2-byte length.
//   - A "frame" is Length (2 bytes, big-endian, counting itself) followed by
//     the payload.
package framing

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Prefix is the TCP-encapsulated stream prefix (RFC 9329 section 4) that the
// TCP originator sends once, before the first frame.
const Prefix = "IKETCP"

// Sizes of the pieces of a frame.
const (
	// LengthSize is the size of the frame's Length field.
	LengthSize = 2
	// MarkerSize is the size of the non-ESP marker in front of IKE.
	MarkerSize = 4
	// Headroom is the space to leave in front of a datagram read from a
	// socket so that any header iketcp adds can be written in place:
	// the Length and, for IKE from port 500, the non-ESP marker.
	Headroom = LengthSize + MarkerSize
	// MaxFrame is the largest frame the 16-bit Length can describe.
	MaxFrame = 0xffff
	// MaxPayload is the largest payload (datagram in port-4500 form).
	MaxPayload = MaxFrame - LengthSize
	// IKEHeaderSize is the size of the fixed IKEv2 header (RFC 7296 3.1).
	IKEHeaderSize = 28
	// ESPHeaderSize is the size of the ESP SPI and sequence number.
	ESPHeaderSize = 8
)

// KeepaliveByte is the single byte of a NAT-T keepalive (RFC 3948 2.3).
const KeepaliveByte = 0xff

// Kind says what a payload carries.
type Kind uint8

// Kinds of payload.
const (
	KindInvalid   Kind = iota // too short or otherwise not a message
	KindIKE                   // non-ESP marker, then an IKE message
	KindESP                   // ESP packet, SPI first
	KindKeepalive             // 1-byte NAT keepalive
	KindControl               // iketcp control message (ESP-shaped, SPI ControlSPI)
)

func (k Kind) String() string {
	switch k {
	case KindIKE:
		return "IKE"
	case KindESP:
		return "ESP"
	case KindKeepalive:
		return "keepalive"
	case KindControl:
		return "control"
	default:
		return "invalid"
	}
}

// Classify tells what a payload (a datagram in port-4500 form) carries,
// looking only at its size and first bytes.
func Classify(p []byte) Kind {
	switch {
	case len(p) == 1 && p[0] == KeepaliveByte:
		return KindKeepalive
	case len(p) >= MarkerSize && p[0]|p[1]|p[2]|p[3] == 0:
		if len(p) < MarkerSize+IKEHeaderSize {
			return KindInvalid
		}
		return KindIKE
	case len(p) >= ESPHeaderSize:
		if binary.BigEndian.Uint32(p) == ControlSPI {
			return KindControl
		}
		return KindESP
	default:
		return KindInvalid
	}
}

// PutLength writes the Length field of a frame whose payload is n bytes
// into b[:LengthSize]. It panics if n is more than MaxPayload: callers size
// their buffers so that cannot happen.
func PutLength(b []byte, n int) {
	if n < 0 || n > MaxPayload {
		panic(fmt.Sprintf("framing: payload of %d bytes does not fit a frame", n))
	}
	binary.BigEndian.PutUint16(b, uint16(n+LengthSize))
}

// AppendFrame appends a frame carrying payload to dst.
func AppendFrame(dst, payload []byte) []byte {
	var l [LengthSize]byte
	PutLength(l[:], len(payload))
	dst = append(dst, l[:]...)
	return append(dst, payload...)
}

// Errors reported by the decoders. Match them with errors.Is; the
// concrete errors carry the offending values.
var (
	ErrBadPrefix  = errors.New("stream does not begin with the IKETCP prefix")
	ErrBadLength  = errors.New("frame length cannot describe a message")
	ErrTooLarge   = errors.New("frame over the size limit skipped")
	ErrTruncated  = errors.New("stream ended inside a frame")
	ErrShortIKE   = errors.New("IKE message shorter than its header")
	ErrIKEVersion = errors.New("not an IKEv2 message")
	ErrIKELength  = errors.New("IKE length field disagrees with the message size")
	ErrShortESP   = errors.New("ESP packet shorter than its header")
	ErrZeroSPI    = errors.New("ESP SPI is zero")
	ErrNotMessage = errors.New("payload is neither IKE, ESP nor keepalive")
	ErrControl    = errors.New("not an iketcp control message this version knows")
)

// PrefixError reports a stream whose first bytes are not the prefix.
type PrefixError struct {
	Got []byte // the bytes received in place of the prefix
}

func (e *PrefixError) Error() string {
	return fmt.Sprintf("%v: got %q", ErrBadPrefix, e.Got)
}

func (e *PrefixError) Unwrap() error { return ErrBadPrefix }

// LengthError reports a frame Length of 0 or 1 (fatal), or a frame over
// the decoder's limit (skipped).
type LengthError struct {
	Length int // the Length field as received
	Max    int // the largest Length the decoder accepts
}

func (e *LengthError) Error() string {
	if e.Length < LengthSize {
		return fmt.Sprintf("%v: length %d (RFC 9329 requires closing the connection)", ErrBadLength, e.Length)
	}
	return fmt.Sprintf("%v: length %d, limit %d", ErrTooLarge, e.Length, e.Max)
}

func (e *LengthError) Unwrap() error {
	if e.Length < LengthSize {
		return ErrBadLength
	}
	return ErrTooLarge
}

// TruncatedError reports a stream that ended in the middle of a frame or
// of the prefix. The partial bytes are discarded, as RFC 9329 asks.
type TruncatedError struct {
	Discarded int // bytes of the partial frame that were dropped
}

func (e *TruncatedError) Error() string {
	return fmt.Sprintf("%v: %d bytes discarded", ErrTruncated, e.Discarded)
}

func (e *TruncatedError) Unwrap() error { return ErrTruncated }
