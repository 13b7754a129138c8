package framing

import (
	"encoding/binary"
	"strconv"
)

// ExchangeType is an IKEv2 exchange type (RFC 7296 3.1 and later RFCs).
type ExchangeType uint8

// IKEv2 exchange types a relay may see.
const (
	IKESAInit        ExchangeType = 34
	IKEAuth          ExchangeType = 35
	CreateChildSA    ExchangeType = 36
	Informational    ExchangeType = 37
	IKESessionResume ExchangeType = 38
	IKEIntermediate  ExchangeType = 43
	IKEFollowupKE    ExchangeType = 44
)

func (t ExchangeType) String() string {
	switch t {
	case IKESAInit:
		return "IKE_SA_INIT"
	case IKEAuth:
		return "IKE_AUTH"
	case CreateChildSA:
		return "CREATE_CHILD_SA"
	case Informational:
		return "INFORMATIONAL"
	case IKESessionResume:
		return "IKE_SESSION_RESUME"
	case IKEIntermediate:
		return "IKE_INTERMEDIATE"
	case IKEFollowupKE:
		return "IKE_FOLLOWUP_KE"
	}
	return "exchange(" + strconv.Itoa(int(t)) + ")"
}

// IKE header flags (RFC 7296 3.1).
const (
	FlagInitiator = 0x08 // sent by the original initiator of the IKE SA
	FlagVersion   = 0x10 // sender can speak a higher major version
	FlagResponse  = 0x20 // message is a response
)

// IKEHeader holds the fixed IKEv2 header fields a relay needs.
type IKEHeader struct {
	InitiatorSPI uint64
	ResponderSPI uint64
	NextPayload  uint8
	MajorVersion uint8
	MinorVersion uint8
	Exchange     ExchangeType
	Flags        uint8
	MessageID    uint32
	Length       uint32 // whole message, header included
}

// Decode parses the IKE header at the start of msg, an IKE message without
// the non-ESP marker. It checks that the message is IKEv2 and that the
// header's Length equals len(msg). It does not allocate.
func (h *IKEHeader) Decode(msg []byte) error {
	if len(msg) < IKEHeaderSize {
		return ErrShortIKE
	}
	h.InitiatorSPI = binary.BigEndian.Uint64(msg[0:8])
	h.ResponderSPI = binary.BigEndian.Uint64(msg[8:16])
	h.NextPayload = msg[16]
	h.MajorVersion = msg[17] >> 4
	h.MinorVersion = msg[17] & 0x0f
	h.Exchange = ExchangeType(msg[18])
	h.Flags = msg[19]
	h.MessageID = binary.BigEndian.Uint32(msg[20:24])
	h.Length = binary.BigEndian.Uint32(msg[24:28])
	if h.MajorVersion != 2 {
		return ErrIKEVersion
	}
	if h.Length != uint32(len(msg)) {
		return ErrIKELength
	}
	return nil
}

// IsInitiator reports whether the message came from the IKE SA's original
// initiator.
func (h *IKEHeader) IsInitiator() bool { return h.Flags&FlagInitiator != 0 }

// IsResponse reports whether the message is a response.
func (h *IKEHeader) IsResponse() bool { return h.Flags&FlagResponse != 0 }

// IsInitRequest reports whether the message opens a new IKE SA: an
// IKE_SA_INIT request from the initiator, with no responder SPI yet and
// message ID zero (RFC 7296 2.2, 3.1).
func (h *IKEHeader) IsInitRequest() bool {
	return h.Exchange == IKESAInit && h.Flags&(FlagInitiator|FlagResponse) == FlagInitiator &&
		h.ResponderSPI == 0 && h.MessageID == 0
}

// IsInitResponse reports whether the message answers an IKE_SA_INIT
// request and names the responder's SPI: the responder took the IKE SA
// (an answer without one, such as a COOKIE or INVALID_KE_PAYLOAD request,
// does not count).
func (h *IKEHeader) IsInitResponse() bool {
	return h.Exchange == IKESAInit && h.Flags&FlagResponse != 0 && h.ResponderSPI != 0 && h.MessageID == 0
}

// ESPHeader holds the cleartext ESP header (RFC 4303 2).
type ESPHeader struct {
	SPI uint32
	Seq uint32
}

// Decode parses the ESP header at the start of pkt. It does not allocate.
func (h *ESPHeader) Decode(pkt []byte) error {
	if len(pkt) < ESPHeaderSize {
		return ErrShortESP
	}
	h.SPI = binary.BigEndian.Uint32(pkt[0:4])
	h.Seq = binary.BigEndian.Uint32(pkt[4:8])
	if h.SPI == 0 {
		return ErrZeroSPI
	}
	return nil
}

// Message is a classified and parsed payload. Only the header matching
// Kind is meaningful.
type Message struct {
	Kind    Kind
	IKE     IKEHeader
	ESP     ESPHeader
	Control Control
}

// Decode classifies payload (a datagram in port-4500 form) and parses the
// header of its kind. A keepalive decodes without error. It does not
// allocate.
func (m *Message) Decode(payload []byte) error {
	m.Kind = Classify(payload)
	switch m.Kind {
	case KindIKE:
		return m.IKE.Decode(payload[MarkerSize:])
	case KindESP:
		return m.ESP.Decode(payload)
	case KindKeepalive:
		return nil
	case KindControl:
		return m.Control.Decode(payload)
	}
	if len(payload) >= MarkerSize && payload[0]|payload[1]|payload[2]|payload[3] == 0 {
		return ErrShortIKE
	}
	return ErrNotMessage
}
