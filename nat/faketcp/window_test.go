package faketcp

import (
	"math"
	"net/netip"
	"testing"
	"time"
)

// TestSendWindowTracking follows where the window the peer advertised
// ends: a dialled conn's starts at the SYN-ACK's window, never scaled,
// then moves with the peer's acks and scaled windows, never back, and
// never for an ack of data this side did not send; an accepted conn's
// starts at the handshake ACK's scaled window.
func TestSendWindowTracking(t *testing.T) {
	cfg := defaultTCBConfig()
	now := harnessStart
	c, _ := newActiveTCB(cfg, now, 1000)
	if room := c.sendRoom(); room != 0 {
		t.Errorf("SYN_SENT: room %d", room)
	}
	synAck := segment{flags: flagSYN | flagACK, seq: 5000, ack: 1001, window: 64240, mss: 1460, windowScale: true, wsShift: 9}
	c.receive(now, &synAck)
	if room := c.sendRoom(); room != 64240 || c.peerShift != 9 {
		t.Fatalf("after the SYN-ACK: room %d, shift %d; want 64240, 9", room, c.peerShift)
	}
	c.dataFields(60000)
	if room := c.sendRoom(); room != 4240 {
		t.Errorf("after 60000 bytes: room %d", room)
	}
	ack := segment{flags: flagACK, seq: 5001, ack: 1001 + 1000, window: 1000}
	c.receive(now, &ack)
	want := int64(1000 + 1000<<9 - 60000)
	if room := c.sendRoom(); room != want {
		t.Errorf("after an ACK of 1000 with window 1000<<9: room %d, want %d", room, want)
	}
	smaller := segment{flags: flagACK, seq: 5001, ack: 1001 + 2000, window: 10}
	c.receive(now, &smaller)
	if room := c.sendRoom(); room != want {
		t.Errorf("a smaller window moved the end back: room %d, want %d", room, want)
	}
	bogus := segment{flags: flagACK, seq: 5001, ack: 1001 + 70000, window: 65535}
	c.receive(now, &bogus)
	if room := c.sendRoom(); room != want {
		t.Errorf("an ack of unsent data moved the end: room %d, want %d", room, want)
	}
	c.dataFields(int(c.sendRoom()) + 500)
	if room := c.sendRoom(); room != 0 {
		t.Errorf("past the end: room %d, want 0", room)
	}

	// An accepted conn: its cookie kept only that the SYN offered
	// scaling, so it takes this stack's own shift.
	p := newPassiveTCB(cfg, now, synCookie{iss: 7000, peerMSS: 1460, windowScale: true}, 3000)
	hsAck := segment{flags: flagACK, seq: 3001, ack: 7001, window: 64240}
	p.receive(now, &hsAck)
	if room := p.sendRoom(); room != 64240<<windowScale {
		t.Errorf("accepted: room %d, want %d", room, 64240<<windowScale)
	}
	noScale := newPassiveTCB(cfg, now, synCookie{iss: 7000, peerMSS: 1460}, 3000)
	noScale.receive(now, &hsAck)
	if room := noScale.sendRoom(); room != 64240 {
		t.Errorf("accepted without scaling: room %d, want 64240", room)
	}

	// Frozen data does not move through the sequence space.
	frozen := cfg
	frozen.mode = SeqFrozen
	f := newPassiveTCB(frozen, now, synCookie{iss: 7000, peerMSS: 1460}, 3000)
	if room := f.sendRoom(); room != math.MaxInt64 {
		t.Errorf("frozen: room %d", room)
	}
}

// TestSendHoldsToTheWindow sends more than the peer's window without an
// ACK: Send sends what fits, drops the rest of each batch without an
// error, and counts it; the peer's ACK opens the window again.
func TestSendHoldsToTheWindow(t *testing.T) {
	for _, offload := range []bool{false, true} {
		s, dev, c, r := drivenStackOn(t, &recordDevice{keep: true, offload: offload}, Config{Local: addr4A}, netip.AddrPortFrom(addr4B, 40000))
		dev.mu.Lock()
		dev.keep = false
		dev.mu.Unlock()
		window := c.Stats().SendWindow
		if window != int64(DefaultWindow)<<windowScale {
			t.Fatalf("offload %v: window %d after the handshake", offload, window)
		}
		bufs := make([][]byte, 64)
		for i := range bufs {
			bufs[i] = datagram(uint32(i), 1400)
		}
		sent := int64(0)
		for sent+64*1400 <= window {
			if err := c.Send(bufs, Headroom); err != nil {
				t.Fatal(err)
			}
			sent += 64 * 1400
		}
		before := c.Stats()
		if err := c.Send(bufs, Headroom); err != nil {
			t.Fatalf("offload %v: Send at the window's end: %v", offload, err)
		}
		st := c.Stats()
		fit := (window - sent) / 1400
		if int64(st.SegmentsSent-before.SegmentsSent) != fit || int64(st.DroppedWindow) != 64-fit || st.SendWindow != window-sent-fit*1400 {
			t.Fatalf("offload %v: at the window's end sent %d, dropped %d, %d left; want %d, %d, %d",
				offload, st.SegmentsSent-before.SegmentsSent, st.DroppedWindow, st.SendWindow, fit, 64-fit, window-sent-fit*1400)
		}
		if err := c.Send(bufs[:1], Headroom); err != nil || c.Stats().DroppedWindow != uint64(65-fit) {
			t.Fatalf("offload %v: a datagram past the end: %v, %d dropped", offload, err, c.Stats().DroppedWindow)
		}
		// The peer acknowledges everything: a whole window again.
		r.ack = st.Seq
		feed(s, time.Now(), r.segment(flagACK, nil))
		if got := c.Stats().SendWindow; got != window {
			t.Fatalf("offload %v: window %d after the ACK, want %d", offload, got, window)
		}
		if err := c.Send(bufs, Headroom); err != nil || c.Stats().DroppedWindow != uint64(65-fit) {
			t.Fatalf("offload %v: after the ACK: %v, %d dropped", offload, err, c.Stats().DroppedWindow)
		}
	}
}
