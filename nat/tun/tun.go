// Package tun owns iketcp's packet devices: Device, the one batch-shaped
// interface through which IP packets move between the kernel and iketcp
// (transparent mode's interception, fake-TCP mode's endpoint, in-memory
// doubles in tests). In-memory doubles for tests are in nat/tun/tuntest.
package tun

// Device moves whole IP packets (IPv4 or IPv6, no link-layer header), as a
// TUN device opened with IFF_NO_PI does. Its shape is wireguard-go's
// tun.Device: packets move in batches, each at an offset into its buffer
// that leaves the caller room for headers in front of it.
//
// Transparent mode's *nat.Interceptor and fake-TCP mode's *nat.FakeTCPNet
// are ones.
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
