package framing

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/netip"
	"testing"
	"testing/iotest"
)

// ikeMessage builds an IKEv2 message of total size n (n >= IKEHeaderSize)
// with the given SPIs, exchange and flags.
func ikeMessage(n int, ispi, rspi uint64, xchg ExchangeType, flags uint8, msgID uint32) []byte {
	b := make([]byte, n)
	binary.BigEndian.PutUint64(b[0:], ispi)
	binary.BigEndian.PutUint64(b[8:], rspi)
	b[16] = 33 // SA payload
	b[17] = 0x20
	b[18] = byte(xchg)
	b[19] = flags
	binary.BigEndian.PutUint32(b[20:], msgID)
	binary.BigEndian.PutUint32(b[24:], uint32(n))
	return b
}

// ikePayload is ikeMessage behind the non-ESP marker: a port-4500 datagram.
func ikePayload(n int, ispi, rspi uint64, xchg ExchangeType, flags uint8, msgID uint32) []byte {
	return append(make([]byte, MarkerSize), ikeMessage(n, ispi, rspi, xchg, flags, msgID)...)
}

func espPayload(n int, spi, seq uint32) []byte {
	b := make([]byte, n)
	binary.BigEndian.PutUint32(b, spi)
	binary.BigEndian.PutUint32(b[4:], seq)
	for i := ESPHeaderSize; i < n; i++ {
		b[i] = byte(i)
	}
	return b
}

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want Kind
	}{
		{"empty", nil, KindInvalid},
		{"keepalive", []byte{0xff}, KindKeepalive},
		{"one other byte", []byte{0x00}, KindInvalid},
		{"two 0xff", []byte{0xff, 0xff}, KindInvalid},
		{"marker only", make([]byte, 4), KindInvalid},
		{"marker and short header", make([]byte, 4+27), KindInvalid},
		{"IKE", ikePayload(28, 1, 0, IKESAInit, FlagInitiator, 0), KindIKE},
		{"ESP minimal", espPayload(8, 0x1234, 1), KindESP},
		{"ESP 1400", espPayload(1400, 0xc0ffee, 7), KindESP},
		{"ESP too short", espPayload(8, 1, 1)[:7], KindInvalid},
	}
	for _, tt := range tests {
		if got := Classify(tt.in); got != tt.want {
			t.Errorf("%s: Classify = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestIKEHeaderDecode(t *testing.T) {
	msg := ikeMessage(120, 0xf050ac7a151a3b31, 0x3b46b71108eea2e2, IKEAuth, FlagInitiator|FlagResponse, 7)
	var h IKEHeader
	if err := h.Decode(msg); err != nil {
		t.Fatal(err)
	}
	want := IKEHeader{
		InitiatorSPI: 0xf050ac7a151a3b31, ResponderSPI: 0x3b46b71108eea2e2,
		NextPayload: 33, MajorVersion: 2, MinorVersion: 0, Exchange: IKEAuth,
		Flags: FlagInitiator | FlagResponse, MessageID: 7, Length: 120,
	}
	if h != want {
		t.Fatalf("decoded %+v, want %+v", h, want)
	}
	if !h.IsInitiator() || !h.IsResponse() {
		t.Fatalf("flags: initiator=%v response=%v", h.IsInitiator(), h.IsResponse())
	}

	errs := []struct {
		name string
		in   []byte
		want error
	}{
		{"short", msg[:27], ErrShortIKE},
		{"IKEv1", func() []byte { b := bytes.Clone(msg); b[17] = 0x10; return b }(), ErrIKEVersion},
		{"length too big", func() []byte { b := bytes.Clone(msg); b[27]++; return b }(), ErrIKELength},
		{"trailing bytes", append(bytes.Clone(msg), 0), ErrIKELength},
	}
	for _, tt := range errs {
		if err := h.Decode(tt.in); !errors.Is(err, tt.want) {
			t.Errorf("%s: err = %v, want %v", tt.name, err, tt.want)
		}
	}
}

func TestESPHeaderDecode(t *testing.T) {
	var h ESPHeader
	if err := h.Decode(espPayload(100, 0xc1234567, 42)); err != nil {
		t.Fatal(err)
	}
	if h.SPI != 0xc1234567 || h.Seq != 42 {
		t.Fatalf("decoded %+v", h)
	}
	if err := h.Decode(make([]byte, 7)); !errors.Is(err, ErrShortESP) {
		t.Errorf("short: %v", err)
	}
	if err := h.Decode(make([]byte, 8)); !errors.Is(err, ErrZeroSPI) {
		t.Errorf("zero SPI: %v", err)
	}
}

func TestMessageDecode(t *testing.T) {
	var m Message
	if err := m.Decode(ikePayload(80, 9, 0, IKESAInit, FlagInitiator, 0)); err != nil || m.Kind != KindIKE || m.IKE.InitiatorSPI != 9 || m.IKE.Exchange != IKESAInit {
		t.Errorf("IKE: %v %+v", err, m)
	}
	if err := m.Decode(espPayload(64, 5, 6)); err != nil || m.Kind != KindESP || m.ESP.SPI != 5 || m.ESP.Seq != 6 {
		t.Errorf("ESP: %v %+v", err, m)
	}
	if err := m.Decode([]byte{0xff}); err != nil || m.Kind != KindKeepalive {
		t.Errorf("keepalive: %v %+v", err, m)
	}
	if err := m.Decode(make([]byte, 10)); !errors.Is(err, ErrShortIKE) {
		t.Errorf("marker with short IKE: %v", err)
	}
	if err := m.Decode([]byte{1, 2, 3}); !errors.Is(err, ErrNotMessage) {
		t.Errorf("3 bytes: %v", err)
	}
	bad := ikePayload(80, 9, 0, IKESAInit, FlagInitiator, 0)
	bad[4+17] = 0x10
	if err := m.Decode(bad); !errors.Is(err, ErrIKEVersion) {
		t.Errorf("IKEv1 behind marker: %v", err)
	}
}

func TestAppendFrameAndPutLength(t *testing.T) {
	p := espPayload(1400, 1, 2)
	f := AppendFrame(nil, p)
	if len(f) != 1402 || binary.BigEndian.Uint16(f) != 1402 || !bytes.Equal(f[2:], p) {
		t.Fatalf("frame header %x, len %d", f[:2], len(f))
	}
	ka := AppendFrame(nil, []byte{KeepaliveByte})
	if !bytes.Equal(ka, []byte{0, 3, 0xff}) {
		t.Fatalf("keepalive frame %x", ka)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("PutLength accepted a payload over MaxPayload")
		}
	}()
	PutLength(make([]byte, 2), MaxPayload+1)
}

// stream builds prefix + frames.
func stream(prefix bool, payloads ...[]byte) []byte {
	var b []byte
	if prefix {
		b = append(b, Prefix...)
	}
	for _, p := range payloads {
		b = AppendFrame(b, p)
	}
	return b
}

func TestDecoder(t *testing.T) {
	ike := ikePayload(300, 0xabc, 0, IKESAInit, FlagInitiator, 0)
	esp := espPayload(1400, 0xc0ffee, 1)
	ka := []byte{KeepaliveByte}
	good := stream(true, ike, esp, ka, esp)

	readers := map[string]func([]byte) io.Reader{
		"whole":       func(b []byte) io.Reader { return bytes.NewReader(b) },
		"byte a read": func(b []byte) io.Reader { return iotest.OneByteReader(bytes.NewReader(b)) },
		"half reads":  func(b []byte) io.Reader { return iotest.HalfReader(bytes.NewReader(b)) },
		"data+EOF":    func(b []byte) io.Reader { return iotest.DataErrReader(bytes.NewReader(b)) },
	}
	for name, mk := range readers {
		d := NewDecoder(mk(good), MaxFrame, true)
		for i, want := range [][]byte{ike, esp, ka, esp} {
			got, err := d.Next()
			if err != nil {
				t.Fatalf("%s: frame %d: %v", name, i, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s: frame %d: got %d bytes, want %d", name, i, len(got), len(want))
			}
		}
		if _, err := d.Next(); err != io.EOF {
			t.Fatalf("%s: after last frame: %v, want io.EOF", name, err)
		}
	}

	bad := []struct {
		name   string
		in     []byte
		prefix bool
		want   error
		check  func(error) bool
	}{
		{"no prefix", stream(false, esp), true, ErrBadPrefix, func(err error) bool {
			var pe *PrefixError
			return errors.As(err, &pe) && len(pe.Got) == len(Prefix)
		}},
		{"HTTP instead of prefix", []byte("GET / HTTP/1.1\r\n"), true, ErrBadPrefix, nil},
		{"prefix cut short", []byte("IKET"), true, ErrTruncated, func(err error) bool {
			var te *TruncatedError
			return errors.As(err, &te) && te.Discarded == 4
		}},
		{"length 0", append([]byte(Prefix), 0, 0, 1, 2), true, ErrBadLength, nil},
		{"length 1", append([]byte(Prefix), 0, 1, 1, 2), true, ErrBadLength, func(err error) bool {
			var le *LengthError
			return errors.As(err, &le) && le.Length == 1
		}},
		{"truncated frame", stream(true, esp)[:len(Prefix)+700], true, ErrTruncated, func(err error) bool {
			var te *TruncatedError
			return errors.As(err, &te) && te.Discarded == 700
		}},
		{"truncated length", append(stream(true, esp), 0x05), true, ErrTruncated, nil},
	}
	for _, tt := range bad {
		d := NewDecoder(bytes.NewReader(tt.in), 2048, tt.prefix)
		var err error
		for i := 0; i < 4 && err == nil; i++ {
			_, err = d.Next()
		}
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: err = %v, want %v", tt.name, err, tt.want)
			continue
		}
		if tt.check != nil && !tt.check(err) {
			t.Errorf("%s: error details wrong: %#v", tt.name, err)
		}
		if err.Error() == "" {
			t.Errorf("%s: empty error text", tt.name)
		}
	}
}

// TestDecoderSkipsOversizedFrames checks that a frame over the limit is
// reported and skipped, and the frames after it still arrive.
func TestDecoderSkipsOversizedFrames(t *testing.T) {
	small := espPayload(100, 7, 1)
	big := espPayload(5000, 8, 2)
	for _, bufSize := range []int{2048, 16384} {
		for name, mk := range map[string]func([]byte) io.Reader{
			"whole":       func(b []byte) io.Reader { return bytes.NewReader(b) },
			"byte a read": func(b []byte) io.Reader { return iotest.OneByteReader(bytes.NewReader(b)) },
		} {
			d := NewDecoder(mk(stream(true, small, big, small, big)), bufSize, true)
			d.LimitPayload(1500)
			for i, want := range []error{nil, ErrTooLarge, nil, ErrTooLarge, io.EOF} {
				p, err := d.Next()
				if !errors.Is(err, want) {
					t.Fatalf("buf %d, %s: frame %d: err %v, want %v", bufSize, name, i, err, want)
				}
				if want == nil && !bytes.Equal(p, small) {
					t.Fatalf("buf %d, %s: frame %d corrupted after a skip", bufSize, name, i)
				}
				var le *LengthError
				if want == ErrTooLarge && (!errors.As(err, &le) || le.Length != 5002 || le.Max != 1502) {
					t.Fatalf("skip error details: %#v", err)
				}
			}
		}
	}
	d := NewDecoder(bytes.NewReader(stream(false, big)[:3000]), 2048, false)
	if _, err := d.Next(); !errors.Is(err, ErrTruncated) {
		t.Fatalf("stream ending inside a skipped frame: %v", err)
	}
}

func TestDecoderReadErrorPassesThrough(t *testing.T) {
	boom := errors.New("connection reset")
	d := NewDecoder(iotest.ErrReader(boom), 0, true)
	if _, err := d.Next(); !errors.Is(err, boom) {
		t.Fatalf("err = %v", err)
	}
	d = NewDecoder(emptyReader{}, 0, false)
	if _, err := d.Next(); !errors.Is(err, io.ErrNoProgress) {
		t.Fatalf("reader making no progress: err = %v", err)
	}
}

type emptyReader struct{}

func (emptyReader) Read([]byte) (int, error) { return 0, nil }

// TestDecoderBufferedKeepsPayloads checks the contract the relay's batching
// relies on: while Buffered is true, Next does not read, so payloads handed
// out since the last read keep their contents.
func TestDecoderBufferedKeepsPayloads(t *testing.T) {
	var payloads [][]byte
	for i := range 10 {
		payloads = append(payloads, espPayload(200+i, uint32(i+1), uint32(i)))
	}
	d := NewDecoder(bytes.NewReader(stream(true, payloads...)), MaxFrame, true)
	var batch [][]byte
	p, err := d.Next()
	if err != nil {
		t.Fatal(err)
	}
	batch = append(batch, p)
	for d.Buffered() {
		p, err := d.Next()
		if err != nil {
			t.Fatal(err)
		}
		batch = append(batch, p)
	}
	if len(batch) != len(payloads) {
		t.Fatalf("one read gave %d frames, want %d", len(batch), len(payloads))
	}
	for i := range batch {
		if !bytes.Equal(batch[i], payloads[i]) {
			t.Fatalf("payload %d changed while Buffered was true", i)
		}
	}
	if d.Buffered() {
		t.Fatal("Buffered true at end of stream")
	}
}

// chunkReader returns its chunks one Read at a time.
type chunkReader struct{ chunks [][]byte }

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0])
	if r.chunks[0] = r.chunks[0][n:]; len(r.chunks[0]) == 0 {
		r.chunks = r.chunks[1:]
	}
	return n, nil
}

