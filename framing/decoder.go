package framing

import (
	"encoding/binary"
	"errors"
	"io"
)

// MinBufferSize is the smallest buffer a Decoder accepts. It bounds the
// largest frame that decoder can take: frames longer than its buffer are
// refused with a LengthError wrapping ErrTooLarge.
const MinBufferSize = 2048

// maxEmptyReads bounds how often a reader may return nothing and no error
// before the decoder gives up, as bufio does.
const maxEmptyReads = 100

// Decoder splits an RFC 9329 stream into frames. It reads in large chunks
// into one fixed buffer and hands out payloads that alias that buffer, so
// a burst of frames costs one read and no copies or allocations.
//
// A Decoder is not safe for concurrent use.
type Decoder struct {
	r            io.Reader
	buf          []byte
	headroom     int  // bytes kept free at the front of buf
	start, end   int  // buf[start:end] holds bytes read but not yet returned
	maxFrame     int  // largest frame returned; longer ones are skipped
	expectPrefix bool // the prefix has yet to be checked
	broken       bool // a read failed while a frame was being skipped
}

// NewDecoder returns a decoder reading from r with a buffer of bufSize
// bytes (at least MinBufferSize; MaxFrame or more accepts every frame).
// With expectPrefix, the stream must begin with Prefix, as streams that a
// TCP responder accepts do.
func NewDecoder(r io.Reader, bufSize int, expectPrefix bool) *Decoder {
	return NewDecoderOn(r, make([]byte, max(bufSize, MinBufferSize)), expectPrefix)
}

// NewDecoderOn is NewDecoder with a buffer of the caller's: one from a
// pool, say, that goes back there with Release while the stream is quiet.
// It panics if buf is shorter than MinBufferSize.
func NewDecoderOn(r io.Reader, buf []byte, expectPrefix bool) *Decoder {
	if len(buf) < MinBufferSize {
		panic("framing: decoder buffer shorter than MinBufferSize")
	}
	return &Decoder{r: r, buf: buf, maxFrame: min(len(buf), MaxFrame), expectPrefix: expectPrefix}
}

// Empty reports whether the decoder holds nothing of the stream: every
// byte read has been returned, and no part of a frame waits for more.
// Then its buffer may go back to a pool (Release) until the stream has
// something to read.
func (d *Decoder) Empty() bool { return d.start == d.end }

// Release takes the decoder's buffer away and returns it. The decoder must
// be Empty, and the payloads it returned no longer in use; it reads again
// only after Reuse.
func (d *Decoder) Release() []byte {
	if !d.Empty() {
		panic("framing: Release of a decoder that holds data")
	}
	buf := d.buf
	d.buf = nil
	return buf
}

// Reuse gives the decoder a buffer again, of the length its first one had.
func (d *Decoder) Reuse(buf []byte) {
	d.buf = buf
	d.start, d.end = d.headroom, d.headroom
}

// Offset returns where payload p, returned by Next, starts in the
// decoder's buffer, and the buffer itself. With SetHeadroom(n), buf[:off]
// holds at least n+LengthSize bytes the caller may overwrite once it is
// done with the payloads returned before p.
func (d *Decoder) Offset(p []byte) (buf []byte, off int) {
	return d.buf, cap(d.buf) - cap(p)
}

// SetHeadroom keeps n bytes free in front of the decoder's data, so that
// every payload Next returns has at least n+LengthSize bytes before it
// that the caller may overwrite once it is done with the payloads
// returned before: room to write a header in place. Call it before the
// first Next. It lowers the largest frame accepted by n.
func (d *Decoder) SetHeadroom(n int) {
	n = min(max(n, 0), len(d.buf)-MinBufferSize/2)
	d.headroom = n
	d.start, d.end = n, n
	d.maxFrame = min(d.maxFrame, len(d.buf)-n)
}

// LimitPayload makes the decoder skip frames whose payload is longer than
// n bytes (n is capped by the buffer size). Skipping costs reads but no
// memory: the stream stays usable, and Next reports each skipped frame
// with a *LengthError wrapping ErrTooLarge.
func (d *Decoder) LimitPayload(n int) {
	d.maxFrame = max(min(n+LengthSize, len(d.buf)-d.headroom, MaxFrame), LengthSize+1)
}

// Pending returns the bytes the decoder has read from the stream but not
// yet returned (part of a frame, or frames not yet asked for), and
// whether the prefix is still to be checked, in which case they begin
// with part of it: what a process that hands the stream to another must
// hand over with it. The slice aliases the decoder's buffer.
func (d *Decoder) Pending() (b []byte, prefixPending bool) {
	if d.buf == nil {
		return nil, d.expectPrefix
	}
	return d.buf[d.start:d.end], d.expectPrefix
}

// Resumable reports whether Pending is where the stream stands: false
// once a read failed in the middle of skipping an oversized frame.
func (d *Decoder) Resumable() bool { return !d.broken }

