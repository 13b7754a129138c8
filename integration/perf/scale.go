package perf

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/relay/relaytest"
)

// The scale ladder's server and backend, on the hub's loopback.
const (
	scaleServerPort  = 4520
	scaleBackendPort = 4620
	// scaleWorkers open sessions at once.
	scaleWorkers = 64
)

// Scale is one rung of the scale ladder: one iketcp server with Sessions
// concurrent sessions, each on a connection of its own.
type Scale struct {
	Sessions int
	// Conns is how many TCP connections carry them: one per session,
	// unless the open-file limit cannot hold that many (the server needs a
	// descriptor per connection and one per session's backend socket);
	// then some connections carry two sessions.
	Conns int
	// FileLimit is the open-file limit the server ran with.
	FileLimit uint64
	// Open is how long opening them all took (connect, prefix,
	// IKE_SA_INIT answered by the backend and read back).
	Open time.Duration
	// RSSBefore is the server's resident set, idle, before any session;
	// RSSOpen once every session is open; RSSTraffic after traffic went
	// through all of them.
	RSSBefore, RSSOpen, RSSTraffic int64
	// Rate is the offered ESP rate spread over the sessions, Delivered
	// what reached the backend in the steady part, datagrams/s.
	Rate, Delivered float64
	// Sent and Received count ESP datagrams (Received after draining).
	Sent, Received uint64
	// CPU is the server's CPU time per datagram delivered.
	CPU time.Duration
}

// PerSession is the resident set each session added, bytes.
func (s Scale) PerSession() float64 {
	return float64(s.RSSOpen-s.RSSBefore) / float64(s.Sessions)
}

// PerSessionTraffic is the same once traffic has crossed every session.
func (s Scale) PerSessionTraffic() float64 {
	return float64(s.RSSTraffic-s.RSSBefore) / float64(s.Sessions)
}

// fileReserve is what the server needs besides its connections and
// backend sockets (listener, control socket, epoll, standard streams, the
// log), with room to spare.
const fileReserve = 64

// fileLimit raises this process's open-file limit (which the processes it
// starts inherit) toward want, as far as it may, and returns the limit in
// force. Raising the hard limit needs CAP_SYS_RESOURCE.
func fileLimit(want uint64) uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0
	}
	if lim.Cur >= want {
		return lim.Cur
	}
	// syscall.Setrlimit, not x/sys/unix's: then the processes this one
	// starts get the new limit too.
	raised := syscall.Rlimit{Cur: want, Max: max(want, lim.Max)}
	if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised) == nil {
		return want
	}
	raised = syscall.Rlimit{Cur: lim.Max, Max: lim.Max}
	if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised) == nil {
		return lim.Max
	}
	return lim.Cur
}

// runScale starts an iketcp server in ns with limits raised for n
// sessions, opens them, spreads rate datagrams/s of ESP over them for d,
// and measures.
func runScale(ctx context.Context, ns *lab.Namespace, dir, bin string, backend *Sink, n int, rate float64, d time.Duration) (res Scale, err error) {
	res.Sessions, res.Rate = n, rate
	res.FileLimit = fileLimit(uint64(2*n + fileReserve))
	res.Conns = min(n, int(res.FileLimit)-n-fileReserve)
	if res.Conns < (n+1)/2 {
		return res, fmt.Errorf("%d sessions need at least %d open files in the server, and the limit is %d (raise ulimit -n)",
			n, n+(n+1)/2+fileReserve, res.FileLimit)
	}
	limit := strconv.Itoa(n + 64)
	srvAddr := netip.AddrPortFrom(loopback, scaleServerPort)
	control := filepath.Join(dir, "bench-scale-"+strconv.Itoa(n)+".sock")
	srv, err := startIketcp(ctx, ns, bin, control, []string{"server",
		"--listen", srvAddr.String(),
		"--backend", netip.AddrPortFrom(loopback, scaleBackendPort).String(),
		"--max-conns", limit, "--max-sessions", limit, "--max-sessions-per-source", limit,
		"--max-half-open", limit, "--max-half-open-per-source", limit, "--max-unconfirmed-per-source", limit,
	})
	if srv != nil {
		defer srv.Stop()
	}
	if err != nil {
		return res, err
	}
	time.Sleep(300 * time.Millisecond) // let the start-up's garbage settle
	if res.RSSBefore, err = RSS(srv.PID()); err != nil {
		return res, err
	}

	start := time.Now()
	conns, err := openSessions(ctx, ns, srvAddr, n, res.Conns)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err != nil {
		return res, fmt.Errorf("%d sessions: %w", n, err)
	}
	res.Open = time.Since(start)
	time.Sleep(500 * time.Millisecond)
	if res.RSSOpen, err = RSS(srv.PID()); err != nil {
		return res, err
	}

	c0 := backend.Datagrams()
	type result struct {
		sent int
		err  error
	}
	done := make(chan result, 1)
	go func() {
		sent, err := spreadESP(ctx, conns, n, rate, d)
		done <- result{sent, err}
	}()
	warm := d / 5
	time.Sleep(warm)
	t0, w0 := time.Now(), backend.Datagrams()
	cpu0, err := CPUTime(srv.PID())
	if err != nil {
		return res, err
	}
	r := <-done
	t1, w1 := time.Now(), backend.Datagrams()
	cpu1, err := CPUTime(srv.PID())
	if err != nil {
		return res, err
	}
	if r.err != nil {
		return res, r.err
	}
	res.Sent = uint64(r.sent)
	res.Delivered = float64(w1-w0) / t1.Sub(t0).Seconds()
	if w1 > w0 {
		res.CPU = (cpu1 - cpu0) / time.Duration(w1-w0)
	}
	res.Received = drain(ctx, backend) - c0
	if res.RSSTraffic, err = RSS(srv.PID()); err != nil {
		return res, err
	}
	if srv.Exited() {
		return res, fmt.Errorf("iketcp server exited: %v\n%s", srv.ExitErr(), tailString(srv.Log(), 1500))
	}
	return res, nil
}

