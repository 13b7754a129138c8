package client

import (
	"encoding/binary"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
)

// DefaultLivenessTimeout is Config.LivenessTimeout's default.
const DefaultLivenessTimeout = 4 * time.Second

// linkLiveness is one link's in-band liveness check, between iketcps only:
// TCP notices a dead connection only after minutes of retransmissions (or
// never, on a connection with nothing to send), while the daemons' own
// checks (DPD) give up the IKE SA long before that.
//
// When the link has heard nothing from the server for a quarter of the
// timeout, the client sends a Ping (framing/control.go), which an iketcp
// server answers at once with a Pong; any frame heard counts as much as a
// Pong. A link that has heard nothing for the whole timeout is dead: the
// client closes it and reconnects. The check is armed only once the server
// has answered a first Ping, sent as soon as it answered Hello, so a
// server that does not know Ping is never taken for dead; toward such a
// server and toward third-party RFC 9329 servers, TCP_USER_TIMEOUT and
// keepalives bound the wait instead (relay.SetDeadAfter).
//
// A dead link is declared within timeout + timeout/8 of the last frame
// heard: the watcher looks every eighth of the timeout.
type linkLiveness struct {
	timeout time.Duration
	heard   *atomic.Int64 // unix ns of the last burst the link received (linkReader.heard)
	started int64         // unix ns: when the check began
	armed   atomic.Bool   // the server answered a Ping on this link

	// Owned by the watcher.
	seq      uint64
	lastPing int64
}

func newLinkLiveness(timeout time.Duration, heard *atomic.Int64, now time.Time) *linkLiveness {
	return &linkLiveness{timeout: timeout, heard: heard, started: now.UnixNano()}
}

// interval is how long the link may be quiet before a Ping.
func (lv *linkLiveness) interval() time.Duration { return lv.timeout / 4 }

// tick is how often the watcher looks.
func (lv *linkLiveness) tick() time.Duration { return max(lv.timeout/8, time.Millisecond) }

// check says, at now (unix ns), whether to send a Ping, and whether the
// link is dead.
func (lv *linkLiveness) check(now int64) (ping, dead bool) {
	quiet := now - max(lv.heard.Load(), lv.started)
	if !lv.armed.Load() {
		return false, false
	}
	if quiet >= int64(lv.timeout) {
		return false, true
	}
	if quiet >= int64(lv.interval()) && now-lv.lastPing >= int64(lv.interval()) {
		lv.lastPing = now
		return true, false
	}
	return false, false
}

// ping returns the body of the next Ping.
func (lv *linkLiveness) ping() []byte {
	lv.seq++
	return binary.BigEndian.AppendUint64(nil, lv.seq)
}

// watchLiveness checks lr's link until stop closes, sending Pings when it
// is quiet, and says on dead why, once, if it died.
func (lr *linkReader) watchLiveness(stop <-chan struct{}, dead chan<- string) {
	lv := lr.live
	t := time.NewTicker(lv.tick())
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			ping, isDead := lv.check(now.UnixNano())
			if isDead {
				dead <- "liveness: nothing heard from the server in " + lv.timeout.String()
				return
			}
			if ping {
				lr.send(framing.ControlPing, lv.ping())
			}
		}
	}
}
