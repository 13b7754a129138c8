package perf

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/integration/lab"
)

// tcpCeilingPort is where the ceiling's receiver listens on the hub's veth
// address.
const tcpCeilingPort = 6100

// TCPCeiling is one plain TCP stream between the two namespaces over the
// same veth the paths use, written flat out in large writes and read in
// large reads, with nothing framed or relayed: the most any encapsulation
// that carries datagrams in one TCP connection could deliver here.
type TCPCeiling struct {
	// BytesPerSecond is what the receiver read.
	BytesPerSecond float64
	// Datagrams is BytesPerSecond in datagrams of DatagramSize with their
	// RFC 9329 length field, the unit the paths are measured in.
	Datagrams float64
	// CPU is the harness's CPU time (both ends of the stream, and the
	// kernel's work on their behalf) per datagram's worth of bytes: what
	// TCP alone costs a relay pair per datagram here.
	CPU time.Duration
}

// measureTCPCeiling runs the stream for d and reports what arrived.
func measureTCPCeiling(ctx context.Context, l *lab.Lab, d time.Duration) (TCPCeiling, error) {
	dst := netip.AddrPortFrom(hubOuter, tcpCeilingPort)
	ln, err := l.Hub.Listen("tcp4", dst.String())
	if err != nil {
		return TCPCeiling{}, fmt.Errorf("tcp ceiling: listen: %w", err)
	}
	defer ln.Close()

	var read atomic.Int64
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- err
			return
		}
		defer c.Close()
		accepted <- nil
		buf := make([]byte, 256<<10)
		for {
			n, err := c.Read(buf)
			read.Add(int64(n))
			if err != nil {
				return
			}
		}
	}()

	var conn net.Conn
	err = l.Site.Do(func() (err error) {
		dialer := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(siteOuter, 0)), Timeout: 5 * time.Second}
		conn, err = dialer.DialContext(ctx, "tcp4", dst.String())
		return err
	})
	if err != nil {
		return TCPCeiling{}, fmt.Errorf("tcp ceiling: dial: %w", err)
	}
	defer conn.Close()
	select {
	case err := <-accepted:
		if err != nil {
			return TCPCeiling{}, fmt.Errorf("tcp ceiling: accept: %w", err)
		}
	case <-time.After(5 * time.Second):
		return TCPCeiling{}, errors.New("tcp ceiling: no connection accepted within 5 s")
	}

	// The writer's buffer holds whole frames, as a relay's write would.
	frame := framing.LengthSize + DatagramSize
	buf := make([]byte, (256<<10)/frame*frame)
	// Warm up (slow start), then measure: the writes end at the deadline.
	warm := min(d/4, 500*time.Millisecond)
	conn.SetWriteDeadline(time.Now().Add(warm))
	for {
		if _, err := conn.Write(buf); err != nil {
			break
		}
	}
	start, startBytes := time.Now(), read.Load()
	cpu0, cpuErr := CPUTime(os.Getpid())
	conn.SetWriteDeadline(start.Add(d))
	for {
		if _, err := conn.Write(buf); err != nil {
			if !errors.Is(err, context.DeadlineExceeded) && !isTimeout(err) && !errors.Is(err, io.EOF) {
				return TCPCeiling{}, fmt.Errorf("tcp ceiling: write: %w", err)
			}
			break
		}
	}
	took, got := time.Since(start), read.Load()-startBytes
	cpu1, err := CPUTime(os.Getpid())
	if err = errors.Join(cpuErr, err); err != nil {
		return TCPCeiling{}, fmt.Errorf("tcp ceiling: %w", err)
	}
	bps := float64(got) / took.Seconds()
	c := TCPCeiling{BytesPerSecond: bps, Datagrams: bps / float64(frame)}
	if n := got / int64(frame); n > 0 {
		c.CPU = (cpu1 - cpu0) / time.Duration(n)
	}
	return c, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
