package lab

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"time"
)

var pingReceived = regexp.MustCompile(`(\d+) packets transmitted, (\d+) (?:packets )?received`)

// Ping sends count echo requests from the namespace, with source address src
// (ping -I), to dst, interval apart (0 means 0.2 s), each waiting at most
// 1 s for its reply, and returns how many replies came back. Losing replies
// is not an error; failing to run ping or to read its summary is.
func (l *Lab) Ping(ctx context.Context, from *Namespace, src, dst string, count int, interval time.Duration) (int, error) {
	if count <= 0 {
		return 0, errors.New("ping count must be positive")
	}
	if interval <= 0 {
		interval = 200 * time.Millisecond
	}
	args := []string{"-n", "-c", strconv.Itoa(count), "-i", formatSeconds(interval), "-W", "1"}
	if src != "" {
		args = append(args, "-I", src)
	}
	args = append(args, dst)
	// ping exits 1 when replies are missing; the summary tells how many.
	out, err := from.Command(ctx, l.pingPath, args...).CombinedOutput()
	received, perr := parsePingReceived(out)
	if perr != nil {
		if err == nil {
			err = perr
		}
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return 0, fmt.Errorf("ping %s -> %s in %s: %w: %s", src, dst, from.Role, err, out)
	}
	return received, nil
}

func parsePingReceived(out []byte) (int, error) {
	m := pingReceived.FindSubmatch(out)
	if m == nil {
		return 0, errors.New("no summary line in ping output")
	}
	return strconv.Atoi(string(m[2]))
}
