package frontdoor

import (
	"testing"
	"time"
)

// SetShareLinger sets, for the listeners started during the test, how long
// a client may go on sending after the share backend finished.
func SetShareLinger(t testing.TB, d time.Duration) {
	old := shareLinger
	shareLinger = d
	t.Cleanup(func() { shareLinger = old })
}
