package relay

import (
	"context"
	"io"
	"sync"
	"time"
)

// CloseWhenDone closes c once ctx ends, in a goroutine counted in wg: what
// unblocks a loop reading c when a relay stops.
func CloseWhenDone(ctx context.Context, wg *sync.WaitGroup, c io.Closer) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-ctx.Done()
		c.Close()
	}()
}

// SweepEvery calls sweep until ctx ends, often enough to expire things
// idle for longer than idle within about a quarter of it: every idle/4,
// but at least every ceiling and at most every 50 ms.
func SweepEvery(ctx context.Context, idle, ceiling time.Duration, sweep func(now time.Time)) {
	t := time.NewTicker(min(max(idle/4, 50*time.Millisecond), ceiling))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			sweep(now)
		}
	}
}

// SleepCtx waits for d or ctx, and reports whether d passed.
func SleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// OrDefault returns v, or def if v is the zero value: how config getters
// fill their defaults.
func OrDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}
