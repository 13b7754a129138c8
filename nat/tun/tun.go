// Package tun owns iketcp's packet devices: Device, the one batch-shaped
// interface through which IP packets move between the kernel and iketcp,
// and TUN, the Linux TUN device that transparent mode (nat/intercept) and
// fake-TCP mode (nat/fakenet) create, read, write and remove, with the
// removal of a device that a crashed run left. What a mode builds around
// its device (policy routing, nftables, forwarding) is the mode's own.
// In-memory doubles for tests are in nat/tun/tuntest.
//
// Linux only: elsewhere Create returns the mode's error for a missing
// Linux.
package tun

import (
	"fmt"
	"strings"
)

// Device moves whole IP packets (IPv4 or IPv6, no link-layer header), as a
// TUN device opened with IFF_NO_PI does. Its shape is wireguard-go's
// tun.Device: packets move in batches, each at an offset into its buffer
// that leaves the caller room for headers in front of it.
//
// *TUN is one, and so are transparent mode's *intercept.Interceptor and
// fake-TCP mode's *fakenet.Net, which read and write theirs.
type Device interface {
	// BatchSize is the number of buffers a Read should be given: the most
	// packets one Read returns.
	BatchSize() int
	// Read reads up to len(bufs) packets, each into bufs[k][offset:], and
	// their sizes into sizes[k] (len(sizes) >= len(bufs)). It blocks until
	// at least one packet is there, then takes as many as are queued
	// without blocking again. The n packets are valid even when err is
	// not nil. Once the device is closed, Read returns an error that
	// matches net.ErrClosed (errors.Is), and Close wakes a blocked Read
	// with it.
	Read(bufs [][]byte, sizes []int, offset int) (n int, err error)
	// Write writes each bufs[k][offset:] as one packet, stopping at the
	// first error; n is how many were written. It is safe for concurrent
	// use. Once the device is closed, it returns an error that matches
	// net.ErrClosed.
	Write(bufs [][]byte, offset int) (n int, err error)
	// Close releases the device and wakes blocked Reads. It is
	// idempotent.
	Close() error
}

// MTU is the MTU that Create gives a TUN device: the largest IP packet,
// so that the kernel never fragments what it routes into the device, and
// every packet arrives whole. A Read buffer with less room than that gets
// longer packets cut (see TUN.Read).
const MTU = 65535

// CheckName accepts what the kernel takes as an interface name verbatim:
// 1 to 15 bytes, no '/', ':', '%' (a pattern) or white space.
func CheckName(name string) error {
	if len(name) > 15 || name == "." || name == ".." || strings.ContainsAny(name, "/:% \t\n") {
		return fmt.Errorf("TUN device name %q: use 1 to 15 characters without '/', ':', '%%' or spaces", name)
	}
	return nil
}
