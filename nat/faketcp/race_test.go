//go:build race

package faketcp

// raceEnabled reports that the race detector instruments this build, which
// makes allocation counts meaningless.
const raceEnabled = true
