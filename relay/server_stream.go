package relay

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/iketcp/iketcp/framing"
)

// streamLink is the RFC 9329 link: a TCP connection that carries
// length-framed datagrams behind the IKETCP prefix.
type streamLink struct {
	nc           net.Conn
	writeTimeout time.Duration

	wmu     sync.Mutex // guards writes to nc and the following
	vec     net.Buffers
	vecBack [][]byte
}

func newStreamLink(nc net.Conn, cfg ServerConfig) *streamLink {
	return &streamLink{nc: nc, writeTimeout: cfg.writeTimeout(), vecBack: make([][]byte, 0, sessionBatch)}
}

// serve reads the stream until it ends: the prefix within the deadline,
// then frames, each burst flushed to the backend.
func (l *streamLink) serve(c *serverConn) (string, slog.Level) {
	s := c.srv
	d := framing.NewDecoder(l.nc, s.cfg.connBuffer(), true)
	d.LimitPayload(s.cfg.maxDatagram())

	l.nc.SetReadDeadline(time.Now().Add(s.cfg.prefixTimeout()))
	if err := d.ReadPrefix(); err != nil {
		var ne net.Error
		var pe *framing.PrefixError
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			s.counters.PrefixTimeouts.Add(1)
			return fmt.Sprintf("no IKETCP prefix within %v", s.cfg.prefixTimeout()), slog.LevelWarn
		case errors.As(err, &pe):
			s.counters.BadPrefix.Add(1)
			return fmt.Sprintf("stream does not begin with IKETCP (got %q): not an RFC 9329 client", pe.Got), slog.LevelWarn
		case err == io.EOF || errors.Is(err, framing.ErrTruncated):
			s.counters.BadPrefix.Add(1)
			return "closed before sending the IKETCP prefix", slog.LevelWarn
		default:
			return "read failed before the prefix: " + err.Error(), slog.LevelWarn
		}
	}
	l.nc.SetReadDeadline(time.Time{})

	for {
		p, err := d.Next()
		if err != nil {
			switch {
			case errors.Is(err, framing.ErrTooLarge):
				s.counters.OversizedFrames.Add(1)
				s.logOversize.log(s.log, slog.LevelWarn, "frame skipped: larger than --max-datagram", "conn", c.id, "remote", c.remote, "err", err)
				continue
			case err == io.EOF:
				return "peer closed the connection", slog.LevelInfo
			case errors.Is(err, framing.ErrTruncated):
				s.counters.TruncatedFrames.Add(1)
				return "stream ended inside a frame (partial frame discarded): " + err.Error(), slog.LevelInfo
			case errors.Is(err, framing.ErrBadLength):
				s.counters.BadLength.Add(1)
				return "invalid frame: " + err.Error(), slog.LevelWarn
			case c.closed.Load() || errors.Is(err, net.ErrClosed):
				return "closed by iketcp", slog.LevelInfo
			default:
				return "read failed: " + err.Error(), slog.LevelInfo
			}
		}
		c.frames++
		if reason := c.handleFrame(p); reason != "" {
			c.flush()
			return reason, slog.LevelWarn
		}
		if !d.Buffered() || len(c.pending) == cap(c.pending) {
			c.flush()
		}
	}
}

// send writes the datagrams as frames, each Length written in place in
// front of it, in one writev.
func (l *streamLink) send(bufs [][]byte) error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.nc.SetWriteDeadline(time.Now().Add(l.writeTimeout))
	l.vecBack = l.vecBack[:0]
	for _, b := range bufs {
		f := b[linkHeadroom-framing.LengthSize:]
		framing.PutLength(f, len(b)-linkHeadroom)
		l.vecBack = append(l.vecBack, f)
	}
	l.vec = l.vecBack
	_, err := l.vec.WriteTo(l.nc)
	return err
}

func (l *streamLink) close() { l.nc.Close() }
