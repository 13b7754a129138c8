package probe

import (
	"crypto/rand"
	"crypto/sha1"
	"encoding/binary"
	"errors"
	"net/netip"

	"github.com/iketcp/iketcp/framing"
)

// IKEv2 numbers the probe's IKE_SA_INIT uses (RFC 7296, IANA's IKEv2
// registry).
const (
	payloadNone   = 0
	payloadSA     = 33
	payloadKE     = 34
	payloadNonce  = 40
	payloadNotify = 41

	notifyNoProposalChosen = 14
	notifyInvalidKE        = 17
	notifyCookie           = 16390
	notifyNATSourceIP      = 16388
	notifyNATDestinationIP = 16389

	// privateUse is the transform ID the probe offers for each type:
	// the first of the private-use range (RFC 7296 3.3.2).
	privateUse = 1024
	keLen      = 32
)

// initRequest is an IKE_SA_INIT request a responder answers as it must
// any initiator's (RFC 7296 2.7), but that leaves it nothing to keep: its
// one proposal offers only transforms of the private-use range (ID
// privateUse of each type, which no gateway configures), so the answer is
// NO_PROPOSAL_CHOSEN and the responder forgets the exchange. A proposal it
// could accept would leave a half-open IKE SA at the hub for each probe,
// and strongSwan stops answering an address after five of those
// (block_threshold), which would lock the site's own daemon out for a
// while. A responder under load asks for a COOKIE first; the probe sends
// it back (withCookie). The request carries NAT detection for the address
// it is sent from: a responder that answers with a full response (one that
// takes private-use transforms) says with its own whether it saw another.
type initRequest struct {
	spi   uint64
	bytes []byte // the message, without the non-ESP marker
}

// withCookie returns the request again with the responder's COOKIE in
// front of its payloads (RFC 7296 2.6), as an initiator resends it.
func (r *initRequest) withCookie(cookie []byte) *initRequest {
	if len(cookie) == 0 || len(cookie) > 64 {
		return r
	}
	msg := append([]byte(nil), r.bytes[:framing.IKEHeaderSize]...)
	msg[16] = payloadNotify
	msg = appendPayload(msg, payloadSA, notifyBody(notifyCookie, cookie))
	msg = append(msg, r.bytes[framing.IKEHeaderSize:]...)
	binary.BigEndian.PutUint32(msg[24:], uint32(len(msg)))
	return &initRequest{spi: r.spi, bytes: msg}
}

func newInitRequest(local, remote netip.AddrPort) (*initRequest, error) {
	var spiBytes [8]byte
	if _, err := rand.Read(spiBytes[:]); err != nil {
		return nil, err
	}
	spi := binary.BigEndian.Uint64(spiBytes[:])
	ke := make([]byte, keLen)
	nonce := make([]byte, 32)
	if _, err := rand.Read(ke); err != nil {
		return nil, err
	}
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}

	transform := func(last bool, typ byte, id uint16) []byte {
		more := byte(3)
		if last {
			more = 0
		}
		return []byte{more, 0, 0, 8, typ, 0, byte(id >> 8), byte(id)}
	}
	var transforms []byte
	transforms = append(transforms, transform(false, 1, privateUse)...) // ENCR
	transforms = append(transforms, transform(false, 2, privateUse)...) // PRF
	transforms = append(transforms, transform(false, 3, privateUse)...) // INTEG
	transforms = append(transforms, transform(true, 4, privateUse)...)  // D-H
	proposal := append([]byte{0, 0, 0, 0, 1, 1, 0, 4}, transforms...)   // last, proposal 1, IKE, no SPI, 4 transforms
	binary.BigEndian.PutUint16(proposal[2:], uint16(len(proposal)))

	var body []byte
	body = appendPayload(body, payloadKE, proposal)
	body = appendPayload(body, payloadNonce, append([]byte{privateUse >> 8, privateUse & 0xff, 0, 0}, ke...))
	body = appendPayload(body, payloadNotify, nonce)
	body = appendPayload(body, payloadNotify, notifyBody(notifyNATSourceIP, natHash(spi, 0, local)))
	body = appendPayload(body, payloadNone, notifyBody(notifyNATDestinationIP, natHash(spi, 0, remote)))

	msg := make([]byte, framing.IKEHeaderSize, framing.IKEHeaderSize+len(body))
	binary.BigEndian.PutUint64(msg[0:], spi)
	msg[16] = payloadSA
	msg[17] = 0x20 // IKEv2
	msg[18] = byte(framing.IKESAInit)
	msg[19] = framing.FlagInitiator
	msg = append(msg, body...)
	binary.BigEndian.PutUint32(msg[24:], uint32(len(msg)))
	return &initRequest{spi: spi, bytes: msg}, nil
}

