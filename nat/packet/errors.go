package packet

import (
	"errors"
	"fmt"
)

// Errors reported by Parse. Match them with errors.Is: Parse returns
// ErrFragment as it is, ErrVersion and ErrProtocol as a VersionError or
// ProtocolError, and the others wrapped with the offending values.
var (
	ErrTooShort  = errors.New("packet too short for its headers")
	ErrTruncated = errors.New("IP length exceeds the bytes read")
	ErrVersion   = errors.New("not an IPv4 or IPv6 packet")
	ErrFragment  = errors.New("IP fragment")
	ErrProtocol  = errors.New("neither UDP nor ESP")
	ErrLength    = errors.New("UDP length disagrees with the IP payload length")
	ErrChecksum  = errors.New("IPv4 header checksum wrong")
)

// Errors reported by PutUDP and PutESP. Match them with errors.Is.
var (
	ErrAddress  = errors.New("address is neither IPv4 nor IPv6")
	ErrFamily   = errors.New("source and destination address families differ")
	ErrOffset   = errors.New("payload offset outside the buffer")
	ErrNoRoom   = errors.New("no room for the headers in front of the payload")
	ErrTooLarge = errors.New("payload too large for one IP packet")
)

// VersionError reports a packet whose IP version is neither 4 nor 6. Its
// value is that version. It matches ErrVersion, and returning it does not
// allocate.
type VersionError uint8

func (e VersionError) Error() string {
	return fmt.Sprintf("%v: IP version %d", ErrVersion, uint8(e))
}

// Unwrap returns ErrVersion.
func (e VersionError) Unwrap() error { return ErrVersion }

// ProtocolError reports a packet whose IPv4 protocol, or IPv6 next header
// after the extension headers, is neither UDP nor ESP. Its value is that
// protocol number. It matches ErrProtocol, and returning it does not
// allocate.
type ProtocolError uint8

func (e ProtocolError) Error() string {
	return fmt.Sprintf("IP protocol %d: %v", uint8(e), ErrProtocol)
}

// Unwrap returns ErrProtocol.
func (e ProtocolError) Unwrap() error { return ErrProtocol }
