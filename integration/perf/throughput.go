package perf

import (
	"context"
	"fmt"
	"os"
	"time"
)

// Step is one offered rate on one path.
type Step struct {
	Path string
	// Target is the rate asked of the blaster, datagrams/s; 0 is flat out.
	Target float64
	// Offered is the rate the blaster reached over the steady part.
	Offered float64
	// Sent and Received count datagrams; Received after the path drained.
	Sent, Received uint64
	// Delivered is the sink's rate over the step's steady part (the
	// first fifth of the step left out), datagrams/s.
	Delivered float64
	// Loss is 1 - Received/Sent.
	Loss float64
	// RelayCPU is the relay processes' CPU time (utime+stime of client
	// and server) over the steady part per datagram delivered in it;
	// RelayCores is the same CPU time per second of wall time. Both 0 for
	// a path without relays.
	RelayCPU   time.Duration
	RelayCores float64
	// ClientCPU and ServerCPU split RelayCPU between the relay at the
	// site (client) and the one at the hub (server).
	ClientCPU, ServerCPU time.Duration
	// HarnessCPU is this process's CPU (blaster and sink) per datagram
	// delivered, over the same window.
	HarnessCPU time.Duration
}

// runStep offers rate (0: flat out) on p for d and measures.
func runStep(ctx context.Context, p *Path, rate float64, d time.Duration) (Step, error) {
	st := Step{Path: p.Name, Target: rate}
	if err := p.alive(); err != nil {
		return st, err
	}
	pids := p.RelayPIDs()
	self := os.Getpid()
	c0 := p.Sink.Datagrams()
	type result struct {
		sent int
		err  error
	}
	done := make(chan result, 1)
	go func() {
		sent, _, err := p.Blaster.Blast(ctx, rate, d)
		done <- result{sent, err}
	}()
	warm := d / 5
	select {
	case <-time.After(warm):
	case r := <-done:
		return st, fmt.Errorf("%s: blast ended early: %v", p.Name, r.err)
	}
	t0 := time.Now()
	s0 := p.Blaster.Sent()
	w0 := p.Sink.Datagrams()
	cpu0, err0 := CPUTimes(pids)
	each0 := cpuEach(pids)
	h0, _ := CPUTime(self)
	r := <-done
	t1 := time.Now()
	s1 := p.Blaster.Sent()
	w1 := p.Sink.Datagrams()
	cpu1, err1 := CPUTimes(pids)
	each1 := cpuEach(pids)
	h1, _ := CPUTime(self)
	if r.err != nil {
		return st, fmt.Errorf("%s: %w", p.Name, r.err)
	}
	if err0 != nil || err1 != nil {
		if err := p.alive(); err != nil {
			return st, err
		}
		return st, fmt.Errorf("%s: relay CPU: %v %v", p.Name, err0, err1)
	}
	st.Sent = uint64(r.sent)
	window := t1.Sub(t0)
	st.Offered = float64(s1-s0) / window.Seconds()
	got := w1 - w0
	st.Delivered = float64(got) / window.Seconds()
	if got > 0 {
		if len(pids) > 0 {
			st.RelayCPU = (cpu1 - cpu0) / time.Duration(got)
		}
		if len(pids) == 2 && len(each0) == 2 && len(each1) == 2 {
			st.ClientCPU = (each1[0] - each0[0]) / time.Duration(got)
			st.ServerCPU = (each1[1] - each0[1]) / time.Duration(got)
		}
		st.HarnessCPU = (h1 - h0) / time.Duration(got)
	}
	if len(pids) > 0 {
		st.RelayCores = (cpu1 - cpu0).Seconds() / window.Seconds()
	}
	st.Received = drain(ctx, p.Sink) - c0
	if st.Sent > 0 {
		st.Loss = max(0, 1-float64(st.Received)/float64(st.Sent))
	}
	return st, p.alive()
}

// cpuEach is CPUTime of each pid; nil if any cannot be read.
func cpuEach(pids []int) []time.Duration {
	out := make([]time.Duration, len(pids))
	for i, pid := range pids {
		t, err := CPUTime(pid)
		if err != nil {
			return nil
		}
		out[i] = t
	}
	return out
}

// drain waits until the sink's count has not moved for 300 ms (at most
// 5 s) and returns it: what the path still held has arrived by then.
func drain(ctx context.Context, s *Sink) uint64 {
	last := s.Datagrams()
	still := 0
	for range 100 {
		if ctx.Err() != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
		n := s.Datagrams()
		if n == last {
			if still++; still >= 6 {
				break
			}
			continue
		}
		last, still = n, 0
	}
	return last
}

// idleCores measures each path's relays' CPU, in cores, over d with no
// traffic: what the relays cost while nothing happens.
func idleCores(paths []*Path, d time.Duration) (map[string]float64, error) {
	before := make([]time.Duration, len(paths))
	for i, p := range paths {
		t, err := CPUTimes(p.RelayPIDs())
		if err != nil {
			return nil, err
		}
		before[i] = t
	}
	start := time.Now()
	time.Sleep(d)
	out := make(map[string]float64, len(paths))
	for i, p := range paths {
		t, err := CPUTimes(p.RelayPIDs())
		if err != nil {
			return nil, err
		}
		if len(p.Relays) > 0 {
			out[p.Name] = (t - before[i]).Seconds() / time.Since(start).Seconds()
		}
	}
	return out, nil
}
