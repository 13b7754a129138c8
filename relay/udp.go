package relay

import (
	"errors"
	"net"
	"syscall"
	"time"

	"github.com/iketcp/iketcp/relay/udpbatch"
)

// ReadUDP reads a batch of datagrams into msgs for a relay's loop,
// surviving what such a loop should: it returns a batch (n > 0), or the
// error of a closed socket. Every other error goes to failed (which logs
// it, rate-limited) and the read is tried again, after a 10 ms pause
// unless it was ECONNREFUSED, a connected socket's report of an ICMP
// unreachable from an earlier send, which does not repeat by itself.
// Datagrams longer than their buffer are counted in c.OversizedDgrams and
// stay in msgs with Truncated set, for the caller to skip.
func ReadUDP(bc *udpbatch.Conn, msgs []udpbatch.Message, c *Counters, failed func(error)) (int, error) {
	for {
		n, err := bc.ReadBatch(msgs)
		if err == nil {
			for i := range msgs[:n] {
				if msgs[i].Truncated {
					c.OversizedDgrams.Add(1)
				}
			}
			return n, nil
		}
		if errors.Is(err, net.ErrClosed) {
			return 0, err
		}
		failed(err)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			time.Sleep(10 * time.Millisecond) // do not spin on a persistent error
		}
	}
}

// WriteUDP sends msgs, skipping any datagram the kernel refuses so that
// one bad datagram does not cost the rest of the batch. It returns how
// many were sent and the last error.
func WriteUDP(bc *udpbatch.Conn, msgs []udpbatch.Message) (sent int, err error) {
	for len(msgs) > 0 {
		n, werr := bc.WriteBatch(msgs)
		sent += n
		if werr == nil {
			return sent, err
		}
		err = werr
		if errors.Is(werr, net.ErrClosed) {
			return sent, err
		}
		msgs = msgs[min(n+1, len(msgs)):]
	}
	return sent, err
}
