package lab

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"strings"
)

// TCPConn is one TCP connection as seen from inside a namespace.
type TCPConn struct {
	Local, Remote netip.AddrPort
}

func (c TCPConn) String() string { return c.Local.String() + " -> " + c.Remote.String() }

// EstablishedTCP lists the namespace's established TCP connections (`ss
// -Htn state established`) whose local or remote port is port (any port
// if 0).
func (ns *Namespace) EstablishedTCP(ctx context.Context, port uint16) ([]TCPConn, error) {
	out, err := ns.Run(ctx, "ss", "-Htn", "state", "established")
	if err != nil {
		return nil, err
	}
	conns, err := parseSSEstablished(out)
	if err != nil {
		return nil, fmt.Errorf("ss in %s: %w", ns.Role, err)
	}
	if port == 0 {
		return conns, nil
	}
	var mine []TCPConn
	for _, c := range conns {
		if c.Local.Port() == port || c.Remote.Port() == port {
			mine = append(mine, c)
		}
	}
	return mine, nil
}

// parseSSEstablished reads `ss -Htn state established`: with a state
// filter, ss leaves the state column out, so each line is Recv-Q, Send-Q,
// the local and the remote address.
func parseSSEstablished(out []byte) ([]TCPConn, error) {
	var conns []TCPConn
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) < 4 {
			return nil, fmt.Errorf("unexpected line %q", sc.Text())
		}
		local, err1 := netip.ParseAddrPort(f[2])
		remote, err2 := netip.ParseAddrPort(f[3])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("unexpected line %q", sc.Text())
		}
		conns = append(conns, TCPConn{
			Local:  netip.AddrPortFrom(local.Addr().Unmap(), local.Port()),
			Remote: netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port()),
		})
	}
	return conns, sc.Err()
}
