//go:build linux

package antireplay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

const (
	// CopyRange is how many bytes of each packet the kernel copies to the
	// queue: enough for the largest IPv4 and TCP headers. The tracker
	// takes the payload length from the IP header.
	CopyRange = 256
	// QueueMaxLen is how many packets may wait for a verdict; the kernel
	// drops packets beyond it (the queue is not fail-open).
	QueueMaxLen = 4096

	socketBuffer  = 8 << 20 // receive buffer (SO_RCVBUFFORCE as root)
	recvBufSize   = 64 << 10
	configTimeout = 5 * time.Second
	// drainTime bounds how long Run keeps handing out verdicts for
	// packets already delivered after its context ended.
	drainTime = 50 * time.Millisecond
	// maxMessages bounds the datagrams read while draining or while
	// waiting for the kernel to answer a configuration message.
	maxMessages = 1 << 16
)

// QueueStats counts what a Queue saw besides the tracker's verdicts.
type QueueStats struct {
	Packets       uint64 // packets received and given a verdict
	Overruns      uint64 // ENOBUFS: the socket buffer was full, the kernel dropped packets
	VerdictErrors uint64 // the kernel refused a verdict (unknown packet ID)
	BadMessages   uint64 // messages that could not be decoded
}

// Queue is a netlink socket bound to one nfnetlink_queue queue of the
// network namespace it was opened in. Open it with OpenQueue, serve it
// with Run (one at a time), and Close it.
//
// The queue copies CopyRange bytes of each packet, holds at most
// QueueMaxLen packets, and is not fail-open: when the program is slow the
// kernel drops what does not fit, and when no program is bound (after
// Close, or if the program dies) the NFQUEUE target drops every packet
// unless its rule has --queue-bypass.
type Queue struct {
	num  uint16
	conn *netlink.Conn
	rc   syscall.RawConn

	// Used only by the one goroutine that talks on the socket: OpenQueue,
	// then Run (mu.running), then Close.
	rbuf    []byte
	rn      int
	rerr    error
	readFn  func(fd uintptr) bool
	wbuf    []byte
	werr    error
	writeFn func(fd uintptr) bool
	pending [][]byte // packet messages received while binding, for Run

	mu      sync.Mutex // guards the three flags below
	bound   bool       // the kernel queue is bound to this socket
	running bool       // a Run is serving the queue
	closed  bool

	packets, overruns, verdictErrors, badMessages atomic.Uint64
}

// OpenQueue opens a netlink socket in the calling thread's network
// namespace and binds queue num to it: packets the NFQUEUE target sends
// to num wait there for Run. Bind it before installing the rule that
// feeds it, so that no packet meets an unbound queue. The socket stays in
// its namespace and may be used from any goroutine.
func OpenQueue(num uint16) (*Queue, error) {
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return nil, fmt.Errorf("open a netfilter netlink socket: %w", err)
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("netfilter netlink socket: %w", err)
	}
	q := &Queue{num: num, conn: conn, rc: rc, rbuf: make([]byte, recvBufSize), wbuf: make([]byte, 0, verdictMsgLen)}
	q.readFn = func(fd uintptr) bool {
		q.rn, q.rerr = unix.Read(int(fd), q.rbuf)
		return q.rerr != unix.EAGAIN
	}
	q.writeFn = func(fd uintptr) bool {
		_, q.werr = unix.Write(int(fd), q.wbuf)
		return q.werr != unix.EAGAIN
	}
	if err := conn.SetReadBuffer(socketBuffer); err != nil {
		conn.Close()
		return nil, fmt.Errorf("set the netlink socket's receive buffer: %w", err)
	}
	if err := q.config(bindRequest(num, CopyRange, QueueMaxLen), true); err != nil {
		conn.Close()
		switch {
		case errors.Is(err, unix.EPERM):
			return nil, fmt.Errorf("bind NFQUEUE queue %d: %w: another program has bound it in this network namespace, or this process lacks CAP_NET_ADMIN (run as root)", num, err)
		case errors.Is(err, unix.EBUSY):
			return nil, fmt.Errorf("bind NFQUEUE queue %d: %w: another program has bound it in this network namespace; pick another queue number", num, err)
		default:
			return nil, fmt.Errorf("bind NFQUEUE queue %d: %w (does the kernel have CONFIG_NETFILTER_NETLINK_QUEUE?)", num, err)
		}
	}
	q.bound = true
	return q, nil
}

