package relaytest

import (
	"bytes"
	"encoding/binary"
	"sync"
	"testing"
	"time"
)

// Victim keeps a session busy through the rig's client while a test
// attacks the server. It owns the backend socket meanwhile: it counts its
// own datagrams (ESP with VictimSPI) and passes every other one to the
// test through Next.
type Victim struct {
	r     *Rig
	stop  chan struct{}
	done  sync.WaitGroup
	other chan []byte

	mu       sync.Mutex // guards the following
	sent     int
	received int
}

// VictimSPI is the SPI of the victim's ESP toward the backend.
const VictimSPI = 0xc7

// StartVictim establishes a session through r and keeps it busy: an ESP
// datagram every 2 ms.
func StartVictim(r *Rig) *Victim {
	v := &Victim{r: r, stop: make(chan struct{}), other: make(chan []byte, 16)}
	r.Establish(0xbeef, VictimSPI, 0xd7)
	v.done.Add(2)
	go func() { // sender, paced so that loss would show
		defer v.done.Done()
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for seq := uint32(2); ; seq++ {
			select {
			case <-v.stop:
				return
			case <-t.C:
			}
			r.Site.Write(ESP(VictimSPI, seq, 500))
			v.mu.Lock()
			v.sent++
			v.mu.Unlock()
		}
	}()
	go func() { // backend reader
		defer v.done.Done()
		buf := make([]byte, 70000)
		for {
			r.Backend.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			n, _, err := r.Backend.ReadFromUDPAddrPort(buf)
			if err != nil {
				select {
				case <-v.stop:
					return
				default:
					continue
				}
			}
			if n >= 8 && binary.BigEndian.Uint32(buf) == VictimSPI {
				v.mu.Lock()
				v.received++
				v.mu.Unlock()
				continue
			}
			select {
			case v.other <- bytes.Clone(buf[:n]):
			default: // the test does not want it
			}
		}
	}()
	return v
}

// Next returns the next datagram the backend got that is not the
// victim's.
func (v *Victim) Next(tb testing.TB) []byte {
	tb.Helper()
	select {
	case b := <-v.other:
		return b
	case <-time.After(2 * time.Second):
		tb.Fatal("backend got nothing")
		return nil
	}
}

// Finish stops the victim and fails tb unless every datagram it sent
// arrived.
func (v *Victim) Finish(tb testing.TB) {
	tb.Helper()
	// Let the last datagrams land, then stop.
	time.Sleep(100 * time.Millisecond)
	close(v.stop)
	v.done.Wait()
	v.mu.Lock()
	defer v.mu.Unlock()
	tb.Logf("victim session: sent %d, received %d", v.sent, v.received)
	if v.sent < 50 || v.received != v.sent {
		tb.Errorf("victim session: sent %d, received %d: bad input harmed another session", v.sent, v.received)
	}
}
