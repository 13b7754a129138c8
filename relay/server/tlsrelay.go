package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/iketcp/iketcp/relay"
)

// After a hand-over, the TLS connections stay with the old server, which
// becomes a thin TLS terminator for them, as HAProxy's hot restarts do
// for what cannot move: Go's crypto/tls cannot export a live session,
// and without kTLS the kernel holds none. Each connection's stream goes,
// from the frame boundary Detach stopped at (what it had read and not
// delivered first), through a unix socketpair whose other end the new
// server adopts as the connection's socket; the new server serves the
// stream as any other, with the client's addresses, identity and TLS
// from the hand-over. The old process's relays end when either side
// closes, or at the bound its caller sets (KeptTLS); the process exits
// after the last. A later upgrade of the new server hands the socketpair
// end over as it would a TCP socket: the relay here does not notice.

// relayBuffer is each direction's copy buffer: a TLS record's payload.
const relayBuffer = 16 << 10

// tlsRelay is one TLS connection a hand-over kept, and this process's end
// of the socketpair whose other end (peer, until the hand-over sends it)
// the successor serves.
type tlsRelay struct {
	tc      net.Conn      // the TLS connection
	uc      *net.UnixConn // this process's end
	peer    *os.File      // the successor's end, close-on-exec, until Handover takes it
	pending []byte        // what the link had read and not delivered: it goes first
	remote  string
	once    sync.Once
}

// newTLSRelay makes tc's socketpair.
func newTLSRelay(tc net.Conn, pending []byte, remote string) (*tlsRelay, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, os.NewSyscallError("socketpair", err)
	}
	own := os.NewFile(uintptr(fds[0]), "iketcp-tls-relay")
	nc, err := net.FileConn(own) // a duplicate
	own.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, err
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		unix.Close(fds[1])
		return nil, fmt.Errorf("a socketpair's end is a %T", nc)
	}
	return &tlsRelay{tc: tc, uc: uc, peer: os.NewFile(uintptr(fds[1]), "iketcp-tls-stream"), pending: pending, remote: remote}, nil
}

// close ends the relay: both connections close (the TLS one with its
// close_notify, unless a write is under way), and so does the peer end
// if it is still here.
func (r *tlsRelay) close() {
	r.once.Do(func() {
		r.uc.Close()
		r.tc.Close()
		if r.peer != nil {
			r.peer.Close()
		}
	})
}

// run relays both ways until either side closes or fails, or close.
func (r *tlsRelay) run() {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		defer r.close()
		if len(r.pending) > 0 {
			if _, err := r.uc.Write(r.pending); err != nil {
				return
			}
			r.pending = nil
		}
		copyStream(r.uc, r.tc)
	}()
	go func() {
		defer wg.Done()
		defer r.close()
		copyStream(r.tc, r.uc)
	}()
	wg.Wait()
}

// copyStream copies from src to dst until src ends or either fails: a
// bounded loop, since each turn reads more of a stream that ends when
// either connection is closed. A write that takes more than
// relay.DefaultWriteTimeout fails (a link's own bound on a peer that
// does not read): the relay ends.
func copyStream(dst net.Conn, src io.Reader) {
	buf := make([]byte, relayBuffer)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			dst.SetWriteDeadline(time.Now().Add(relay.DefaultWriteTimeout))
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// keptTLS are the relays of a hand-over, running.
type keptTLS struct {
	log     *slog.Logger
	relays  []*tlsRelay
	running sync.WaitGroup
	mu      sync.Mutex
	left    int
}

func startKeptTLS(relays []*tlsRelay, log *slog.Logger) *keptTLS {
	k := &keptTLS{log: log, relays: relays, left: len(relays)}
	k.running.Add(len(relays))
	for _, r := range relays {
		go func() {
			defer k.running.Done()
			r.run()
			k.mu.Lock()
			k.left--
			k.mu.Unlock()
		}()
	}
	log.Info(fmt.Sprintf("keeping %d TLS connections, relayed to the new server until they end", len(relays)))
	return k
}

// Relaying is how many TLS connections the hand-over kept that still
// relay to the successor.
func (s *Server) Relaying() int {
	s.mu.Lock()
	k := s.kept
	s.mu.Unlock()
	if k == nil {
		return 0
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.left
}

// ErrRelaysCut is KeptTLS's error when bound passed or ctx ended before
// the last TLS connection it relayed ended.
var ErrRelaysCut = errors.New("TLS connections still relayed were closed")

// KeptTLS waits, after a hand-over, until every TLS connection it kept
// has ended, at most bound or until ctx ends; then it closes those left,
// whose clients reconnect and claim their sessions from the successor,
// and returns how many that was (and ErrRelaysCut if any). Without a
// hand-over, or one that kept no TLS connection, it returns at once.
func (s *Server) KeptTLS(ctx context.Context, bound time.Duration) (int, error) {
	s.mu.Lock()
	k := s.kept
	s.mu.Unlock()
	if k == nil {
		return 0, nil
	}
	done := make(chan struct{})
	go func() {
		k.running.Wait()
		close(done)
	}()
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-done:
		k.log.Info("the last TLS connection kept at the hand-over has ended")
		return 0, nil
	case <-t.C:
	case <-ctx.Done():
	}
	left := s.Relaying()
	k.log.Warn(fmt.Sprintf("closing %d TLS connections still relayed to the new server: their clients reconnect to it", left),
		"after", bound.String(), "stopped", ctx.Err() != nil)
	for _, r := range k.relays {
		r.close()
	}
	<-done
	if left == 0 {
		return 0, nil
	}
	return left, ErrRelaysCut
}
