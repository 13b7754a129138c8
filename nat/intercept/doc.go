// Package intercept owns transparent mode: the TUN device that carries
// the unchanged IKE daemon's traffic to its peers into iketcp, the policy
// routing that moves exactly that traffic into it, and the clean-up of
// both, after Close or after a crash (Cleanup). An *Interceptor is a
// tun.Device: Read returns the daemon's packets, Write hands replies back
// to it.
//
// Policy rules (ipproto and dport selectors) move exactly UDP 500/4500
// and ESP to the peers into a TUN device and leave the daemon, its
// sockets and its XFRM state as they are; raw sockets would only copy
// packets that still leave on the wire, and nftables TPROXY takes
// neither locally generated traffic nor ESP. iketcp's own sockets carry a
// firewall mark (SetMark) that a rule before the others sends past the
// interception.
//
// What the rules catch: every datagram the daemon's sockets send to a peer's
// UDP 500 or 4500, and raw ESP it writes itself. ESP that the kernel's XFRM
// encrypts for the daemon is routed by a lookup that carries the outer
// packet's protocol and ports only since Linux 6.12 ("xfrm: respect ip
// protocols rules criteria when performing dst lookups", and stable
// kernels that took it); on older kernels it leaves by the main table.
// This package's tests cannot show that case: these kernels have no ESP
// transform, so the daemons in iketcp's lab use userspace ESP
// (strongSwan's kernel-libipsec), whose ESP leaves through its UDP 4500
// socket. integration's TestInteropTransparentKernelESP shows it in a
// User-Mode Linux guest running Debian's 6.1.192, which has the fix.
//
// Linux only: elsewhere Open returns an error that matches
// nat.ErrNeedsLinux.
package intercept
