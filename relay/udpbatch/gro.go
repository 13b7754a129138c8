package udpbatch

// segment returns the datagram that starts at off in buf[:n], a message
// the kernel may have coalesced from a run of datagrams seg bytes long
// but the last, which may be shorter; seg <= 0 (the message came without
// a segment size) makes buf[:n] one datagram. It also returns where the
// next datagram starts: next >= n after the last one.
//
// A message yields at least one datagram, which may be empty: call it
// with off 0, and again with off = next while next < n. n is clamped to
// len(buf), and off to [0, n].
func segment(buf []byte, n, seg, off int) (dgram []byte, next int) {
	n = max(0, min(n, len(buf)))
	off = max(0, min(off, n))
	end := n
	if seg > 0 && seg < n-off {
		end = off + seg
	}
	return buf[off:end], end
}
