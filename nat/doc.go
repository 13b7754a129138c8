// Package nat owns everything that fools or survives the network between
// the IKE daemons: for now, transparent mode's TUN interception, the policy
// routing behind it, and the clean-up of both. Policy rules (ipproto and
// dport selectors) move exactly UDP 500/4500 and ESP to the peers into a TUN
// device and leave the daemon, its sockets and its XFRM state as they are;
// raw sockets would only copy packets that still leave on the wire, and
// nftables TPROXY takes neither locally generated traffic nor ESP.
//
// What the rules catch: every datagram the daemon's sockets send to a peer's
// UDP 500 or 4500, and raw ESP it writes itself. ESP that the kernel's XFRM
// encrypts for the daemon is routed by a lookup that carries the outer
// packet's protocol and ports only since Linux 6.12 ("xfrm: respect ip
// protocols rules criteria when performing dst lookups", and stable
// kernels that took it); on older kernels it leaves by the main table.
// That case is not tested here: these kernels have no ESP transform, so
// the daemons in iketcp's lab use userspace ESP (strongSwan's
// kernel-libipsec), whose ESP leaves through its UDP 4500 socket.
//
// Linux only: elsewhere Intercept returns ErrNeedsLinux.
package nat
