//go:build race

package nat

// raceEnabled reports that the race detector instruments this build, which
// makes allocation counts meaningless.
const raceEnabled = true