// appendPayload appends a generic payload header (whose Next Payload names
// the payload after this one) and body.
func appendPayload(dst []byte, next byte, body []byte) []byte {
	n := 4 + len(body)
	dst = append(dst, next, 0, byte(n>>8), byte(n))
	return append(dst, body...)
}

func notifyBody(typ uint16, data []byte) []byte {
	return append([]byte{0, 0, byte(typ >> 8), byte(typ)}, data...)
}

// natHash is RFC 7296 2.23's NAT detection hash: SHA-1 of both SPIs, the
// address and the port.
func natHash(ispi, rspi uint64, ap netip.AddrPort) []byte {
	h := sha1.New()
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], ispi)
	binary.BigEndian.PutUint64(b[8:], rspi)
	h.Write(b[:16])
	a := ap.Addr().Unmap()
	h.Write(a.AsSlice())
	binary.BigEndian.PutUint16(b[16:], ap.Port())
	h.Write(b[16:])
	return h.Sum(nil)
}

// initAnswer is what a responder's answer to the probe said.
type initAnswer struct {
	// Kind: "IKE_SA_INIT response", "NO_PROPOSAL_CHOSEN",
	// "INVALID_KE_PAYLOAD" or "COOKIE".
	Kind string
	// NATSeen is set when the answer carried NAT detection for the
	// probe's address: Translated then says whether the responder saw
	// the probe come from another address or port than it was sent from.
	NATSeen, Translated bool
	// Cookie is the COOKIE notify's data, with Kind "COOKIE".
	Cookie []byte
}

var errNotAnswer = errors.New("not an answer to the probe")

// parseAnswer reads msg (without the non-ESP marker) as the answer to req
// sent from local.
func parseAnswer(msg []byte, req *initRequest, local netip.AddrPort) (initAnswer, error) {
	var h framing.IKEHeader
	if err := h.Decode(msg); err != nil || h.InitiatorSPI != req.spi || !h.IsResponse() || h.Exchange != framing.IKESAInit {
		return initAnswer{}, errNotAnswer
	}
	ans := initAnswer{Kind: "IKE_SA_INIT response"}
	next, p := msg[16], msg[framing.IKEHeaderSize:]
	for range 64 {
		if next == payloadNone || len(p) < 4 {
			break
		}
		n := int(binary.BigEndian.Uint16(p[2:]))
		if n < 4 || n > len(p) {
			return initAnswer{}, errNotAnswer
		}
		body := p[4:n]
		if next == payloadNotify && len(body) >= 4 {
			spiSize := int(body[1])
			typ := binary.BigEndian.Uint16(body[2:])
			data := body[min(len(body), 4+spiSize):]
			switch typ {
			case notifyNoProposalChosen:
				ans.Kind = "NO_PROPOSAL_CHOSEN"
			case notifyInvalidKE:
				ans.Kind = "INVALID_KE_PAYLOAD"
			case notifyCookie:
				ans.Kind = "COOKIE"
				ans.Cookie = append([]byte(nil), data...)
			case notifyNATDestinationIP:
				ans.NATSeen = true
				ans.Translated = string(data) != string(natHash(req.spi, h.ResponderSPI, local))
			}
		}
		next, p = p[0], p[n:]
	}
	return ans, nil
}
