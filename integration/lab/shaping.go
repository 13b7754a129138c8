package lab

import (
	"context"
	"fmt"
	"strconv"
	"time"
)

// LimitRate makes the carrier a bottleneck from the site toward the hub:
// a token bucket on its hub side, passing rate bits per second, whose
// queue holds at most latency's worth of traffic (beyond that, packets are
// dropped, as at a saturated link). Everything the site sends to the hub
// crosses it. The lab's teardown removes it with the namespace.
func (l *Lab) LimitRate(ctx context.Context, rateBits int, latency time.Duration) error {
	if l.Carrier == nil {
		return errNoCarrier
	}
	if rateBits <= 0 || latency <= 0 {
		return fmt.Errorf("LimitRate: rate %d and latency %v must be positive", rateBits, latency)
	}
	// A burst of at least one MTU-sized packet, and about a millisecond of
	// traffic, keeps the bucket from starving on timer granularity.
	burst := max(rateBits/8/1000, 3000)
	out, err := l.Carrier.Run(ctx, "tc", "qdisc", "replace", "dev", CarrierHubIface, "root", "tbf",
		"rate", strconv.Itoa(rateBits)+"bit", "burst", strconv.Itoa(burst),
		"latency", strconv.FormatInt(latency.Milliseconds(), 10)+"ms")
	if err != nil {
		return fmt.Errorf("limiting the carrier's rate: %w: %s", err, out)
	}
	return nil
}
