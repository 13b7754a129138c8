package tuntest

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// CheckCloseWakesRead checks the part of the tun.Device contract that
// Close keeps: closeDev (dev.Close, or a call of it from elsewhere, such
// as another network namespace) wakes a Read blocked on dev, with an
// error that matches net.ErrClosed. closeDev must succeed.
func CheckCloseWakesRead(tb testing.TB, dev tun.Device, bufSize int, closeDev func() error) {
	tb.Helper()
	readErr := make(chan error, 1)
	go func() {
		buf := make([]byte, bufSize)
		_, err := dev.Read([][]byte{buf}, []int{0}, 0)
		readErr <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := closeDev(); err != nil {
		tb.Fatalf("Close: %v", err)
	}
	select {
	case err := <-readErr:
		if !errors.Is(err, net.ErrClosed) {
			tb.Errorf("Read after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		tb.Fatal("Close did not wake a blocked Read")
	}
}

// CheckClosed checks what a closed dev does: Close again returns nil, and
// Write (of pkt) and Read (into a buffer of bufSize bytes) fail with
// errors that match net.ErrClosed.
func CheckClosed(tb testing.TB, dev tun.Device, bufSize int, pkt []byte) {
	tb.Helper()
	if err := dev.Close(); err != nil {
		tb.Errorf("second Close: %v", err)
	}
	if _, err := dev.Write([][]byte{pkt}, 0); !errors.Is(err, net.ErrClosed) {
		tb.Errorf("Write after Close: %v, want net.ErrClosed", err)
	}
	if _, err := dev.Read([][]byte{make([]byte, bufSize)}, []int{0}, 0); !errors.Is(err, net.ErrClosed) {
		tb.Errorf("Read after Close: %v, want net.ErrClosed", err)
	}
}
