package relay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
)

// ListenTCP opens the server's TCP listener with keepalives on accepted
// connections. Its errors say what to do.
func ListenTCP(ctx context.Context, addr string) (net.Listener, error) {
	lc := net.ListenConfig{KeepAliveConfig: TCPKeepAlive}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, listenHint(err, "another TCP service (an IKE daemon with TCP support, a web server?) holds the port: stop it or choose another --listen")
	}
	return ln, nil
}

// ListenUDP opens the client's local UDP socket for the IKE daemon.
func ListenUDP(addr string) (*net.UDPConn, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w (want host:port, e.g. 127.0.0.1:14500)", addr, err)
	}
	uc, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, listenHint(err, "the IKE daemon (or another iketcp) holds this UDP port: choose another --listen port and set the daemon's remote_port to it")
	}
	growSocketBuffers(uc)
	return uc, nil
}

func listenHint(err error, inUse string) error {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("%w (%s)", err, inUse)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("%w (ports below 1024 need root or CAP_NET_BIND_SERVICE)", err)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("%w (no interface has that address)", err)
	}
	return err
}
