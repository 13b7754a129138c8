package tuntest

import (
	"bytes"
	"errors"
	"net"
	"sync"
	"testing"

	"github.com/iketcp/iketcp/nat/tun"
)

// Pump reads dev's packets in a goroutine of its own, in batches of
// dev.BatchSize() buffers of bufSize bytes, and sends a copy of each on
// the channel it returns, which it closes when dev closes. A Read error
// other than net.ErrClosed fails tb. tb's clean-up closes dev and waits
// for the goroutine.
func Pump(tb testing.TB, dev tun.Device, bufSize int) <-chan []byte {
	tb.Helper()
	out := make(chan []byte, 1024)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(out)
		bufs := make([][]byte, dev.BatchSize())
		for k := range bufs {
			bufs[k] = make([]byte, bufSize)
		}
		sizes := make([]int, len(bufs))
		for {
			n, err := dev.Read(bufs, sizes, 0)
			for k := range n {
				out <- bytes.Clone(bufs[k][:sizes[k]])
			}
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					tb.Errorf("Read: %v", err)
				}
				return
			}
		}
	}()
	tb.Cleanup(func() {
		dev.Close()
		wg.Wait()
	})
	return out
}