// TestDecoderOversizedFrameIsNotBuffered: a payload still held when the
// next frame is over the limit must not be overwritten by the read that
// the frame after it needs. Buffered says false before the oversized
// frame, so a caller that batches while Buffered is true hands its batch
// on first.
func TestDecoderOversizedFrameIsNotBuffered(t *testing.T) {
	a := espPayload(50, 0xa, 1)
	big := espPayload(300, 0xb, 2)
	c := espPayload(150, 0xc, 3)
	s := stream(true, a, big, c)
	// The first read holds a, the oversized frame and the start of c; the
	// rest of c needs a second read.
	cut := len(Prefix) + 2*LengthSize + len(a) + len(big) + 10
	d := NewDecoder(&chunkReader{chunks: [][]byte{s[:cut], s[cut:]}}, MinBufferSize, true)
	d.LimitPayload(200)
	got, err := d.Next()
	if err != nil || !bytes.Equal(got, a) {
		t.Fatalf("first frame: %v", err)
	}
	if d.Buffered() {
		t.Fatal("Buffered is true with an oversized frame next")
	}
	held := bytes.Clone(got)
	if _, err := d.Next(); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized frame: %v, want ErrTooLarge", err)
	}
	if p, err := d.Next(); err != nil || !bytes.Equal(p, c) {
		t.Fatalf("frame after the oversized one: %v", err)
	}
	// The contract: got was valid until a call of Next that Buffered did
	// not vouch for. What a correct caller handed on is what it read.
	if !bytes.Equal(held, a) {
		t.Fatal("the held payload was read wrong")
	}
}

