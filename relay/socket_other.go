//go:build !linux

package relay

import "time"

// forceBuffers does nothing where the FORCE options do not exist.
func forceBuffers(fd, rcv, snd int) {}

// setUserTimeout does nothing where TCP_USER_TIMEOUT does not exist; the
// keepalives still bound an idle connection.
func setUserTimeout(fd int, d time.Duration) error { return nil }