// Num is the queue's number.
func (q *Queue) Num() uint16 { return q.num }

// Stats returns the queue's counters.
func (q *Queue) Stats() QueueStats {
	return QueueStats{
		Packets:       q.packets.Load(),
		Overruns:      q.overruns.Load(),
		VerdictErrors: q.verdictErrors.Load(),
		BadMessages:   q.badMessages.Load(),
	}
}

// Close unbinds the queue (the kernel drops packets still waiting in it)
// and closes the socket. Stop Run first, by cancelling its context and
// waiting for it: Close during Run only closes the socket, and Run then
// fails. Close is idempotent.
func (q *Queue) Close() error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	unbind := q.bound && !q.running
	q.bound = false
	q.mu.Unlock()
	var err error
	if unbind {
		err = q.config(unbindRequest(q.num), false)
		q.pending = nil
	}
	if cerr := q.conn.Close(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	if err != nil {
		return fmt.Errorf("close NFQUEUE queue %d: %w", q.num, err)
	}
	return nil
}

// Run hands every packet of the queue to t and sends t's verdict back,
// until ctx ends or the socket fails. When ctx ends it gives verdicts for
// the packets already delivered (for at most 50 ms), unbinds the queue and
// returns nil; the kernel drops whatever still arrives (remove the rule
// that feeds the queue first). Only one Run may serve a Queue, once.
func Run(ctx context.Context, q *Queue, t *Tracker) error {
	q.mu.Lock()
	switch {
	case q.closed || !q.bound:
		q.mu.Unlock()
		return fmt.Errorf("NFQUEUE queue %d is closed or no longer bound: open a new one", q.num)
	case q.running:
		q.mu.Unlock()
		return fmt.Errorf("NFQUEUE queue %d is already served by another Run", q.num)
	}
	q.running = true
	q.mu.Unlock()
	defer func() {
		q.mu.Lock()
		q.running = false
		q.mu.Unlock()
	}()

	woken := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(woken)
		q.conn.SetReadDeadline(time.Unix(1, 0)) // in the past: wakes the blocked read
	})
	var runErr error
	for _, data := range q.pending {
		if runErr = q.handlePacket(data, t); runErr != nil {
			break
		}
	}
	q.pending = nil
	for runErr == nil && ctx.Err() == nil {
		if runErr = q.serve(t); errors.Is(runErr, os.ErrDeadlineExceeded) {
			runErr = nil // ctx ended: the loop condition sees it
		}
	}
	if !stop() {
		<-woken
	}
	if runErr != nil {
		return fmt.Errorf("NFQUEUE queue %d stopped serving (close it and open a new one): %w", q.num, runErr)
	}

	// Verdicts for what the kernel delivered before ctx ended.
	if err := q.conn.SetReadDeadline(time.Now().Add(drainTime)); err != nil {
		return fmt.Errorf("NFQUEUE queue %d: %w", q.num, err)
	}
	for range maxMessages {
		if err := q.serve(t); err != nil {
			break
		}
	}
	if err := q.conn.SetReadDeadline(time.Time{}); err != nil {
		return fmt.Errorf("NFQUEUE queue %d: %w", q.num, err)
	}
	q.mu.Lock()
	q.bound = false
	q.mu.Unlock()
	if err := q.config(unbindRequest(q.num), false); err != nil {
		return fmt.Errorf("unbind NFQUEUE queue %d: %w", q.num, err)
	}
	return nil
}

