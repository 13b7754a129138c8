package relaytest

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
)

// Victim keeps a session busy through the rig's client while a test
// attacks the server. It owns the backend socket meanwhile: it counts its
// own datagrams (ESP with VictimSPI) and passes every other one to the
// test through Next.
type Victim struct {
	// From is the victim session's backend socket, as the backend sees it.
	From netip.AddrPort

	r     *Rig
	stop  chan struct{}
	done  sync.WaitGroup
	other chan []byte

	mu       sync.Mutex // guards the following
	sent     int
	received int
}

// VictimSPI is the SPI of the victim's ESP toward the backend, and
// VictimSize the size of each of its datagrams: the victim counts only
// those, so an attacker that copies its SPI (with any other size) does
// not count as the victim.
const (
	VictimSPI     = 0xc7
	VictimSPIBack = 0xd7
	VictimSize    = 500
)

// StartVictim establishes a session through r and keeps it busy: an ESP
// datagram every 2 ms.
func StartVictim(r *Rig) *Victim {
	v := &Victim{r: r, stop: make(chan struct{}), other: make(chan []byte, 16)}
	v.From = r.Establish(0xbeef, VictimSPI, VictimSPIBack)
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
			r.Site.Write(ESP(VictimSPI, seq, VictimSize))
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
			if n == VictimSize && binary.BigEndian.Uint32(buf) == VictimSPI {
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
	// Let the victim send enough for a loss to show (bounded), and its
	// last datagrams land; then stop.
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		v.mu.Lock()
		enough := v.sent >= 50
		v.mu.Unlock()
		if enough {
			break
		}
	}
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

// CheckReturnPath sends n ESP datagrams from the backend to the victim's
// session and fails tb unless the site gets every one, in order.
func (v *Victim) CheckReturnPath(tb testing.TB, n int) {
	tb.Helper()
	for i := range n {
		v.r.Backend.WriteToUDPAddrPort(ESP(VictimSPIBack, uint32(1000+i), 300), v.From)
		got, _ := Recv(tb, v.r.Site)
		if len(got) != 300 || binary.BigEndian.Uint32(got[4:]) != uint32(1000+i) {
			tb.Fatalf("return path: datagram %d arrived as %d bytes, seq %d", i, len(got), binary.BigEndian.Uint32(got[4:]))
		}
	}
}

// OpenSession opens a confirmed session for ispi on c, a raw client
// connection, while the victim owns the backend socket: the IKE_SA_INIT
// goes through the victim's reader, the backend answers, and the answer
// is read back on c through d. It returns the session's backend socket.
func (v *Victim) OpenSession(tb testing.TB, c net.Conn, d *framing.Decoder, ispi uint64) netip.AddrPort {
	tb.Helper()
	Frame(tb, c, Init(ispi))
	if got := v.Next(tb); !bytes.Equal(got, Init(ispi)) {
		tb.Fatalf("backend got %d bytes, want the IKE_SA_INIT", len(got))
	}
	from := v.r.SessionLocal(tb, ispi)
	v.r.Backend.WriteToUDPAddrPort(InitResponse(ispi), from)
	if got := ReadFrame(tb, c, d); !bytes.Equal(got, InitResponse(ispi)) {
		tb.Fatalf("client got %d bytes, want the IKE_SA_INIT response", len(got))
	}
	return from
}
