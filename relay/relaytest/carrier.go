package relaytest

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"
)

// Carrier is a TCP relay to a target that can stop carrying anything, as
// a path that fails without a word: while held, it reads nothing either
// way, so the ends' connections stay open and what they send waits, as
// behind a dead carrier; released, what waited flows again, as TCP
// retransmits once the path heals.
type Carrier struct {
	ln     net.Listener
	target string

	mu    sync.Mutex // guards the following
	held  bool
	wake  chan struct{} // closed on Release
	conns []net.Conn
	wg    sync.WaitGroup
}

// NewCarrier starts a carrier on ip to target for the test's life.
func NewCarrier(tb testing.TB, ip, target string) *Carrier {
	tb.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		tb.Fatal(err)
	}
	c := &Carrier{ln: ln, target: target, wake: make(chan struct{})}
	c.wg.Add(1)
	go c.accept()
	tb.Cleanup(func() {
		ln.Close()
		c.Release()
		c.mu.Lock()
		for _, nc := range c.conns {
			nc.Close()
		}
		c.mu.Unlock()
		c.wg.Wait()
	})
	return c
}

// Addr is where to dial the target through the carrier.
func (c *Carrier) Addr() string { return c.ln.Addr().String() }

// Dial dials the target through the carrier, whatever addr says.
func (c *Carrier) Dial(ctx context.Context, network, _ string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, network, c.Addr())
}

// Hold stops the carrier carrying anything; Release starts it again.
func (c *Carrier) Hold() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.held {
		c.held = true
		c.wake = make(chan struct{})
	}
}

// Release lets what waited, and what comes, through again.
func (c *Carrier) Release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held {
		c.held = false
		close(c.wake)
	}
}

// waitReleased blocks while the carrier is held, at most a minute.
func (c *Carrier) waitReleased() {
	c.mu.Lock()
	held, wake := c.held, c.wake
	c.mu.Unlock()
	if held {
		select {
		case <-wake:
		case <-time.After(time.Minute):
		}
	}
}

func (c *Carrier) accept() {
	defer c.wg.Done()
	for {
		a, err := c.ln.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", c.target)
		if err != nil {
			a.Close()
			continue
		}
		c.mu.Lock()
		c.conns = append(c.conns, a, b)
		c.mu.Unlock()
		c.wg.Add(2)
		go c.pipe(a, b)
		go c.pipe(b, a)
	}
}

// pipe copies from src to dst, a read at a time, waiting while held.
func (c *Carrier) pipe(src, dst net.Conn) {
	defer c.wg.Done()
	defer dst.Close()
	buf := make([]byte, 32<<10)
	for {
		c.waitReleased()
		n, err := src.Read(buf)
		if n > 0 {
			c.waitReleased()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