// TestControl: control messages round-trip, are told from ESP, and
// anything malformed or unknown is refused.
func TestControl(t *testing.T) {
	key := bytes.Repeat([]byte{7}, ControlKeySize)
	hello := AppendControl(nil, ControlHello, key)
	var m Message
	if err := m.Decode(hello); err != nil || m.Kind != KindControl || m.Control.Type != ControlHello || !bytes.Equal(m.Control.Body, key) {
		t.Fatalf("hello: %v %+v", err, m)
	}
	ticket := AppendControl(nil, ControlTicket, binary.BigEndian.AppendUint64(nil, 42), binary.BigEndian.AppendUint64(nil, 0xabc))
	if err := m.Decode(ticket); err != nil || m.Control.Type != ControlTicket || m.Control.SessionID() != 42 {
		t.Fatalf("ticket: %v %+v", err, m)
	}
	mac := bytes.Repeat([]byte{9}, ControlMACSize)
	join := AppendControl(nil, ControlJoin, []byte{1, 1, 1, 1}, binary.BigEndian.AppendUint64(nil, 77), []byte{2, 3, 1}, mac)
	if err := m.Decode(join); err != nil || m.Control.Type != ControlJoin || m.Control.SessionID() != 77 {
		t.Fatalf("join: %v %+v", err, m)
	}
	if j := m.Control.Join(); j.Location != [4]byte{1, 1, 1, 1} || j.Session != 77 || j.Algorithm != 2 || j.Weight != 3 ||
		j.Member != 1 || !bytes.Equal(j.MAC, mac) {
		t.Fatalf("join fields: %+v", j)
	}
	joined := AppendControl(nil, ControlJoined, binary.BigEndian.AppendUint64(nil, 77), []byte{1, JoinRefused})
	if err := m.Decode(joined); err != nil || m.Control.Type != ControlJoined || m.Control.SessionID() != 77 || m.Control.Body[9] != JoinRefused {
		t.Fatalf("joined: %v %+v", err, m)
	}
	probe := AppendProbe(make([]byte, 0, 32), Probe{Seq: 0xdeadbeef, Clock: -5, Flags: ProbeReply})
	if err := m.Decode(probe); err != nil || m.Control.Type != ControlProbe {
		t.Fatalf("probe: %v %+v", err, m)
	}
	if p := m.Control.Probe(); p != (Probe{Seq: 0xdeadbeef, Clock: -5, Flags: ProbeReply}) {
		t.Fatalf("probe fields: %+v", p)
	}
	if n := testing.AllocsPerRun(100, func() { probe = AppendProbe(probe[:0], Probe{Seq: 1}) }); n != 0 {
		t.Errorf("AppendProbe into room: %v allocations", n)
	}
	observe := AppendControl(nil, ControlObserve, binary.BigEndian.AppendUint64(nil, 0x1122334455667788))
	if err := m.Decode(observe); err != nil || m.Control.Type != ControlObserve || binary.BigEndian.Uint64(m.Control.Body) != 0x1122334455667788 {
		t.Fatalf("observe: %v %+v", err, m)
	}
	seen := netip.MustParseAddr("203.0.113.1").As16()
	observed := AppendControl(nil, ControlObserved, binary.BigEndian.AppendUint64(nil, 9), seen[:], []byte{0x9c, 0x40})
	if err := m.Decode(observed); err != nil {
		t.Fatalf("observed: %v", err)
	}
	if nonce, addr, port, ok := m.Control.ObservedAddr(); !ok || nonce != 9 || netip.AddrFrom16(addr).Unmap().String() != "203.0.113.1" || port != 40000 {
		t.Fatalf("observed: %v %d %v %d", ok, nonce, addr, port)
	}
	if err := m.Decode(observe); err != nil {
		t.Fatal(err)
	}
	if _, _, _, ok := m.Control.ObservedAddr(); ok {
		t.Fatal("an Observe read as Observed")
	}
	for _, typ := range []ControlType{ControlPing, ControlPong} {
		seq := binary.BigEndian.AppendUint64(nil, 0x0102030405060708)
		p := AppendControl(nil, typ, seq)
		if err := m.Decode(p); err != nil || m.Control.Type != typ || !bytes.Equal(m.Control.Body, seq) || len(p) != ControlHeaderSize+ControlPingSize {
			t.Fatalf("%v: %v %+v", typ, err, m)
		}
		if err := m.Decode(p[:len(p)-1]); !errors.Is(err, ErrControl) {
			t.Errorf("%v with a short body: %v, want ErrControl", typ, err)
		}
	}
	// ESP with any other SPI, reserved or not, is ESP.
	for _, spi := range []uint32{1, ControlSPI - 1, ControlSPI + 1, 0xc0000001} {
		if k := Classify(espPayload(40, spi, 1)); k != KindESP {
			t.Errorf("SPI %#x: %v, want ESP", spi, k)
		}
	}
	bad := map[string][]byte{
		"short":         hello[:8],
		"version":       append(append([]byte(nil), hello[:4]...), append([]byte{2}, hello[5:]...)...),
		"type 0":        append(append([]byte(nil), hello[:5]...), append([]byte{0}, hello[6:]...)...),
		"unknown type":  append(append([]byte(nil), hello[:5]...), append([]byte{99}, hello[6:]...)...),
		"unassigned 7":  append(append([]byte(nil), hello[:5]...), 7, 0, 0, 0, 0, 0, 0, 0, 0),
		"body too long": append(append([]byte(nil), hello...), 0),
		"body short":    hello[:len(hello)-1],
	}
	// Types between the session protocol's and Observe have no body size:
	// an empty body must not pass for one.
	for _, typ := range []byte{7, 31} {
		var c Control
		if err := c.Decode([]byte{0, 0, 0, ControlSPI, ControlVersion, typ}); !errors.Is(err, ErrControl) {
			t.Errorf("unassigned type %d with no body: %v, want ErrControl", typ, err)
		}
	}
	for name, p := range bad {
		if err := m.Decode(p); !errors.Is(err, ErrControl) || m.Kind != KindControl {
			t.Errorf("%s: %v (kind %v), want ErrControl", name, err, m.Kind)
		}
	}
	defer func() {
		if recover() == nil {
			t.Error("AppendControl took a body of the wrong size")
		}
	}()
	AppendControl(nil, ControlClaim, key)
}