// Preload puts b in front of what the decoder reads from the stream, as
// if read from it: the Pending bytes of the process that read the stream
// before. It reports false, and takes nothing, if b does not fit in the
// buffer beside the headroom. Call it before the first Next.
func (d *Decoder) Preload(b []byte) bool {
	if d.buf == nil || len(b) > len(d.buf)-d.end {
		return false
	}
	d.end += copy(d.buf[d.end:], b)
	return true
}

// ReadPrefix reads and checks the stream prefix if the decoder expects one
// and has not checked it yet; Next calls it when needed. Calling it first
// lets a server put a deadline on the prefix alone.
func (d *Decoder) ReadPrefix() error {
	if !d.expectPrefix {
		return nil
	}
	if err := d.fill(len(Prefix)); err != nil {
		return err
	}
	if string(d.buf[d.start:d.start+len(Prefix)]) != Prefix {
		got := append([]byte(nil), d.buf[d.start:d.start+len(Prefix)]...)
		return &PrefixError{Got: got}
	}
	d.start += len(Prefix)
	d.expectPrefix = false
	return nil
}

// Buffered reports whether the next call to Next will return a frame
// without reading from the stream (and so without invalidating payloads
// returned earlier). A frame over the limit is never reported buffered,
// even when it is: Next skips it and moves on to the frame after it,
// which may need a read, so a caller that holds payloads must be done
// with them before that call.
func (d *Decoder) Buffered() bool {
	if d.expectPrefix || d.end-d.start < LengthSize {
		return false
	}
	n := int(binary.BigEndian.Uint16(d.buf[d.start:]))
	return n >= LengthSize && n <= d.maxFrame && d.end-d.start >= n
}

// Next returns the payload of the next frame: a datagram in port-4500 form
// (IKE with its marker, ESP, or keepalive). The payload aliases the
// decoder's buffer; it stays valid until a call to Next that reads from the
// stream, which Buffered predicts.
//
// At a clean end of stream Next returns io.EOF. A stream that ends inside
// the prefix or a frame gives a *TruncatedError. A wrong prefix gives a
// *PrefixError and a Length of 0 or 1 a *LengthError wrapping
// ErrBadLength: these are fatal for the connection (RFC 9329 3, 4).
// A frame over the payload limit gives a *LengthError wrapping ErrTooLarge
// after the frame has been skipped; that one is not fatal. Read errors are
// returned as they are.
func (d *Decoder) Next() ([]byte, error) {
	if err := d.ReadPrefix(); err != nil {
		return nil, err
	}
	if err := d.fill(LengthSize); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(d.buf[d.start:]))
	if n < LengthSize {
		return nil, &LengthError{Length: n, Max: d.maxFrame}
	}
	if n > d.maxFrame {
		if err := d.skip(n); err != nil {
			return nil, err
		}
		return nil, &LengthError{Length: n, Max: d.maxFrame}
	}
	if err := d.fill(n); err != nil {
		return nil, err
	}
	p := d.buf[d.start+LengthSize : d.start+n]
	d.start += n
	return p, nil
}

// skip discards the next n bytes of the stream, reading into the buffer.
func (d *Decoder) skip(n int) error {
	skipped := 0
	for empty := 0; ; {
		if buffered := d.end - d.start; buffered >= n-skipped {
			d.start += n - skipped
			return nil
		}
		skipped += d.end - d.start
		m, err := d.r.Read(d.buf[d.headroom:])
		d.start, d.end = d.headroom, d.headroom+m
		if m >= n-skipped {
			continue
		}
		switch {
		case errors.Is(err, io.EOF):
			d.end = d.headroom
			return &TruncatedError{Discarded: skipped + m}
		case err != nil:
			d.broken = true // where the skipped frame ends is lost
			return err
		case m == 0:
			if empty++; empty == maxEmptyReads {
				return io.ErrNoProgress
			}
		}
	}
}

// fill makes sure at least n bytes are buffered, reading as much as the
// buffer holds in each read. It moves buffered bytes to the front only
// when it has to read, which is what keeps earlier payloads valid while
// Buffered is true.
func (d *Decoder) fill(n int) error {
	if d.end-d.start >= n {
		return nil
	}
	if d.start > d.headroom {
		d.end = d.headroom + copy(d.buf[d.headroom:], d.buf[d.start:d.end])
		d.start = d.headroom
	}
	for empty := 0; d.end-d.start < n; {
		m, err := d.r.Read(d.buf[d.end:])
		d.end += m
		if d.end-d.start >= n {
			return nil
		}
		if m == 0 && err == nil {
			if empty++; empty == maxEmptyReads {
				return io.ErrNoProgress
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				partial := d.end - d.start
				d.end = d.start
				if partial == 0 {
					return io.EOF
				}
				return &TruncatedError{Discarded: partial}
			}
			return err
		}
	}
	return nil
}
