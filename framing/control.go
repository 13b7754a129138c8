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
//	Join        client -> server, on a member link of an aggregate after
//	            HelloReply: the site's location ID (4), a session ID (8),
//	            the aggregate's algorithm (1), this member's weight (1) and
//	            index (1, 0 to 15), and a MAC (32) that proves knowledge of
//	            the session's key over this link's handshake and all of
//	            the above (relay/ticket.JoinMAC). The link then carries the
//	            session beside the aggregate's other members. Knowing the
//	            location ID and the SPIs is not enough to join.
//	Joined      server -> client: the session ID (8), the member index
//	            (1) and a result (1): JoinAccepted, or JoinRefused (unknown
//	            session, bad MAC, another location, too many members).
//	Probe       either way, on a member link every few hundred ms: a
//	            sequence number (4), the sender's clock in nanoseconds (8)
//	            and flags (1): ProbeReply set on the answer, which echoes
//	            the probe's sequence number and clock. A member whose
//	            probes go unanswered leaves the rotation (relay/aggregate).
//	Observe     asker -> server, on a link of its own (`iketcp probe`): a
//	            nonce (8). Needs no Hello: only iketcp sends this SPI, so
//	            the message itself says the asker is iketcp. Numbered from
//	            32: types below that are the session protocol's.
//	Observed    server -> asker: the nonce (8), then the address and port
//	            the server saw the link come from, the asker's own as any
//	            NAT between rewrote it: 16 bytes of IPv6 (IPv4 mapped) and
//	            a port (2). Nothing else: no other client's address, no
//	            session, no configuration.
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
	ControlJoin       ControlType = 7
	ControlJoined     ControlType = 8
	ControlProbe      ControlType = 9
	ControlPing       ControlType = 10
	ControlPong       ControlType = 11
	ControlObserve    ControlType = 32
	ControlObserved   ControlType = 33
)

// Results of a Join.
const (
	JoinAccepted = 0
	JoinRefused  = 1
)

// ProbeReply flags a Probe that answers another.
const ProbeReply = 1

// Sizes of the Join, Joined and Probe bodies.
const (
	JoinSize   = 4 + 8 + 3 + ControlMACSize
	JoinedSize = 10
	ProbeSize  = 13
)

// ObserveNonceSize is the size of an Observe's nonce; ObservedSize of an
// Observed body.
const (
	ObserveNonceSize = 8
	ObservedSize     = ObserveNonceSize + 16 + 2
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
	ControlJoin:       JoinSize,
	ControlJoined:     JoinedSize,
	ControlProbe:      ProbeSize,
	ControlObserve:    ObserveNonceSize,
	ControlObserved:   ObservedSize,
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
	case ControlJoin:
		return "join"
	case ControlJoined:
		return "joined"
	case ControlProbe:
		return "probe"
	case ControlObserve:
		return "observe"
	case ControlObserved:
		return "observed"
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

// SessionID is the session ID at the start of a Ticket, Claim, Claimed or
// Joined body, or after the SPI of a Move body or the location of a Join
// body.
func (c *Control) SessionID() uint64 {
	if c.Type == ControlMove || c.Type == ControlJoin {
		return binary.BigEndian.Uint64(c.Body[4:])
	}
	return binary.BigEndian.Uint64(c.Body)
}

// Join is a parsed Join body.
type Join struct {
	Location  [4]byte
	Session   uint64
	Algorithm uint8
	Weight    uint8
	Member    uint8
	MAC       []byte // aliases the body
}

// Join parses a Join body; c must be a ControlJoin.
func (c *Control) Join() Join {
	b := c.Body
	return Join{Location: [4]byte(b[0:4]), Session: binary.BigEndian.Uint64(b[4:]), Algorithm: b[12], Weight: b[13], Member: b[14], MAC: b[15:]}
}

// Probe is a parsed Probe body.
type Probe struct {
	Seq   uint32
	Clock int64
	Flags uint8
}

// Probe parses a Probe body; c must be a ControlProbe.
func (c *Control) Probe() Probe {
	b := c.Body
	return Probe{Seq: binary.BigEndian.Uint32(b), Clock: int64(binary.BigEndian.Uint64(b[4:])), Flags: b[12]}
}

// AppendProbe appends the Probe message p to dst, without allocating when
// dst has room.
func AppendProbe(dst []byte, p Probe) []byte {
	dst = binary.BigEndian.AppendUint32(dst, ControlSPI)
	dst = append(dst, ControlVersion, byte(ControlProbe))
	dst = binary.BigEndian.AppendUint32(dst, p.Seq)
	dst = binary.BigEndian.AppendUint64(dst, uint64(p.Clock))
	return append(dst, p.Flags)
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

// ObservedAddr reads the address of an Observed body: the nonce and the
// address and port the server saw. ok is false for any other message.
func (c *Control) ObservedAddr() (nonce uint64, addr [16]byte, port uint16, ok bool) {
	if c.Type != ControlObserved || len(c.Body) != ObservedSize {
		return 0, addr, 0, false
	}
	copy(addr[:], c.Body[ObserveNonceSize:])
	return binary.BigEndian.Uint64(c.Body), addr, binary.BigEndian.Uint16(c.Body[ObserveNonceSize+16:]), true
}
