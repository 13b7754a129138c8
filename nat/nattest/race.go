//go:build race

package nattest

// RaceEnabled reports that the race detector instruments this build, which
// makes allocation counts meaningless.
const RaceEnabled = true
