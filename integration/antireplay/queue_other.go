//go:build !linux

package antireplay

import (
	"context"
	"errors"
)

// ErrNeedsLinux is what OpenQueue and Run return off Linux: NFQUEUE is
// Linux's.
var ErrNeedsLinux = errors.New("NFQUEUE needs Linux: the Tracker works anywhere, the queue only on Linux")

// QueueStats counts what a Queue saw besides the tracker's verdicts.
type QueueStats struct {
	Packets, Overruns, VerdictErrors, BadMessages uint64
}

// Queue is an nfnetlink_queue queue; off Linux it cannot be opened.
type Queue struct{}

// OpenQueue returns ErrNeedsLinux.
func OpenQueue(num uint16) (*Queue, error) { return nil, ErrNeedsLinux }

// Num is 0.
func (q *Queue) Num() uint16 { return 0 }

// Stats is empty.
func (q *Queue) Stats() QueueStats { return QueueStats{} }

// Close does nothing.
func (q *Queue) Close() error { return nil }

// Run returns ErrNeedsLinux.
func Run(ctx context.Context, q *Queue, t *Tracker) error { return ErrNeedsLinux }
