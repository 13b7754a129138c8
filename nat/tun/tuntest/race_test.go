//go:build race

package tuntest

// raceEnabled reports that the race detector instruments this build, which
// makes allocation counts meaningless.
const raceEnabled = true
