//go:build !race

package faketcp

const raceEnabled = false
