//go:build !linux

package relay

// forceBuffers does nothing where the FORCE options do not exist.
func forceBuffers(fd, rcv, snd int) {}
