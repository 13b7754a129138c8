package frontdoor

import (
	"context"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/iketcp/iketcp/relay"
)

// share splices nc to the share backend: the bytes the front door read
// first (v.replay, in buf, which share gives back), then everything else,
// both ways, until both directions have ended.
func (l *Listener) share(nc net.Conn, remote net.Addr, v verdict, buf *[]byte) {
	l.mu.Lock()
	closed, full := l.closed, l.sharing >= l.cfg.maxShared()
	if !closed && !full {
		l.sharing++
	}
	l.mu.Unlock()
	switch {
	case closed:
		putBuffer(buf)
		nc.Close()
		l.disown(nc)
		return
	case full:
		putBuffer(buf)
		l.counters.ConnsRejected.Add(1)
		l.logs.refused.Log(l.log, slog.LevelWarn, "front door: connection refused: too many connections shared with the backend (raise the shared limit)",
			"remote", remote.String())
		nc.Close()
		l.disown(nc)
		return
	}
	defer func() {
		l.mu.Lock()
		l.sharing--
		l.mu.Unlock()
	}()
	backend, err := l.dialShare()
	if err == nil && !l.own(backend) {
		backend.Close()
		err = net.ErrClosed
	}
	if err == nil {
		backend.SetWriteDeadline(time.Now().Add(relay.DefaultWriteTimeout))
		_, err = backend.Write(v.replay)
		backend.SetWriteDeadline(time.Time{})
		if err != nil {
			backend.Close()
			l.disown(backend)
		}
	}
	putBuffer(buf)
	if err != nil {
		l.logs.share.Log(l.log, slog.LevelWarn, "front door: share backend unreachable", "backend", l.cfg.ShareBackend,
			"remote", remote.String(), "err", err)
		nc.Close()
		l.disown(nc)
		return
	}
	l.counters.SharedConns.Add(1)
	l.logs.shared.Log(l.log, slog.LevelDebug, "front door: connection shared with the backend", "remote", remote.String(),
		"backend", l.cfg.ShareBackend, "server_name", v.hello.serverName)
	nc.SetDeadline(time.Time{})
	var wg sync.WaitGroup
	wg.Add(1)
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		defer wg.Done()
		spliceHalf(backend, nc)
	}()
	if spliceHalf(nc, backend) {
		// The backend has finished; the client has a while to finish too.
		nc.SetReadDeadline(time.Now().Add(l.linger))
	}
	wg.Wait()
	nc.Close()
	backend.Close()
	l.disown(nc)
	l.disown(backend)
}

// shareLinger bounds how long a client may go on sending once the share
// backend has finished (closed its side): a half-closed connection must
// not hold a slot forever. The other way round, the backend decides.
var shareLinger = 30 * time.Second

// dialShare connects to the share backend, until Close.
func (l *Listener) dialShare() (net.Conn, error) {
	ctx, cancel := context.WithTimeout(l.ctx, shareDialTimeout)
	defer cancel()
	if l.cfg.DialShare != nil {
		return l.cfg.DialShare(ctx, "tcp", l.cfg.ShareBackend)
	}
	d := net.Dialer{KeepAliveConfig: relay.TCPKeepAlive}
	return d.DialContext(ctx, "tcp", l.cfg.ShareBackend)
}

// own makes the front door own c (Close closes it), and reports whether it
// still runs.
func (l *Listener) own(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.owned[c] = struct{}{}
	return true
}

// spliceHalf copies src to dst until src ends, then half-closes dst: the
// other direction goes on. A failure (a reset, a deadline, Close) ends
// both. It reports whether src ended cleanly.
func spliceHalf(dst, src net.Conn) bool {
	// Between two TCP sockets io.Copy splices in the kernel.
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		src.Close()
		return false
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); !ok || cw.CloseWrite() != nil {
		dst.Close()
	}
	return true
}