// TestDecoderReleaseAndReuse: an empty decoder gives its buffer back and
// reads on with another; one that holds data refuses to.
func TestDecoderReleaseAndReuse(t *testing.T) {
	a, b := espPayload(100, 0xa, 1), espPayload(200, 0xb, 2)
	r := &chunkReader{chunks: [][]byte{stream(true, a), stream(false, b)[:50], stream(false, b)[50:]}}
	d := NewDecoderOn(r, make([]byte, MinBufferSize), true)
	d.SetHeadroom(64)
	if p, err := d.Next(); err != nil || !bytes.Equal(p, a) {
		t.Fatalf("first frame: %v", err)
	}
	if !d.Empty() {
		t.Fatal("not Empty with every byte returned")
	}
	old := d.Release()
	clear(old) // back in a pool, reused by someone else
	d.Reuse(make([]byte, MinBufferSize))
	p, err := d.Next()
	if err != nil || !bytes.Equal(p, b) {
		t.Fatalf("frame after Reuse: %v", err)
	}
	if _, off := d.Offset(p); off < 64+LengthSize {
		t.Fatalf("headroom lost across Reuse: payload at %d", off)
	}
	d2 := NewDecoderOn(&chunkReader{chunks: [][]byte{stream(false, a)[:10]}}, make([]byte, MinBufferSize), false)
	if _, err := d2.Next(); !errors.Is(err, ErrTruncated) {
		t.Fatalf("partial frame: %v", err)
	}
	defer func() {
		if recover() == nil {
			t.Error("NewDecoderOn took a buffer shorter than MinBufferSize")
		}
	}()
	NewDecoderOn(r, make([]byte, 10), false)
}

