// Package ticket is the cryptography of iketcp's session tickets: how an
// iketcp client proves to an iketcp server that it owns a session, so that
// the server moves the session's return path to the client's new link at
// once after a reconnect, and to no one else's. Standard RFC 9329 peers
// never take part (see framing's control messages for the wire form).
//
// Each link starts with an X25519 exchange (Hello, HelloReply): both ends
// derive the link's key from the shared secret and both public keys with
// HKDF-SHA256. When a session is confirmed the server sends a Ticket on
// the link that carries it: the session's key is that link's key, which
// never crossed the wire, so a passive observer of the link cannot learn
// it. On a later link the client sends a Claim: an HMAC-SHA256 under the
// session's key of the session's ID and that link's two public keys. The
// MAC binds the claim to that one link: copied onto another link, whose
// keys differ, it proves nothing.
//
// What this does not stop: an active man in the middle of the first link,
// who can run the exchange with both ends. TLS (with the server's
// certificate checked) closes that too.
package ticket

import (
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// KeySize is the size of public keys, link keys and MACs.
const KeySize = 32

// Key is a link's key, or a session's.
type Key [KeySize]byte

// Exchange is one end of a link's key exchange.
type Exchange struct {
	priv *ecdh.PrivateKey
}

// NewExchange starts a link's key exchange with a fresh key pair.
func NewExchange() (*Exchange, error) {
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ticket: generating a key pair: %w", err)
	}
	return &Exchange{priv: priv}, nil
}

// Public returns this end's public key, to send.
func (e *Exchange) Public() []byte { return e.priv.PublicKey().Bytes() }

// errLowOrder is what X25519 says of a public key that gives an all-zero
// shared secret: a peer trying to force a known key.
var errLowOrder = errors.New("ticket: the peer's public key is not acceptable")

// LinkKey derives the link's key from the peer's public key. client and
// server are the two public keys as the client sent its own and the
// server its own, the same on both ends.
func (e *Exchange) LinkKey(peer, client, server []byte) (Key, error) {
	pub, err := ecdh.X25519().NewPublicKey(peer)
	if err != nil {
		return Key{}, fmt.Errorf("ticket: the peer's public key: %w", err)
	}
	secret, err := e.priv.ECDH(pub)
	if err != nil {
		return Key{}, errLowOrder
	}
	info := make([]byte, 0, len("iketcp link key")+2*KeySize)
	info = append(append(append(info, "iketcp link key"...), client...), server...)
	k, err := hkdf.Key(sha256.New, secret, nil, string(info), KeySize)
	if err != nil {
		return Key{}, err
	}
	return Key(k), nil
}

// ClaimMAC is the proof that whoever sends it knows the key of session id,
// bound to the link whose public keys are client and server.
func ClaimMAC(session Key, id uint64, client, server []byte) [KeySize]byte {
	m := hmac.New(sha256.New, session[:])
	m.Write([]byte("iketcp claim"))
	m.Write(binary.BigEndian.AppendUint64(nil, id))
	m.Write(client)
	m.Write(server)
	var out [KeySize]byte
	m.Sum(out[:0])
	return out
}

// MoveMAC is the proof, bound to the link whose public keys are client and
// server, that whoever sends it knows the key of session id, where ESP
// SPI spi routes now, and so may move that SPI to the link's session.
func MoveMAC(session Key, id uint64, spi uint32, client, server []byte) [KeySize]byte {
	m := hmac.New(sha256.New, session[:])
	m.Write([]byte("iketcp move"))
	m.Write(binary.BigEndian.AppendUint64(nil, id))
	m.Write(binary.BigEndian.AppendUint32(nil, spi))
	m.Write(client)
	m.Write(server)
	var out [KeySize]byte
	m.Sum(out[:0])
	return out
}

// CheckMove reports, in constant time, whether mac is MoveMAC's.
func CheckMove(session Key, id uint64, spi uint32, client, server, mac []byte) bool {
	want := MoveMAC(session, id, spi, client, server)
	return hmac.Equal(want[:], mac)
}

// JoinMAC is the proof, bound to the link whose public keys are client
// and server, that whoever sends it knows the key of session id, and so
// may add the link to that session's aggregate as member index, with the
// location ID, algorithm and weight it declares.
func JoinMAC(session Key, id uint64, location [4]byte, algorithm, weight, index uint8, client, server []byte) [KeySize]byte {
	m := hmac.New(sha256.New, session[:])
	m.Write([]byte("iketcp join"))
	m.Write(binary.BigEndian.AppendUint64(nil, id))
	m.Write(location[:])
	m.Write([]byte{algorithm, weight, index})
	m.Write(client)
	m.Write(server)
	var out [KeySize]byte
	m.Sum(out[:0])
	return out
}

// CheckJoin reports, in constant time, whether mac is JoinMAC's.
func CheckJoin(session Key, id uint64, location [4]byte, algorithm, weight, index uint8, client, server, mac []byte) bool {
	want := JoinMAC(session, id, location, algorithm, weight, index, client, server)
	return hmac.Equal(want[:], mac)
}

// CheckClaim reports, in constant time, whether mac is ClaimMAC's for the
// session, the ID and the link.
func CheckClaim(session Key, id uint64, client, server, mac []byte) bool {
	want := ClaimMAC(session, id, client, server)
	return hmac.Equal(want[:], mac)
}
