// Package tun owns iketcp's packet devices: Device, the one batch-shaped
// interface through which IP packets move between the kernel and iketcp,
// and TUN, the Linux TUN device that transparent mode (nat/intercept) and
// fake-TCP mode (nat/fakenet) create, read, write and remove, with the
// removal of a device that a crashed run left. What a mode builds around
// its device (policy routing, nftables, forwarding) is the mode's own.
// In-memory doubles for tests are in nat/tun/tuntest.
//
// A device may hand TCP segmentation and checksums to the kernel
// (Options.Offload, and then it is an OffloadDevice): packets then carry
// the kernel's virtio-net header, and one packet may stand for a run of
// TCP segments, a super-segment, which the kernel cuts where the header
// says (TSO on the way in) or which it merged or never cut (GRO, or a
// peer's TSO, on the way out), as wireguard-go's TUN device does.
// SplitTCP says where a super-segment's segments lie. The kernel may
// refuse the offloads; the device is then the plain one, and says why.
//
// Linux only: elsewhere Create returns the mode's error for a missing
// Linux.
package tun

import (
	"errors"
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

// OffloadDevice is a Device that can hand TCP segmentation and checksums
// to the kernel: a TUN device created with Options.Offload, which the
// kernel took (IFF_VNET_HDR and TUNSETOFFLOAD), and whatever reads and
// writes one. Its packets then move in the kernel's own form, each with
// a virtio-net header in front that says whether it is a TCP
// super-segment (many segments in one packet, all but the last of the
// header's GSOSize bytes of payload) and whether its checksum is
// finished. One system call and one walk through the kernel's network
// stack then carry a whole run of segments, each way.
//
// Read and Write keep the Device contract on such a device: Read cuts
// super-segments into their segments and finishes checksums, Write sends
// plain packets.
type OffloadDevice interface {
	Device
	// Offload reports whether the offloads are on: nil if they are, and
	// otherwise why not, an error that matches errors.ErrUnsupported
	// (an *OffloadError); then ReadOffload and WriteOffload fail with it.
	Offload() error
	// ReadOffload is Read for a caller that takes the kernel's packets as
	// they come: each packet is bufs[k][offset:offset+sizes[k]], with its
	// virtio-net header in bufs[k][offset-VirtioNetHdrLen:offset], so
	// offset must leave that room. A packet may be a TCP super-segment
	// (see SplitTCP), or have its checksum unfinished or already checked
	// (VirtioNeedsCsum, VirtioDataValid).
	ReadOffload(bufs [][]byte, sizes []int, offset int) (n int, err error)
	// WriteOffload writes each of pkts as one packet, stopping at the
	// first error; n is how many were written. Safe for concurrent use.
	WriteOffload(pkts []OffloadPacket) (n int, err error)
}

// OffloadPacket is one packet for WriteOffload, gathered from pieces so
// that a super-segment's payloads can stay where they are: Head, then
// each Bufs[k][Offset:]. For a TCP super-segment (Hdr.GSOType GSOTCPv4 or
// GSOTCPv6) Head is the IP and TCP headers of the first segment, with the
// IP length of the whole and, with VirtioNeedsCsum, the pseudo-header's
// sum (over the whole TCP length) in the checksum field; the kernel cuts
// it into segments of Hdr.GSOSize bytes of payload (the last may be
// shorter), each with the next sequence number, IPv4 ID and its own
// checksum, and only the last keeps PSH and FIN.
type OffloadPacket struct {
	Hdr    VirtioNetHdr
	Head   []byte
	Bufs   [][]byte
	Offset int
}

// OffloadError says why a device moves one segment per packet: the
// kernel refused what Options.Offload asks for (Op names the request),
// or nobody asked (Op ""). errors.Is(err, errors.ErrUnsupported) holds.
type OffloadError struct {
	Op  string // "IFF_VNET_HDR" or "TUNSETOFFLOAD"; "" when not asked for
	Err error  // the kernel's answer
}

// ErrOffloadNotAsked is the Err of an *OffloadError for a device created
// without Options.Offload.
var ErrOffloadNotAsked = errors.New("not asked for")

func (e *OffloadError) Error() string {
	if e.Op == "" {
		return "TUN offloads " + e.Err.Error() + "; each segment takes a system call"
	}
	return fmt.Sprintf("the kernel refused the TUN device's offloads (%s: %v); each segment takes a system call", e.Op, e.Err)
}

func (e *OffloadError) Unwrap() error { return e.Err }

// Is reports errors.ErrUnsupported as a match.
func (e *OffloadError) Is(target error) bool { return target == errors.ErrUnsupported }

// Options are a TUN device's optional features; the zero value is the
// plain device.
type Options struct {
	// Offload asks the kernel to move TCP super-segments and unfinished
	// checksums through the device (IFF_VNET_HDR, and TUNSETOFFLOAD with
	// TUN_F_CSUM, TUN_F_TSO4 and TUN_F_TSO6): the device is then an
	// OffloadDevice whose Offload is nil. Where the kernel refuses, the
	// device is made without them, and Offload says why.
	Offload bool
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