func TestDecodersDoNotAllocate(t *testing.T) {
	ike := ikePayload(300, 0xabc, 0x123, IKEAuth, FlagInitiator, 1)
	esp := espPayload(1400, 0xc0ffee, 1)
	keepalive := []byte{KeepaliveByte}
	control := AppendControl(nil, ControlHello, make([]byte, ControlKeySize))
	var m Message
	if n := testing.AllocsPerRun(1000, func() {
		_ = m.Decode(ike)
		_ = m.Decode(esp)
		_ = m.Decode(keepalive)
		_ = m.Decode(control)
	}); n != 0 {
		t.Errorf("Message.Decode allocates %v times per run", n)
	}

	frames := stream(false, esp, ike, esp, esp)
	r := bytes.NewReader(frames)
	d := NewDecoder(r, MaxFrame, false)
	if n := testing.AllocsPerRun(1000, func() {
		r.Reset(frames)
		for {
			if _, err := d.Next(); err != nil {
				break
			}
		}
	}); n != 0 {
		t.Errorf("Decoder.Next allocates %v times per stream", n)
	}
	buf := make([]byte, 0, 2000)
	if n := testing.AllocsPerRun(1000, func() { buf = AppendFrame(buf[:0], esp) }); n != 0 {
		t.Errorf("AppendFrame allocates %v times with room", n)
	}
}

