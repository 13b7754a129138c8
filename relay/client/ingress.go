package client

import (
	"context"
	"time"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/udpbatch"
)

// daemonSide is where the client meets the IKE daemon: a UDP socket the
// daemon talks to (explicit mode), or a TUN device that intercepts its
// traffic (transparent mode).
type daemonSide interface {
	// batchSize is the most datagrams one read returns.
	batchSize() int
	// read waits for a batch of the daemon's packets and turns each into
	// an arrival in port-4500 form, in place in in[k].d's buffer. It
	// counts, and marks to skip, what must not go further. It retries
	// what a loop should survive and returns only a batch (n > 0), or
	// the error that ends the side.
	read(in []arrival) (n int, err error)
	// deliver hands a burst from the far end to the daemon: the return
	// path. scratch is the caller's, reused from call to call.
	deliver(f *flow, burst []relay.Datagram, scratch *[]udpbatch.Message) error
	// Close unblocks read.
	Close() error
}

// arrival is one datagram of the daemon's, as the daemon side read it.
type arrival struct {
	d    *datagram
	key  flowKey
	skip bool // counted and dropped by read
	// Transparent mode: the intercepted packet's ports and whether it was
	// raw ESP, for the replies (daemonPorts).
	intercepted      bool
	rawESP           bool
	srcPort, dstPort uint16
}

// readDaemon reads batches of the daemon's datagrams and hands each to
// its flow, until the daemon side ends.
func (cl *Client) readDaemon(ctx context.Context) error {
	in := make([]arrival, min(max(cl.side.batchSize(), 1), clientBatch))
	for i := range in {
		in[i].d = cl.getDatagram()
	}
	defer func() {
		for _, a := range in {
			cl.putDatagram(a.d)
		}
	}()
	for {
		n, err := cl.side.read(in)
		if err != nil {
			return err
		}
		now := time.Now().UnixNano()
		cl.mu.Lock()
		for i := range in[:n] {
			a := &in[i]
			if a.skip {
				continue
			}
			cl.takeLocked(ctx, a, now)
		}
		cl.flushLocked()
		cl.mu.Unlock()
	}
}
