package relaytest

import (
	"bytes"
	"context"
	"io"
	"net"
	"sync"
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
	mu             sync.Mutex // guards sent
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
				if n > 0 {
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
			io.Copy(c, s)
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

// Cut forgets connection i as a NAT would: the client's side closes, the
// server's side stays open and silent.
func (m *Middle) Cut(i int) {
	m.mu.Lock()
	p := m.pairs[i]
	m.mu.Unlock()
	p.client.Close()
}
