//go:build race

package sendq

// raceEnabled reports that the race detector instruments this build: its
// sync.Pool drops buffers at random, so allocation counts mean nothing.
const raceEnabled = true
