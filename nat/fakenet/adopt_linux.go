package fakenet

import (
	"fmt"
	"os"
	"time"

	"github.com/iketcp/iketcp/nat/tun"
)

// A planned restart or upgrade of the server hands fake-TCP mode to the
// process that replaces it, with no moment when a segment has nowhere to
// go: the old process sends a duplicate of its TUN device's descriptor
// (File); the new one adopts the running device, table and forwarding
// record (Adopt), removing and re-adding none of them; the old one then
// lets go without removing anything (Release). The device is not
// persistent, and lives while either process holds a descriptor of it;
// what the kernel routes into it meanwhile waits in its queue. Cleanup
// after a crash of either works as before: the table and the device have
// the same names.

// Adopt takes over the fake-TCP mode of cfg's Name that another process
// runs in the calling thread's network namespace, instead of removing it
// as stale as Setup would: dev is a descriptor of its TUN device, handed
// over; Adopt works on a duplicate, and the caller still closes dev. It
// checks that dev is that device (tun.Adopt) and that the kernel routes
// the endpoint through it, and takes the table and the record of the
// forwarding it changed as they are; a table that is missing is
// installed, as Setup would, and said in the log. Close then removes it
// all, as after Setup. A failure leaves what it found in place (the other
// process's). Without CAP_NET_ADMIN the error wraps
// nat.ErrNeedsNetAdmin.
func Adopt(cfg Config, dev *os.File) (*Net, error) {
	cfg, err := cfg.withDefaults(true)
	if err != nil {
		return nil, err
	}
	if dev == nil {
		return nil, fmt.Errorf("fake-TCP mode: adopt %s: no device descriptor", cfg.Name)
	}
	n := newNet(cfg)
	if err := modeFakeTCP.Run(func() error { return n.adopt(dev) }); err != nil {
		return nil, err
	}
	n.log.Info("fake-TCP mode: took over the running device, table and forwarding", "device", cfg.Name, "table", n.table.Name,
		"endpoint", n.ep4, "offload", n.dev.Offload() == nil)
	return n, nil
}

// adopt is Adopt's work, on one thread.
func (n *Net) adopt(f *os.File) error {
	return n.withHandles(func() error { return n.adoptAll(f) }, n.releaseOrTeardownLocked)
}

// adoptAll checks and takes the device, then the table and its record.
func (n *Net) adoptAll(f *os.File) error {
	dev, err := tun.Adopt(n.nl, modeFakeTCP, n.cfg.Name, f)
	if err != nil {
		return err
	}
	n.dev = dev
	if err := n.waitRoute(n.ep4); err != nil {
		return err
	}
	if err := n.waitRoute(n.ep6); err != nil {
		return err
	}
	tables, err := listTables(n.nft)
	if err != nil {
		return err
	}
	for _, t := range tables {
		if t.Name != n.table.Name {
			continue
		}
		record, err := readRecord(n.nft, t)
		if err != nil {
			return modeFakeTCP.Failed("read the record of the running table "+t.Name, err)
		}
		for _, key := range []string{forward4, forward6} {
			if err := n.sysctls.hold(key); err != nil && !os.IsNotExist(err) {
				return sysctlError("open", sysctlName(key), err)
			}
		}
		for _, v := range record {
			if err := n.sysctls.hold(v.key); err != nil && !os.IsNotExist(err) {
				return sysctlError("open", sysctlName(v.key), err)
			}
		}
		n.record, n.adopted, n.tableUp = record, true, true
		return nil
	}
	n.log.Warn("fake-TCP mode: the running device had no nftables table; installing it", "table", n.table.Name)
	return n.setupTable(n.cfg.Net6.IsValid())
}

// releaseOrTeardownLocked undoes a failed adoption: what it installed
// (a missing table) goes, what it found (the device, a running table)
// stays.
func (n *Net) releaseOrTeardownLocked() error {
	if n.dev != nil {
		n.dev.Release() // then teardown's Close of it does nothing
	}
	if n.adopted {
		n.tableUp = false
	}
	return n.teardownLocked()
}

// File returns a duplicate of the TUN device's descriptor, for the
// process that replaces this one (Adopt); the caller closes it.
func (n *Net) File() (*os.File, error) { return n.dev.Dup() }

// Release lets go of fake-TCP mode without removing anything: another
// process adopted it. The device's descriptor here closes (blocked Reads
// return net.ErrClosed); the device, the table and forwarding stay. Close
// does nothing after it.
func (n *Net) Release() {
	if n.closed.Swap(true) {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	instancesMu.Lock()
	defer instancesMu.Unlock()
	if n.nl == nil {
		return
	}
	if n.dev != nil {
		n.dev.Release()
	}
	n.tableUp, n.record = false, nil
	n.sysctls.close()
	n.nft.CloseLasting()
	n.nl.Close()
	n.nl = nil
	n.log.Info("fake-TCP mode: left the device, table and forwarding to the new process", "device", n.cfg.Name)
}

// SetReadDeadline sets the deadline of Read and ReadOffload: one in the
// past wakes a blocked one (a stack pausing or closing), the zero time
// clears it.
func (n *Net) SetReadDeadline(t time.Time) error { return n.dev.SetReadDeadline(t) }
