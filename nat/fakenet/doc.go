// Package fakenet owns fake-TCP mode's network plumbing: the TUN device
// between the userspace TCP endpoint (nat/faketcp) and the kernel, the
// nftables table that NATs the endpoint's connections, the forwarding it
// needs, and the clean-up of all of it, after Close or after a crash
// (Cleanup). A *Net is a tun.Device: Read returns what the kernel routes
// to the endpoint, Write hands the endpoint's packets to the kernel.
//
// Fake-TCP mode carries each datagram in a TCP-shaped segment that a
// userspace TCP endpoint builds; Setup connects that endpoint to the
// network without the kernel's TCP ever seeing its segments. The endpoint
// sits behind a TUN device with a /30 of its own (the kernel's side has
// the first address, the endpoint the second, as the device's
// point-to-point peer). What the endpoint writes into the device, with
// its own address as the source, arrives at the kernel as if from a host
// behind the device; the destination is not local, so the kernel forwards
// it, and no local socket is involved: the kernel has no connection of
// its own to answer with a RST. A client's connections leave masqueraded
// as the host's; connections to a server's port on the host's own
// addresses are DNATed to the endpoint. Replies come back through
// conntrack's reverse NAT, which rewrites them before routing, so they
// too are forwarded, into the device, and never meet the kernel's TCP.
//
// A client's connections from a block of source ports given in
// Config.Sources leave SNATed to that source's address instead (an
// aggregate member's uplink address; nat/faketcp's DialFrom dials from a
// block). They choose their source address, not their path: the kernel
// routes what the endpoint writes by its destination before the NAT
// rewrites its source, so policy rules that select by source address do
// not see it, unlike the packets of a socket bound to that address (an
// RFC 9329 member's). Members that must leave by different uplinks reach
// the hub at destinations routed by those uplinks.
//
// What follows for the endpoint's TCP stack:
//
//   - Conntrack follows the connection as TCP, windows and all (unless
//     net.netfilter.nf_conntrack_tcp_be_liberal is 1). A segment far
//     outside the window it saw announced is invalid: conntrack lets go of
//     it, so it is not NATed. From the endpoint it would leave with the
//     endpoint's address (and a server's conntrack would even pick it up
//     as a new connection and DNAT it); the table drops it instead, so it
//     is lost. From the peer it reaches the host's own address un-NATed,
//     and the kernel's TCP, with no socket there, answers with a RST,
//     which the other side's conntrack accepts and NATs to its endpoint.
//     So the stack keeps sequence and acknowledgement numbers consistent,
//     acknowledges what it receives, and announces a window (with window
//     scaling on the SYN) that covers what the peer sends.
//   - The device's MTU is 65535, not the path's. Nothing comes into the
//     device bigger than that, so the kernel never fragments on its way
//     in (as it would at 1500 with a packet from a jumbo-frame link or one
//     that conntrack reassembled to NAT it) and never tells the far end
//     "fragmentation needed" for the device. What the endpoint writes is
//     forwarded as it is: bigger than the outgoing device's MTU, the
//     kernel drops it and writes an ICMP "fragmentation needed" (IPv4 with
//     DF) or "packet too big" (IPv6) back into the device, from the
//     kernel's side of it. The stack picks its MSS from the real path.
//   - GRO and TSO: the TUN device hands TCP segmentation and checksums
//     to the kernel (tun.OffloadDevice; Config.NoOffload, or a kernel that
//     refuses, turns that off, which Setup logs). A super-packet of many
//     segments that reaches the host (merged by GRO, or sent whole over a
//     veth pair, by a peer's TSO among others) is forwarded as one and
//     enters the device whole: ReadOffload hands it out as it is, Read as
//     its segments, with correct checksums. What the endpoint writes with
//     WriteOffload may be such a super-packet too: the kernel forwards it
//     as one and cuts it into its segments wherever something on the way
//     needs them (a device without TSO, an NFQUEUE, the wire), as it does
//     its own TCP's. Without offloads the kernel cuts a super-packet on its
//     way into the device, and each Read and Write is one segment.
//   - Read returns what the kernel routes to the endpoint: its TCP
//     segments, and ICMP errors about them. With an IPv6 subnet the table
//     drops the MLD reports that the device's multicast memberships would
//     send into it.
//   - The masquerade keeps a client's source port unless it collides with
//     another connection conntrack knows; the server sees the mapped one.
//     Conntrack forgets an idle established connection after
//     nf_conntrack_tcp_timeout_established (5 days by default).
//
// What Setup changes outside its device and table: forwarding
// (net.ipv4.ip_forward, and net.ipv6.conf.all.forwarding with an IPv6
// subnet), which makes the host a router for anything it receives for
// others, and, for IPv6, stops it from taking router advertisements on
// devices whose accept_ra is not 2. The table records the values it found,
// each device's too (writing the global switch sets every device's);
// Close (or Cleanup after a crash) restores them once no other
// fake-TCP instance runs in the namespace. The table's forward chain
// accepts the endpoint's traffic, but nftables drops a packet that any
// base chain drops: another table's drop policy, or iptables' FORWARD
// chain (Docker sets its policy to DROP), must let the device's traffic
// through.
//
// A planned restart or upgrade hands all of it to the process that
// replaces this one, removing and re-adding nothing: File gives a
// duplicate of the device's descriptor for the new process to Adopt, and
// Release lets go here without removing anything (adopt_linux.go).
//
// Linux only: elsewhere Setup and Adopt return an error that matches
// nat.ErrNeedsLinux.
package fakenet
