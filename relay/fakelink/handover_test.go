package fakelink_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/faketcp"
	"github.com/iketcp/iketcp/nat/tun/tuntest"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/fakelink"
)

// collect is a relay.Receiver that keeps copies of what it receives.
type collect struct {
	mu  sync.Mutex
	got []string
}

func (c *collect) Receive(burst []relay.Datagram) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, d := range burst {
		c.got = append(c.got, string(d.Buf[d.Off:d.Off+d.N]))
	}
	return nil
}

func (c *collect) wait(t *testing.T, want string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		c.mu.Lock()
		for _, g := range c.got {
			if g == want {
				c.mu.Unlock()
				return
			}
		}
		c.mu.Unlock()
	}
	t.Fatalf("%q never arrived", want)
}

func datagram(s string) [][]byte {
	return [][]byte{append(make([]byte, relay.Headroom), s...)}
}

// TestDetachAdopt hands a server's link to a new stack on the same device,
// as an upgrade does: the old link's Serve returns relay.ErrDetached, its
// Send fails, and the link adopted from its state carries datagrams both
// ways on the client's unchanged link.
func TestDetachAdopt(t *testing.T) {
	cEnd, sEnd := tuntest.NewPipe(16, 1024)
	t.Cleanup(func() { cEnd.Close(); sEnd.Close() })
	cfg := faketcp.Config{Local: fakeServerAddr}
	sStack, err := faketcp.NewStack(sEnd, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cStack, err := faketcp.NewStack(cEnd, faketcp.Config{Local: fakeClientAddr})
	if err != nil {
		t.Fatal(err)
	}
	defer cStack.Close()
	ln, err := sStack.Listen(4500)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d := &fakelink.Dialer{Stack: cStack}
	cl, err := d.DialLink(ctx, netip.AddrPortFrom(fakeServerAddr, 4500).String())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	sl, err := fakelink.NewListener(ln, "test").Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	atClient, atOld := &collect{}, &collect{}
	go cl.Serve(atClient)
	served := make(chan error, 1)
	go func() { served <- sl.Serve(atOld) }()
	if err := cl.Send(datagram("before")); err != nil {
		t.Fatal(err)
	}
	atOld.wait(t, "before")

	if _, err := sl.(relay.Detachable).Detach(time.Second); err == nil {
		t.Fatal("Detach on a running stack succeeded")
	}
	st, err := sStack.Pause()
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Send(datagram("during")); err != nil {
		t.Fatal(err)
	}
	det, err := sl.(relay.Detachable).Detach(time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if det.File != nil || det.Encap != fakelink.Encap || len(det.State) == 0 {
		t.Fatalf("detached: %+v", det)
	}
	if err := <-served; !errors.Is(err, relay.ErrDetached) {
		t.Fatalf("the detached link's Serve: %v, want relay.ErrDetached", err)
	}
	if err := sl.Send(datagram("late")); err == nil {
		t.Fatal("Send on the detached link succeeded")
	}
	sStack.Close()

	var cs faketcp.ConnState
	if err := json.Unmarshal(det.State, &cs); err != nil {
		t.Fatal(err)
	}
	st.Conns = []faketcp.ConnState{cs}
	s2, _, conns, err := faketcp.ResumeStack(sEnd, cfg, st)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	nl := fakelink.Adopt(conns[0])
	atNew := &collect{}
	go nl.Serve(atNew)
	defer nl.Close()
	atNew.wait(t, "during")
	if err := nl.Send(datagram("from the new server")); err != nil {
		t.Fatal(err)
	}
	atClient.wait(t, "from the new server")
	if err := cl.Send(datagram("after")); err != nil {
		t.Fatal(err)
	}
	atNew.wait(t, "after")
	if nl.RemoteAddr() != cl.LocalAddr() {
		t.Fatalf("adopted link from %s, the client is %s", nl.RemoteAddr(), cl.LocalAddr())
	}
}
