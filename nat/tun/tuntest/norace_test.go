//go:build !race

package tuntest

const raceEnabled = false
