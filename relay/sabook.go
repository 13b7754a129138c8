package relay

import (
	"fmt"
	"sync"

	"github.com/iketcp/iketcp/framing"
)

// saBook remembers the IKE and ESP SAs a session or flow has carried, for
// Status. Callers note an ESP SPI when it differs from the last one they
// saw, so the lock is taken when SAs change, not per packet.
type saBook struct {
	mu     sync.Mutex // guards the following
	ikeSAs []IKESAInfo
	espIn  []uint32
	espOut []uint32
}

// noteIKE records the IKE SA of header h, newest last.
func (b *saBook) noteIKE(h *framing.IKEHeader) {
	b.mu.Lock()
	defer b.mu.Unlock()
	is := spi64(h.InitiatorSPI)
	for i := range b.ikeSAs {
		if sa := &b.ikeSAs[i]; sa.InitiatorSPI == is {
			if h.ResponderSPI != 0 {
				sa.ResponderSPI = spi64(h.ResponderSPI)
			}
			return
		}
	}
	b.ikeSAs = appendCapped(b.ikeSAs, IKESAInfo{InitiatorSPI: is, ResponderSPI: spi64(h.ResponderSPI)})
}

// noteESPIn records the SPI of ESP that arrived over TCP.
func (b *saBook) noteESPIn(spi uint32) { b.noteESP(&b.espIn, spi) }

// noteESPOut records the SPI of ESP sent onto TCP.
func (b *saBook) noteESPOut(spi uint32) { b.noteESP(&b.espOut, spi) }

func (b *saBook) noteESP(list *[]uint32, spi uint32) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, v := range *list {
		if v == spi {
			return
		}
	}
	*list = appendCapped(*list, spi)
}

// appendCapped appends v, dropping the oldest entry beyond maxSPIs.
func appendCapped[T any](list []T, v T) []T {
	if len(list) == maxSPIs {
		list = append(list[:0], list[1:]...)
	}
	return append(list, v)
}

func (b *saBook) fill(ss *SessionStatus) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ss.IKESAs = append([]IKESAInfo(nil), b.ikeSAs...)
	ss.ESPIn = spiStrings(b.espIn)
	ss.ESPOut = spiStrings(b.espOut)
}

func (st *flowStats) fill(ss *SessionStatus) {
	ss.PacketsIn = st.packetsIn.Load()
	ss.BytesIn = st.bytesIn.Load()
	ss.PacketsOut = st.packetsOut.Load()
	ss.BytesOut = st.bytesOut.Load()
}

func spi64(v uint64) string { return fmt.Sprintf("%016x", v) }

func spiStrings(spis []uint32) []string {
	out := make([]string, len(spis))
	for i, v := range spis {
		out[i] = fmt.Sprintf("%08x", v)
	}
	return out
}
