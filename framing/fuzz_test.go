package framing

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"testing/iotest"
)

// FuzzDecoder feeds arbitrary streams to the decoder. Invariants: it never
// panics, every payload it returns re-encodes to exactly the bytes it
// consumed, and it ends with EOF or one of its documented errors.
func FuzzDecoder(f *testing.F) {
	f.Add(stream(true, espPayload(100, 1, 1), []byte{KeepaliveByte}), true, uint8(0))
	f.Add(stream(true, ikePayload(40, 1, 0, IKESAInit, FlagInitiator, 0)), true, uint8(1))
	f.Add(append([]byte(Prefix), 0, 1), true, uint8(0))
	f.Add([]byte("GET / HTTP/1.1\r\n"), true, uint8(0))
	f.Add(stream(false, espPayload(3000, 1, 1)), false, uint8(2))
	f.Add(stream(true, espPayload(2000, 1, 1), espPayload(10, 2, 2)), true, uint8(5))
	f.Fuzz(func(t *testing.T, in []byte, prefix bool, mode uint8) {
		var r io.Reader = bytes.NewReader(in)
		switch mode % 3 {
		case 1:
			r = iotest.OneByteReader(r)
		case 2:
			r = iotest.HalfReader(r)
		}
		d := NewDecoder(r, MinBufferSize, prefix)
		if mode&4 != 0 {
			d.SetHeadroom(48)
		}
		var rebuilt []byte
		skipped := false
		if prefix {
			rebuilt = append(rebuilt, Prefix...)
		}
		for i := 0; i <= len(in); i++ {
			p, err := d.Next()
			if err == io.EOF {
				if prefix && len(in) == 0 {
					return // closed before sending anything
				}
				if !skipped && !bytes.Equal(rebuilt, in) {
					t.Fatalf("clean EOF but frames rebuild %d of %d bytes", len(rebuilt), len(in))
				}
				return
			}
			if errors.Is(err, ErrTooLarge) {
				skipped = true
				continue
			}
			if err != nil {
				for _, known := range []error{ErrBadPrefix, ErrBadLength, ErrTruncated} {
					if errors.Is(err, known) {
						framesSeen := !prefix || len(rebuilt) > len(Prefix)
						if framesSeen && !skipped && !bytes.HasPrefix(in, rebuilt) {
							t.Fatal("frames returned before the error are not a prefix of the input")
						}
						return
					}
				}
				t.Fatalf("undocumented error %v", err)
			}
			rebuilt = AppendFrame(rebuilt, p)
		}
		t.Fatal("decoder returned more frames than input bytes")
	})
}

// FuzzMessageDecode checks classification and header parsing agree with
// each other on arbitrary payloads.
func FuzzMessageDecode(f *testing.F) {
	f.Add(ikePayload(60, 7, 8, IKEAuth, FlagResponse, 3))
	f.Add(espPayload(64, 9, 10))
	f.Add([]byte{KeepaliveByte})
	f.Add([]byte{0, 0, 0, 0, 1})
	f.Add(AppendControl(nil, ControlClaim, make([]byte, 8+ControlMACSize)))
	f.Add(AppendControl(nil, ControlJoin, make([]byte, JoinSize)))
	f.Add(AppendControl(nil, ControlJoined, make([]byte, JoinedSize)))
	f.Add(AppendProbe(nil, Probe{Seq: 3, Clock: 42, Flags: ProbeReply}))
	f.Fuzz(func(t *testing.T, p []byte) {
		var m Message
		err := m.Decode(p)
		if m.Kind != Classify(p) {
			t.Fatalf("Decode kind %v, Classify %v", m.Kind, Classify(p))
		}
		switch m.Kind {
		case KindIKE:
			if err == nil && (m.IKE.MajorVersion != 2 || int(m.IKE.Length) != len(p)-MarkerSize ||
				m.IKE.InitiatorSPI != binary.BigEndian.Uint64(p[MarkerSize:])) {
				t.Fatalf("accepted inconsistent IKE header %+v for %d bytes", m.IKE, len(p))
			}
		case KindESP:
			if (err == nil) != (binary.BigEndian.Uint32(p) != 0) {
				t.Fatalf("ESP with SPI %x: err %v", p[:4], err)
			}
		case KindKeepalive:
			if err != nil {
				t.Fatalf("keepalive: %v", err)
			}
		case KindControl:
			if err == nil {
				back := AppendControl(nil, m.Control.Type, m.Control.Body)
				if !bytes.Equal(back, p) {
					t.Fatalf("control %v does not encode back to what it decoded from", m.Control.Type)
				}
				checkAggregateControl(t, &m.Control, p)
			}
		case KindInvalid:
			if err == nil {
				t.Fatal("invalid payload decoded without error")
			}
		}
	})
}

// checkAggregateControl checks that a Join or Probe parses to fields that
// encode back to the same bytes.
func checkAggregateControl(t *testing.T, c *Control, p []byte) {
	switch c.Type {
	case ControlJoin:
		j := c.Join()
		back := AppendControl(nil, ControlJoin, j.Location[:], binary.BigEndian.AppendUint64(nil, j.Session),
			[]byte{j.Algorithm, j.Weight, j.Member}, j.MAC)
		if !bytes.Equal(back, p) || j.Session != c.SessionID() {
			t.Fatalf("join %+v does not encode back to what it decoded from", j)
		}
	case ControlProbe:
		if back := AppendProbe(nil, c.Probe()); !bytes.Equal(back, p) {
			t.Fatalf("probe %+v does not encode back to what it decoded from", c.Probe())
		}
	}
}

// FuzzIKEHeaderDecode checks the IKE header decoder on raw messages.
func FuzzIKEHeaderDecode(f *testing.F) {
	f.Add(ikeMessage(28, 1, 0, IKESAInit, FlagInitiator, 0))
	f.Add(ikeMessage(500, 1, 2, Informational, 0, 9))
	f.Fuzz(func(t *testing.T, msg []byte) {
		var h IKEHeader
		if err := h.Decode(msg); err == nil {
			if len(msg) < IKEHeaderSize || int(h.Length) != len(msg) || h.MajorVersion != 2 {
				t.Fatalf("accepted %+v for %d bytes", h, len(msg))
			}
		}
	})
}

// FuzzESPHeaderDecode checks the ESP header decoder.
func FuzzESPHeaderDecode(f *testing.F) {
	f.Add(espPayload(8, 1, 1))
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		var h ESPHeader
		if err := h.Decode(pkt); err == nil {
			if len(pkt) < ESPHeaderSize || h.SPI == 0 || h.SPI != binary.BigEndian.Uint32(pkt) || h.Seq != binary.BigEndian.Uint32(pkt[4:]) {
				t.Fatalf("accepted %+v from %x", h, pkt)
			}
		}
	})
}