// openSessions connects nconns times to the server from ns, sends the
// prefix on each, then opens n sessions, session i on connection i %
// nconns: an IKE_SA_INIT request that the backend answers, the answer
// read back.
func openSessions(ctx context.Context, ns *lab.Namespace, srv netip.AddrPort, n, nconns int) ([]net.Conn, error) {
	conns := make([]net.Conn, 0, nconns)
	deadline := time.Now().Add(2 * time.Minute)
	// Sockets are made on a thread inside the namespace; they are used
	// from anywhere afterwards.
	err := ns.Do(func() error {
		d := net.Dialer{Deadline: deadline}
		for range nconns {
			c, err := d.DialContext(ctx, "tcp", srv.String())
			if err != nil {
				return err
			}
			conns = append(conns, c)
			// The prefix at once: the server closes connections that
			// stay silent for 5 s.
			if _, err := c.Write([]byte(framing.Prefix)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return conns, err
	}
	var wg sync.WaitGroup
	errs := make([]error, scaleWorkers)
	for w := range scaleWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 0, 256)
			for k := w; k < nconns; k += scaleWorkers {
				c := conns[k]
				c.SetDeadline(deadline)
				for i := k; i < n; i += nconns {
					if ctx.Err() != nil {
						errs[w] = ctx.Err()
						return
					}
					if _, err := c.Write(framing.AppendFrame(buf[:0], relaytest.Init(sessionISPI(i)))); err != nil {
						errs[w] = fmt.Errorf("session %d: %w", i, err)
						return
					}
					if err := readInitResponse(c, sessionISPI(i)); err != nil {
						errs[w] = fmt.Errorf("session %d: %w", i, err)
						return
					}
				}
				c.SetDeadline(time.Time{})
			}
		}()
	}
	wg.Wait()
	return conns, errors.Join(errs...)
}

func sessionISPI(i int) uint64 { return 0x5ca1e00000000000 | uint64(i+1) }
func sessionSPI(i int) uint32  { return 0x10000000 | uint32(i+1) }

// readInitResponse reads frames from c until the IKE_SA_INIT response for
// ispi (at most 8 frames: anything else the server sends first).
func readInitResponse(c net.Conn, ispi uint64) error {
	var hdr [framing.LengthSize]byte
	var h framing.IKEHeader
	for range 8 {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return err
		}
		// RFC 9329's length counts its own two bytes.
		n := int(binary.BigEndian.Uint16(hdr[:])) - framing.LengthSize
		if n <= 0 {
			return fmt.Errorf("frame length %d", n+framing.LengthSize)
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(c, p); err != nil {
			return err
		}
		if len(p) > framing.MarkerSize && binary.BigEndian.Uint32(p) == 0 &&
			h.Decode(p[framing.MarkerSize:]) == nil && h.IsInitResponse() && h.InitiatorSPI == ispi {
			return nil
		}
	}
	return errors.New("no IKE_SA_INIT response in the first 8 frames")
}

// spreadESP sends 1400-byte ESP frames round-robin over n sessions (on
// their connections, session i on i % len(conns)), each session with its
// own SPI, at rate datagrams/s for d.
func spreadESP(ctx context.Context, conns []net.Conn, n int, rate float64, d time.Duration) (int, error) {
	frames := make([][]byte, n)
	for i := range n {
		frames[i] = framing.AppendFrame(nil, relaytest.ESP(sessionSPI(i), 1, DatagramSize))
	}
	start := time.Now()
	end := start.Add(d)
	sent, next := 0, 0
	for {
		now := time.Now()
		if !now.Before(end) || ctx.Err() != nil {
			return sent, nil
		}
		due := int(rate*now.Sub(start).Seconds()) - sent
		if due <= 0 {
			time.Sleep(time.Duration(float64(time.Second) / rate))
			continue
		}
		for range min(due, 256) {
			f := frames[next]
			binary.BigEndian.PutUint32(f[framing.LengthSize+4:], uint32(sent+1))
			if _, err := conns[next%len(conns)].Write(f); err != nil {
				return sent, fmt.Errorf("session %d: %w", next, err)
			}
			sent++
			if next++; next == n {
				next = 0
			}
		}
	}
}