// TestDecoderHeadroom checks that with SetHeadroom every payload has the
// promised room in front of it, across reads and compaction, and that the
// stream decodes exactly as without headroom.
func TestDecoderHeadroom(t *testing.T) {
	const room = 48
	var payloads [][]byte
	for i := range 40 {
		payloads = append(payloads, espPayload(100+97*i%1500, uint32(i+1), uint32(i)))
	}
	for name, mk := range map[string]func([]byte) io.Reader{
		"whole":      func(b []byte) io.Reader { return bytes.NewReader(b) },
		"half reads": func(b []byte) io.Reader { return iotest.HalfReader(bytes.NewReader(b)) },
		"byte a read": func(b []byte) io.Reader {
			return iotest.OneByteReader(bytes.NewReader(b))
		},
	} {
		d := NewDecoder(mk(stream(true, payloads...)), 4096, true)
		d.SetHeadroom(room)
		base := &d.buf[0]
		for i, want := range payloads {
			p, err := d.Next()
			if err != nil {
				t.Fatalf("%s: frame %d: %v", name, i, err)
			}
			if !bytes.Equal(p, want) {
				t.Fatalf("%s: frame %d corrupted", name, i)
			}
			buf, off := d.Offset(p)
			if off < room+LengthSize || &buf[0] != base || &buf[off] != &p[0] {
				t.Fatalf("%s: frame %d at offset %d, want at least %d", name, i, off, room+LengthSize)
			}
			// Overwrite the room in front, as a caller writing a header would.
			for j := off - room - LengthSize; j < off; j++ {
				d.buf[j] = 0xee
			}
		}
		if _, err := d.Next(); err != io.EOF {
			t.Fatalf("%s: end: %v", name, err)
		}
	}
	d := NewDecoder(bytes.NewReader(stream(false, espPayload(4060, 1, 1), espPayload(100, 2, 2))), 4096, false)
	d.SetHeadroom(room)
	if _, err := d.Next(); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("frame that fits the buffer but not beside the headroom: %v", err)
	}
	if p, err := d.Next(); err != nil || len(p) != 100 {
		t.Fatalf("frame after a skip with headroom: %d bytes, %v", len(p), err)
	}
}

