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

	modp2048    = 14
	modp2048Len = 256
)

// initRequest is an IKE_SA_INIT request a responder answers as it would a
// real initiator's: one proposal of AES-CBC-128, HMAC-SHA2-256 and MODP
// 2048 (strongSwan's and most gateways' defaults, so the answer is usually
// the responder's own IKE_SA_INIT response; otherwise NO_PROPOSAL_CHOSEN
// or INVALID_KE_PAYLOAD, which answer all the same), a KE of that group,
// a nonce, and NAT detection for the address the probe sends from, so
// that the responder sends its own: the hash of the address it saw.
type initRequest struct {
	spi   uint64
	bytes []byte // the message, without the non-ESP marker
}

func newInitRequest(local, remote netip.AddrPort) (*initRequest, error) {
	var spiBytes [8]byte
	if _, err := rand.Read(spiBytes[:]); err != nil {
		return nil, err
	}
	spi := binary.BigEndian.Uint64(spiBytes[:])
	ke := make([]byte, modp2048Len)
	nonce := make([]byte, 32)
	if _, err := rand.Read(ke); err != nil {
		return nil, err
	}
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	ke[0] &= 0x7f // below the group's prime, whose top bits are all ones

	transform := func(last bool, typ byte, id uint16, keyBits uint16) []byte {
		more := byte(3)
		if last {
			more = 0
		}
		t := []byte{more, 0, 0, 8, typ, 0, byte(id >> 8), byte(id)}
		if keyBits != 0 {
			t = append(t, 0x80, 0x0e, byte(keyBits>>8), byte(keyBits))
			t[3] = 12
		}
		return t
	}
	var transforms []byte
	transforms = append(transforms, transform(false, 1, 12, 128)...) // ENCR_AES_CBC 128
	transforms = append(transforms, transform(false, 2, 5, 0)...)    // PRF_HMAC_SHA2_256
	transforms = append(transforms, transform(false, 3, 12, 0)...)   // AUTH_HMAC_SHA2_256_128
	transforms = append(transforms, transform(true, 4, modp2048, 0)...)
	proposal := append([]byte{0, 0, 0, 0, 1, 1, 0, 4}, transforms...) // last, proposal 1, IKE, no SPI, 4 transforms
	binary.BigEndian.PutUint16(proposal[2:], uint16(len(proposal)))

	var body []byte
	body = appendPayload(body, payloadKE, proposal)
	body = appendPayload(body, payloadNonce, append([]byte{0, modp2048, 0, 0}, ke...))
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
			case notifyNATDestinationIP:
				ans.NATSeen = true
				ans.Translated = string(data) != string(natHash(req.spi, h.ResponderSPI, local))
			}
		}
		next, p = p[0], p[n:]
	}
	return ans, nil
}
