package lab

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs fn on an OS thread that has entered the namespace, for code in
// this process that needs sockets there. Sockets created inside fn stay in
// the namespace and can be used from any goroutine afterwards. fn must not
// rely on goroutines it starts: they run on other threads, outside the
// namespace. The thread is discarded when fn returns, so the rest of the
// program never runs in the namespace.
func (ns *Namespace) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: a goroutine that exits while locked takes its
		// thread with it, so no other goroutine inherits the namespace.
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join("/run/netns", ns.Name))
		if err != nil {
			errc <- fmt.Errorf("open namespace %s: %w", ns.Name, err)
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			errc <- fmt.Errorf("enter namespace %s: %w", ns.Name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Listen opens a listener (net.Listen) inside the namespace.
func (ns *Namespace) Listen(network, address string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() (err error) {
		ln, err = net.Listen(network, address)
		return err
	})
	return ln, err
}

// ListenPacket opens a packet socket (net.ListenPacket) inside the
// namespace.
func (ns *Namespace) ListenPacket(network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := ns.Do(func() (err error) {
		pc, err = net.ListenPacket(network, address)
		return err
	})
	return pc, err
}

// Dial connects from inside the namespace (net.Dialer.DialContext).
func (ns *Namespace) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	var conn net.Conn
	err := ns.Do(func() (err error) {
		var d net.Dialer
		conn, err = d.DialContext(ctx, network, address)
		return err
	})
	return conn, err
}