// serve reads one datagram and answers the packets in it. ENOBUFS is
// counted, not returned.
func (q *Queue) serve(t *Tracker) error {
	n, err := q.recv()
	if errors.Is(err, unix.ENOBUFS) {
		q.overruns.Add(1)
		return nil
	}
	if err != nil {
		return err
	}
	b := q.rbuf[:n]
	for len(b) > 0 {
		h, data, rest, err := splitMessage(b)
		if err != nil {
			q.badMessages.Add(1)
			return nil
		}
		b = rest
		switch h.Type {
		case queueMsgType(nfqnlMsgPacket):
			if err := q.handlePacket(data, t); err != nil {
				return err
			}
		case nlmsgError:
			q.noteError(data)
		}
	}
	return nil
}

// handlePacket gives one NFQNL_MSG_PACKET payload its verdict.
func (q *Queue) handlePacket(data []byte, t *Tracker) error {
	p, err := parsePacketMsg(data)
	if err != nil {
		// Without a packet ID there is nothing to answer.
		q.badMessages.Add(1)
		return nil
	}
	v := t.Check(time.Now(), p.Payload)
	q.packets.Add(1)
	q.wbuf = appendVerdict(q.wbuf[:0], q.num, p.ID, v.Accept)
	if err := q.rc.Write(q.writeFn); err != nil {
		return fmt.Errorf("send verdict: %w", err)
	}
	if q.werr != nil {
		return fmt.Errorf("send verdict: %w", q.werr)
	}
	return nil
}

// noteError counts an error answer to a verdict.
func (q *Queue) noteError(data []byte) {
	errno, _, err := parseErrorMsg(data)
	switch {
	case err != nil:
		q.badMessages.Add(1)
	case errno != 0:
		q.verdictErrors.Add(1)
	}
}

// recv reads one datagram into rbuf.
func (q *Queue) recv() (int, error) {
	if err := q.rc.Read(q.readFn); err != nil {
		return 0, err
	}
	return q.rn, q.rerr
}

// config sends a configuration message and waits for the kernel's answer.
// Packets that arrive meanwhile are kept for Run when collect is set, and
// otherwise left to the kernel, which drops them when the queue is
// unbound.
func (q *Queue) config(req []byte, collect bool) error {
	sent, err := q.conn.Send(netlink.Message{
		Header: netlink.Header{
			Type:  netlink.HeaderType(queueMsgType(nfqnlMsgConfig)),
			Flags: netlink.Request | netlink.Acknowledge,
		},
		Data: req,
	})
	if err != nil {
		return err
	}
	if err := q.conn.SetReadDeadline(time.Now().Add(configTimeout)); err != nil {
		return err
	}
	defer q.conn.SetReadDeadline(time.Time{})
	for range maxMessages {
		n, err := q.recv()
		if errors.Is(err, unix.ENOBUFS) {
			q.overruns.Add(1)
			continue
		}
		if err != nil {
			return fmt.Errorf("waiting for the kernel's answer: %w", err)
		}
		b := q.rbuf[:n]
		for len(b) > 0 {
			h, data, rest, err := splitMessage(b)
			if err != nil {
				q.badMessages.Add(1)
				break
			}
			b = rest
			switch h.Type {
			case nlmsgError:
				errno, seq, err := parseErrorMsg(data)
				if err == nil && h.Seq == sent.Header.Sequence && seq == sent.Header.Sequence {
					if errno == 0 {
						return nil
					}
					return unix.Errno(-errno)
				}
				q.noteError(data)
			case queueMsgType(nfqnlMsgPacket):
				if collect && len(q.pending) < QueueMaxLen {
					q.pending = append(q.pending, bytes.Clone(data))
				}
			}
		}
	}
	return errors.New("no answer from the kernel among the messages read")
}
