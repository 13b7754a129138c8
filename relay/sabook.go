package relay

import (
	"fmt"
	"sync"

	"github.com/iketcp/iketcp/framing"
)

// maxSAs bounds the SAs of each kind a SABook remembers.
const maxSAs = 16

// SABook remembers the IKE and ESP SAs a session or flow has carried, for
// Status. Callers note an ESP SPI when it differs from the last one they
// saw, so the lock is taken when SAs change, not per packet.
type SABook struct {
	mu     sync.Mutex // guards the following
	ikeSAs []IKESAInfo
	espIn  []uint32
	espOut []uint32
}

// NoteIKE records the IKE SA of header h, newest last.
func (b *SABook) NoteIKE(h *framing.IKEHeader) {
	b.mu.Lock()
	defer b.mu.Unlock()
	is := SPI64(h.InitiatorSPI)
	for i := range b.ikeSAs {
		if sa := &b.ikeSAs[i]; sa.InitiatorSPI == is {
			if h.ResponderSPI != 0 {
				sa.ResponderSPI = SPI64(h.ResponderSPI)
			}
			return
		}
	}
	b.ikeSAs = appendCapped(b.ikeSAs, IKESAInfo{InitiatorSPI: is, ResponderSPI: SPI64(h.ResponderSPI)})
}

// NoteESPIn records the SPI of ESP from the far end.
func (b *SABook) NoteESPIn(spi uint32) { b.noteESP(&b.espIn, spi) }

// NoteESPOut records the SPI of ESP sent to the far end.
func (b *SABook) NoteESPOut(spi uint32) { b.noteESP(&b.espOut, spi) }

func (b *SABook) noteESP(list *[]uint32, spi uint32) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, v := range *list {
		if v == spi {
			return
		}
	}
	*list = appendCapped(*list, spi)
}

// appendCapped appends v, dropping the oldest entry beyond maxSAs.
func appendCapped[T any](list []T, v T) []T {
	if len(list) == maxSAs {
		list = append(list[:0], list[1:]...)
	}
	return append(list, v)
}

// Fill copies the book into ss.
func (b *SABook) Fill(ss *SessionStatus) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ss.IKESAs = append([]IKESAInfo(nil), b.ikeSAs...)
	ss.ESPIn = spiStrings(b.espIn)
	ss.ESPOut = spiStrings(b.espOut)
}

// FillLink copies the book's IKE SAs and outbound ESP into ls.
func (b *SABook) FillLink(ls *LinkStatus) {
	b.mu.Lock()
	defer b.mu.Unlock()
	ls.IKESAs = append([]IKESAInfo(nil), b.ikeSAs...)
	ls.ESPOut = spiStrings(b.espOut)
}

// SPI32 and SPI64 print an ESP or IKE SPI as Status and logs show it.
func SPI32(v uint32) string { return fmt.Sprintf("%08x", v) }
func SPI64(v uint64) string { return fmt.Sprintf("%016x", v) }

func spiStrings(spis []uint32) []string {
	out := make([]string, len(spis))
	for i, v := range spis {
		out[i] = SPI32(v)
	}
	return out
}
