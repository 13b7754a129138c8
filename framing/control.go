package framing

import "encoding/binary"

// Control messages are iketcp's own, between two iketcps only: a client
// that knows its server is iketcp says hello first; a server speaks them
// only to a client that said hello. A standard RFC 9329 peer never sends
// one and never receives one.
//
// On the wire a control message is the payload of a frame (or of a
// fake-TCP segment), shaped like ESP so that nothing between the peers
// can tell it from ESP:
//
//	SPI     4 bytes  ControlSPI (0x000000fe), one of the values 1 to 255
//	                 that RFC 4303 2.1 reserves and no SA ever uses
//	Version 1 byte   ControlVersion (1)
//	Type    1 byte   a ControlType
//	Body    the rest, of the type's exact size
//
// The bodies, all fields big-endian:
//
//	Hello       client -> server, first on every link: the client's X25519
//	            public key for this link (32 bytes).
//	HelloReply  server -> client: the server's X25519 public key for this
//	            link (32 bytes). Both ends derive the link's key from the
//	            shared secret and both public keys (relay/handshake).
//	Ticket      server -> client, once a session is confirmed (the backend
//	            answered its IKE_SA_INIT): the session's ID (8) and its IKE
//	            initiator SPI (8). The session's key is the key of the link
//	            the ticket came on.
//	Claim       client -> server, on a new link after HelloReply: a session
//	            ID (8) and a MAC (32) that proves knowledge of the
//	            session's key over this link's handshake, so that only the
//	            client that created the session can move its return path,
//	            and a claim copied to another link is worthless.
//	Claimed     server -> client: the session ID (8) and a result (1):
//	            ClaimAccepted, or ClaimRefused (unknown session, bad MAC).
//	Move        client -> server: an ESP SPI (4), the ID of the session it
//	            routes to now (8) and a MAC (32) that proves knowledge of
//	            that session's key over this link's handshake: the SPI is
//	            this link's session's, not that one's. The client learns
//	            which IKE SA a new child SA belongs to only from the peer's
//	            answers, sometimes after its first packets went elsewhere.
//	Ping        client -> server, on a link whose server answered Hello,
//	            when the link has been quiet: a sequence number (8). The
//	            client's liveness check (relay/client): a link that hears
//	            nothing, not even a Pong, for the liveness timeout is dead.
//	Pong        server -> client: the Ping's sequence number (8), at once.
const (
	ControlSPI     = 0x000000fe
	ControlVersion = 1
	// ControlHeaderSize is the SPI, version and type in front of a body.
	ControlHeaderSize = 6
	// ControlKeySize is the size of a public key; ControlMACSize of a MAC.
	ControlKeySize = 32
	ControlMACSize = 32
)

// ControlType says what a control message is.
type ControlType uint8

// Control message types.
const (
	ControlHello      ControlType = 1
	ControlHelloReply ControlType = 2
	ControlTicket     ControlType = 3
	ControlClaim      ControlType = 4
	ControlClaimed    ControlType = 5
	ControlMove       ControlType = 6
	ControlPing       ControlType = 10
	ControlPong       ControlType = 11
)

// ControlPingSize is the body of a Ping or a Pong: a sequence number.
const ControlPingSize = 8

// Results of a Claim.
const (
	ClaimAccepted = 0
	ClaimRefused  = 1
)

// controlBodySize is each type's body size.
var controlBodySize = [...]int{
	ControlHello:      ControlKeySize,
	ControlHelloReply: ControlKeySize,
	ControlTicket:     16,
	ControlClaim:      8 + ControlMACSize,
	ControlClaimed:    9,
	ControlMove:       4 + 8 + ControlMACSize,
	ControlPing:       ControlPingSize,
	ControlPong:       ControlPingSize,
}

func (t ControlType) String() string {
	switch t {
	case ControlHello:
		return "hello"
	case ControlHelloReply:
		return "hello-reply"
	case ControlTicket:
		return "ticket"
	case ControlClaim:
		return "claim"
	case ControlClaimed:
		return "claimed"
	case ControlMove:
		return "move"
	case ControlPing:
		return "ping"
	case ControlPong:
		return "pong"
	}
	return "control(" + itoa(int(t)) + ")"
}

// Control is a parsed control message. Body aliases the payload.
type Control struct {
	Type ControlType
	Body []byte
}

// Decode parses a control message: the payload of a frame whose Kind is
// KindControl. Anything but a known type of this version with a body of
// its size is ErrControl. It does not allocate.
func (c *Control) Decode(p []byte) error {
	*c = Control{}
	if len(p) < ControlHeaderSize || binary.BigEndian.Uint32(p) != ControlSPI || p[4] != ControlVersion {
		return ErrControl
	}
	t := ControlType(p[5])
	if t == 0 || int(t) >= len(controlBodySize) || controlBodySize[t] == 0 || len(p)-ControlHeaderSize != controlBodySize[t] {
		return ErrControl
	}
	c.Type, c.Body = t, p[ControlHeaderSize:]
	return nil
}

// SessionID is the session ID at the start of a Ticket, Claim or Claimed
// body, or after the SPI of a Move body.
func (c *Control) SessionID() uint64 {
	if c.Type == ControlMove {
		return binary.BigEndian.Uint64(c.Body[4:])
	}
	return binary.BigEndian.Uint64(c.Body)
}

// AppendControl appends a control message of type t, whose body is the
// concatenation of parts, to dst. It panics if the body is not the type's
// size: callers build bodies of fixed size.
func AppendControl(dst []byte, t ControlType, parts ...[]byte) []byte {
	start := len(dst)
	dst = binary.BigEndian.AppendUint32(dst, ControlSPI)
	dst = append(dst, ControlVersion, byte(t))
	for _, p := range parts {
		dst = append(dst, p...)
	}
	if len(dst)-start-ControlHeaderSize != controlBodySize[t] {
		panic("framing: control " + t.String() + " body of the wrong size")
	}
	return dst
}

func itoa(v int) string {
	if v == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for ; v > 0; v /= 10 {
		i--
		b[i] = byte('0' + v%10)
	}
	return string(b[i:])
}
