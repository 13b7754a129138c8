package lab

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// RFC 9329 on the wire, as anyone on the path sees it: the originator
// sends the prefix once, then frames of a 2-byte Length (counting itself)
// and a payload: ESP, which starts with its non-zero SPI, or IKE behind a
// non-ESP marker of four zero bytes. The lab reads it with a parser of
// its own, not iketcp's, so that a test sees what the wire says.
const (
	// RFC9329Prefix starts the originator's stream (RFC 9329 4).
	RFC9329Prefix = "IKETCP"
	// frameLengthSize is the size of the Length field in front of a frame.
	frameLengthSize = 2
	// ikeHeaderSize is the fixed IKEv2 header (RFC 7296 3.1).
	ikeHeaderSize = 28
	// maxReservedSPI is the highest SPI that RFC 4303 2.1 reserves: no SA
	// uses 1 to 255 (iketcp's own control messages do).
	maxReservedSPI = 255
)

// IKEv2 exchange types (RFC 7296 3.1).
const (
	ExchangeIKESAInit     = 34
	ExchangeIKEAuth       = 35
	ExchangeCreateChildSA = 36
	ExchangeInformational = 37
)

// IKESAInitDatagram returns what a daemon's first datagram to port 4500
// begins with: the non-ESP marker and the fixed header of an IKE_SA_INIT
// request (initiator flag, message ID 0, no responder SPI) from the
// initiator SPI spi, with no payloads. Sent to `iketcp client` in place of
// a daemon's, it makes the client open its connection to the server: the
// way to watch a client connect, or fail to, without a daemon.
func IKESAInitDatagram(spi uint64) []byte {
	b := make([]byte, 4+ikeHeaderSize)
	m := b[4:] // after the non-ESP marker
	binary.BigEndian.PutUint64(m[0:], spi)
	m[17] = 0x20 // version 2.0
	m[18] = ExchangeIKESAInit
	m[19] = 0x08 // initiator
	binary.BigEndian.PutUint32(m[24:], ikeHeaderSize)
	return b
}

// Frame is the payload of one RFC 9329 frame.
type Frame []byte

// ESPSPI returns the SPI of an ESP frame; ok is false for IKE, for
// frames too short for an ESP header, and for the reserved SPIs 1 to 255.
func (f Frame) ESPSPI() (spi uint32, ok bool) {
	if len(f) < 8 {
		return 0, false
	}
	spi = binary.BigEndian.Uint32(f)
	return spi, spi > maxReservedSPI
}

// IKEHeader is the fixed header of an IKEv2 message.
type IKEHeader struct {
	InitiatorSPI, ResponderSPI uint64
	Exchange                   uint8
	Response                   bool // the R flag
	MessageID                  uint32
}

// IKE returns the header of an IKE frame; ok is false for anything else.
func (f Frame) IKE() (h IKEHeader, ok bool) {
	if len(f) < 4+ikeHeaderSize || binary.BigEndian.Uint32(f) != 0 {
		return IKEHeader{}, false
	}
	m := f[4:]
	return IKEHeader{
		InitiatorSPI: binary.BigEndian.Uint64(m[0:]),
		ResponderSPI: binary.BigEndian.Uint64(m[8:]),
		Exchange:     m[18],
		Response:     m[19]&0x20 != 0,
		MessageID:    binary.BigEndian.Uint32(m[20:]),
	}, true
}

// SplitRFC9329 splits an originator's RFC 9329 stream (the prefix, then
// frames) into its frames' payloads, which alias stream. A frame cut off
// at the end (a capture stopped mid-frame) is left out.
func SplitRFC9329(stream []byte) ([]Frame, error) {
	if len(stream) < len(RFC9329Prefix) || string(stream[:len(RFC9329Prefix)]) != RFC9329Prefix {
		return nil, fmt.Errorf("stream does not begin with %q: %q", RFC9329Prefix, stream[:min(len(stream), len(RFC9329Prefix))])
	}
	var frames []Frame
	rest := stream[len(RFC9329Prefix):]
	for len(rest) >= frameLengthSize {
		n := int(binary.BigEndian.Uint16(rest))
		if n <= frameLengthSize {
			return frames, fmt.Errorf("frame %d has Length %d", len(frames), n)
		}
		if n > len(rest) {
			break
		}
		frames = append(frames, Frame(rest[frameLengthSize:n]))
		rest = rest[n:]
	}
	return frames, nil
}

// AppendFrame appends an RFC 9329 frame carrying payload to dst.
func AppendFrame(dst []byte, payload []byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, uint16(frameLengthSize+len(payload)))
	return append(dst, payload...)
}

// maxKept bounds the bytes a RawPeer keeps of what it receives (it counts
// them all).
const maxKept = 64 << 10

// rawPeerWriteTimeout bounds each Send.
const rawPeerWriteTimeout = 2 * time.Second

// RawPeer is an RFC 9329 originator with no IKE of its own: it sends the
// prefix, then whatever frames it is given, and records everything the
// other end sends back. It is the stranger of the tests, who has only
// what it saw on the wire. A goroutine reads until Close.
type RawPeer struct {
	conn net.Conn
	done chan struct{} // closed when the reader has ended

	mu       sync.Mutex // guards the following
	received int
	kept     []byte
	readErr  error // what ended the reader: io.EOF if the other end closed
}

// DialRFC9329 connects from the namespace to an RFC 9329 responder at
// address and sends the prefix.
func (ns *Namespace) DialRFC9329(ctx context.Context, address string) (*RawPeer, error) {
	conn, err := ns.Dial(ctx, "tcp", address)
	if err != nil {
		return nil, fmt.Errorf("connect from %s to %s: %w", ns.Role, address, err)
	}
	p := &RawPeer{conn: conn, done: make(chan struct{})}
	go p.read()
	if err := p.write([]byte(RFC9329Prefix)); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// read records what arrives until the connection fails or is closed.
func (p *RawPeer) read() {
	defer close(p.done)
	buf := make([]byte, 4096)
	for {
		n, err := p.conn.Read(buf)
		p.mu.Lock()
		p.received += n
		if keep := min(n, maxKept-len(p.kept)); keep > 0 {
			p.kept = append(p.kept, buf[:keep]...)
		}
		if err != nil {
			p.readErr = err
		}
		p.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// Send sends each payload as a frame, all in one write.
func (p *RawPeer) Send(payloads ...[]byte) error {
	var b []byte
	for _, pl := range payloads {
		b = AppendFrame(b, pl)
	}
	return p.write(b)
}

func (p *RawPeer) write(b []byte) error {
	p.conn.SetWriteDeadline(time.Now().Add(rawPeerWriteTimeout))
	if _, err := p.conn.Write(b); err != nil {
		return fmt.Errorf("send to %s: %w", p.conn.RemoteAddr(), err)
	}
	return nil
}

// Received returns how many bytes the other end has sent so far, the
// first of them (up to 64 KiB), and what ended reading (nil while the
// connection is open; io.EOF if the other end closed it).
func (p *RawPeer) Received() (n int, first []byte, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.received, append([]byte(nil), p.kept...), p.readErr
}

// LocalAddr is the peer's end of the connection.
func (p *RawPeer) LocalAddr() string { return p.conn.LocalAddr().String() }

// Close closes the connection and waits for the reader to end. Calling it
// again is harmless.
func (p *RawPeer) Close() error {
	err := p.conn.Close()
	<-p.done
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
