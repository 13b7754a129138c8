package realaddr

import (
	"fmt"
	"net/netip"
)

// checkAddrs checks Dial's addresses and returns them unmapped (an IPv4
// client of a dual-stack listener comes as ::ffff:a.b.c.d).
func checkAddrs(client netip.Addr, backend netip.AddrPort) (netip.Addr, netip.AddrPort, error) {
	client = client.Unmap()
	b := backend.Addr().Unmap()
	backend = netip.AddrPortFrom(b, backend.Port())
	switch {
	case !client.IsValid():
		return client, backend, fmt.Errorf("real-address mode: no client address")
	case client.Zone() != "":
		return client, backend, fmt.Errorf("real-address mode: client %s: a scoped (link-local) address cannot be a session's source", client)
	case client.IsUnspecified() || client.IsMulticast() || client == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return client, backend, fmt.Errorf("real-address mode: client %s: not a unicast address", client)
	case !b.IsValid() || backend.Port() == 0:
		return client, backend, fmt.Errorf("real-address mode: backend %s: give the IKE daemon's address and port", backend)
	case b.Zone() != "" || b.IsUnspecified() || b.IsMulticast():
		return client, backend, fmt.Errorf("real-address mode: backend %s: give one of this host's own unicast addresses, without a zone", backend)
	case b.IsLoopback():
		// IPv4: the kernel refuses to route the daemon's replies from
		// 127.0.0.0/8 to a client's address (EINVAL), before the output
		// hook could mark them, unless route_localnet lets such packets
		// on the wire. IPv6 routes ::1-sourced replies, and sends them
		// out whenever no session's element marks them.
		return client, backend, fmt.Errorf("real-address mode: backend %s is a loopback address, from which the daemon cannot answer a client's real address "+
			"(the kernel refuses to route 127.0.0.0/8 sources off the host, and would send ::1 ones on the wire): "+
			"let the IKE daemon listen on one of this host's non-loopback addresses (or on all of them) and give that address as the backend", backend)
	case b.Is4() != client.Is4():
		return client, backend, fmt.Errorf("real-address mode: client %s and backend %s are of different IP families: a session's socket sends from the client's address, so it needs a backend address of the same family (the daemon listening on both)", client, backend)
	}
	return client, backend, nil
}
