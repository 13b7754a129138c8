package relaytest

import (
	"bytes"
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Middle is a TCP relay between the rig's client and its server: a
// network the test controls. It can cut a connection silently, as a NAT
// that forgets its mapping does (the client's side is closed, the
// server's side stays open and hears nothing more), and it keeps a copy
// of what each client sent.
type Middle struct {
	r  *Rig
	ln net.Listener

	mu    sync.Mutex // guards the following
	pairs []*middlePair
	wg    sync.WaitGroup
}

type middlePair struct {
	client, server net.Conn
	stalled        atomic.Bool // nothing crosses, either way
	mu             sync.Mutex  // guards sent
	sent           bytes.Buffer
}

// NewMiddle starts a relay to the rig's server for the test's life; its
// Dial is for the client's dialer.
func NewMiddle(tb testing.TB, r *Rig) *Middle {
	tb.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(r.IP, "0"))
	if err != nil {
		tb.Fatal(err)
	}
	m := &Middle{r: r, ln: ln}
	m.wg.Add(1)
	go m.accept()
	tb.Cleanup(func() {
		ln.Close()
		m.mu.Lock()
		for _, p := range m.pairs {
			p.client.Close()
			p.server.Close()
		}
		m.mu.Unlock()
		m.wg.Wait()
	})
	return m
}

// Dial connects to the server through the relay, whatever addr says.
func (m *Middle) Dial(ctx context.Context, network, _ string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, network, m.ln.Addr().String())
}

func (m *Middle) accept() {
	defer m.wg.Done()
	for {
		c, err := m.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", m.r.SrvAddr)
		if err != nil {
			c.Close()
			continue
		}
		p := &middlePair{client: c, server: s}
		m.mu.Lock()
		m.pairs = append(m.pairs, p)
		m.mu.Unlock()
		m.wg.Add(2)
		go func() { // client to server, copied
			defer m.wg.Done()
			buf := make([]byte, 32<<10)
			for {
				n, err := c.Read(buf)
				if n > 0 && !p.stalled.Load() {
					p.mu.Lock()
					p.sent.Write(buf[:n])
					p.mu.Unlock()
					if _, werr := s.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
		go func() { // server to client
			defer m.wg.Done()
			buf := make([]byte, 32<<10)
			for {
				n, err := s.Read(buf)
				if n > 0 && !p.stalled.Load() {
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

// Conns is how many connections have gone through the relay.
func (m *Middle) Conns() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.pairs)
}

// Sent returns a copy of what the client sent on connection i.
func (m *Middle) Sent(i int) []byte {
	m.mu.Lock()
	p := m.pairs[i]
	m.mu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	return bytes.Clone(p.sent.Bytes())
}

// Stall makes connection i a black hole both ways, as a carrier that
// drops everything does: both sides stay open, and what they send is
// lost (the TCP stacks beside the relay still acknowledge it).
func (m *Middle) Stall(i int) {
	m.mu.Lock()
	p := m.pairs[i]
	m.mu.Unlock()
	p.stalled.Store(true)
}

// Cut forgets connection i as a NAT would: the client's side closes, the
// server's side stays open and silent.
func (m *Middle) Cut(i int) {
	m.mu.Lock()
	p := m.pairs[i]
	m.mu.Unlock()
	p.client.Close()
}