// stopReader reads r, then fails with errStop instead of io.EOF: a read
// deadline that stops a link's reader.
type stopReader struct{ r io.Reader }

var errStop = errors.New("stopped")

func (s stopReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err == io.EOF {
		err = errStop
	}
	return n, err
}

// TestPendingPreload: a stream read in part by one decoder, stopped
// anywhere (within the prefix, a length, a payload), its pending bytes
// preloaded into another that reads the rest, yields every frame once and
// whole.
func TestPendingPreload(t *testing.T) {
	var stream []byte
	stream = append(stream, Prefix...)
	var want [][]byte
	for i := range 5 {
		p := bytes.Repeat([]byte{byte(i + 1)}, 100+i*37)
		want = append(want, p)
		stream = AppendFrame(stream, p)
	}
	for cut := 0; cut <= len(stream); cut++ {
		first := NewDecoder(stopReader{bytes.NewReader(stream[:cut])}, MinBufferSize, true)
		first.SetHeadroom(16)
		var got [][]byte
		for {
			p, err := first.Next()
			if err != nil {
				if !errors.Is(err, errStop) {
					t.Fatalf("cut %d: %v", cut, err)
				}
				break
			}
			got = append(got, bytes.Clone(p))
		}
		pending, prefix := first.Pending()
		pending = bytes.Clone(pending)
		second := NewDecoder(bytes.NewReader(stream[cut:]), MinBufferSize, prefix)
		second.SetHeadroom(16)
		if !second.Preload(pending) {
			t.Fatalf("cut %d: preload of %d bytes refused", cut, len(pending))
		}
		for {
			p, err := second.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("cut %d: %v", cut, err)
			}
			got = append(got, bytes.Clone(p))
		}
		if len(got) != len(want) {
			t.Fatalf("cut %d: %d frames, want %d", cut, len(got), len(want))
		}
		for i := range want {
			if !bytes.Equal(got[i], want[i]) {
				t.Fatalf("cut %d: frame %d differs", cut, i)
			}
		}
	}
	if NewDecoder(nil, MinBufferSize, false).Preload(make([]byte, MinBufferSize+1)) {
		t.Fatal("a preload larger than the buffer was taken")
	}
}
