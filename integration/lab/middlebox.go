package lab

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/iketcp/iketcp/integration/antireplay"
)

// MiddleboxQueue is the NFQUEUE queue number the strict middlebox binds in
// the carrier namespace.
const MiddleboxQueue = 7

// middleboxStopWait bounds how long Stop waits for the tracker's goroutine
// and for the iptables command that removes the rule.
const middleboxStopWait = 10 * time.Second

// middleboxIptables are the iptables commands StartStrictMiddlebox tries,
// in order. iptables-legacy first: it keeps the rule out of the carrier's
// nftables ruleset, where iptables-nft would add a table ip filter whose
// NFQUEUE rule nft lists as a native "queue" statement that this kernel
// (without CONFIG_NFT_QUEUE) cannot load back.
var middleboxIptables = []string{"iptables-legacy", "iptables-nft"}

// Middlebox is a strict anti-replay middlebox in the carrier: an iptables
// rule sends every forwarded TCP segment to NFQUEUE MiddleboxQueue, and a
// goroutine of this process answers each with an antireplay.Tracker's
// verdict. The carrier's nftables table (masquerade, UDP blocking,
// counters) keeps working beside it. Start it with
// [Lab.StartStrictMiddlebox]; [Lab.Close] stops it.
//
// The queue is not fail-open and the rule has no --queue-bypass: while
// the rule is in place and this process does not answer, the carrier
// drops forwarded TCP.
type Middlebox struct {
	lab      *Lab
	tracker  *antireplay.Tracker
	queue    *antireplay.Queue
	iptables string   // path of the iptables command that installed the rule
	rule     []string // the rule after -A or -D

	cancel context.CancelFunc // ends the tracker's goroutine
	done   chan struct{}      // closed when that goroutine has returned
	runErr error              // what antireplay.Run returned; set before done is closed

	stopOnce sync.Once
	stopErr  error
}

// StartStrictMiddlebox binds NFQUEUE MiddleboxQueue inside the carrier
// namespace, installs the iptables rule that queues forwarded TCP to it,
// and serves the queue with a Tracker built from cfg (the zero Config is
// strict: window 0, handshake required) until Stop or Close. ctx bounds
// only the start. One middlebox at a time per lab.
//
// Real kernel TCP through a strict box: the carrier can reorder a
// connection's segments (two CPUs feed the queue), and with window 0 the
// earlier one of a reordered pair is dropped as backwards, with every
// retransmission of it, which stalls the connection; a window of 1 MiB
// covers that. The endpoints' tail loss probes resend the last segment
// when the middlebox is slow, and a strict box drops that copy as a
// repeat; set net.ipv4.tcp_early_retrans=0 in the site and hub where a
// test must see no drop at all.
func (l *Lab) StartStrictMiddlebox(ctx context.Context, cfg antireplay.Config) (*Middlebox, error) {
	if l.Carrier == nil {
		return nil, errNoCarrier
	}
	ipt := ""
	for _, name := range middleboxIptables {
		if ipt = toolPath(name); ipt != "" {
			break
		}
	}
	if ipt == "" {
		return nil, errors.New("iptables-legacy not found: the strict middlebox needs it to send forwarded TCP to NFQUEUE; run make deps (apt-get install iptables)")
	}
	var q *antireplay.Queue
	if err := l.Carrier.Do(func() (err error) {
		q, err = antireplay.OpenQueue(MiddleboxQueue)
		return err
	}); err != nil {
		return nil, fmt.Errorf("strict middlebox in %s (is one running already? Stop it first): %w", l.Carrier.Name, err)
	}
	m := &Middlebox{
		lab:      l,
		tracker:  antireplay.NewTracker(cfg),
		queue:    q,
		iptables: ipt,
		rule:     []string{"FORWARD", "-p", "tcp", "-j", "NFQUEUE", "--queue-num", strconv.Itoa(MiddleboxQueue)},
		done:     make(chan struct{}),
	}
	// The queue is bound first, so no segment meets an unbound queue.
	if _, err := l.Carrier.Run(ctx, ipt, append([]string{"-w", "5", "-A"}, m.rule...)...); err != nil {
		q.Close()
		return nil, fmt.Errorf("install the strict middlebox's NFQUEUE rule: %w", err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	go func() {
		defer close(m.done)
		m.runErr = antireplay.Run(runCtx, q, m.tracker)
	}()
	if err := l.onClose(m.Stop); err != nil {
		return nil, errors.Join(err, m.Stop())
	}
	l.mu.Lock()
	l.mbox = m
	l.mu.Unlock()
	l.logf("lab %s: strict anti-replay middlebox in carrier (%s, NFQUEUE %d, window %d)", l.Name, ipt, MiddleboxQueue, cfg.Window)
	return m, nil
}

// Stats returns the tracker's counters: accepted segments and drops by
// reason.
func (m *Middlebox) Stats() antireplay.Stats { return m.tracker.Stats() }

// QueueStats returns the queue's own counters (packets handled, socket
// overruns, refused verdicts).
func (m *Middlebox) QueueStats() antireplay.QueueStats { return m.queue.Stats() }

// Done is closed once the middlebox no longer answers the queue: after
// Stop, or if serving the queue failed (see Err).
func (m *Middlebox) Done() <-chan struct{} { return m.done }

// Err returns why the middlebox stopped serving the queue on its own, once
// Done is closed; nil while it runs and after a clean Stop.
func (m *Middlebox) Err() error {
	select {
	case <-m.done:
		return m.runErr
	default:
		return nil
	}
}

// Stop removes the rule (forwarded TCP then bypasses the middlebox),
// answers the segments already queued, unbinds the queue and ends the
// goroutine. Calling it again, or Lab.Close after it, returns the same
// result.
func (m *Middlebox) Stop() error {
	m.stopOnce.Do(func() { m.stopErr = m.stop() })
	return m.stopErr
}

func (m *Middlebox) stop() error {
	l := m.lab
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), middleboxStopWait)
	defer cancel()
	if _, err := l.Carrier.Run(ctx, m.iptables, append([]string{"-w", "5", "-D"}, m.rule...)...); err != nil {
		errs = append(errs, fmt.Errorf("remove the strict middlebox's NFQUEUE rule: %w", err))
	}
	m.cancel()
	select {
	case <-m.done:
		if m.runErr != nil {
			errs = append(errs, fmt.Errorf("strict middlebox: %w", m.runErr))
		}
	case <-ctx.Done():
		// Closing the queue below makes Run return.
		errs = append(errs, fmt.Errorf("strict middlebox did not stop within %s", middleboxStopWait))
	}
	if err := m.queue.Close(); err != nil {
		errs = append(errs, err)
	}
	if !waitClosed(m.done, middleboxStopWait) {
		errs = append(errs, errors.New("strict middlebox: its goroutine still runs after the queue was closed"))
	}
	l.logf("lab %s: strict middlebox stopped: %v", l.Name, m.tracker.Stats().Map())
	return errors.Join(errs...)
}

// onClose registers fn to run when the lab closes, before its processes
// stop and its namespaces go. If the lab is closed already it returns an
// error and does not run fn.
func (l *Lab) onClose(fn func() error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("lab %s is closed", l.Name)
	}
	l.closers = append(l.closers, fn)
	return nil
}

// Middlebox returns the strict middlebox started last (by
// StartStrictMiddlebox or the strict-tcp profile), or nil.
func (l *Lab) Middlebox() *Middlebox {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.mbox
}
