// Package lab builds a carrier-NAT test network out of Linux network
// namespaces and runs real strongSwan charon daemons inside it.
//
// The package owns everything it creates: three namespaces (site, carrier,
// hub) joined by veth pairs, the carrier's nftables table that masquerades
// site traffic and can drop forwarded UDP, the charon, tcpdump and other
// processes started in those namespaces, and the configuration and log files
// they use. [Lab.Close] stops every process by PID, deletes the namespaces
// and removes the files.
//
// The topology built by [New]:
//
//	site netns                    carrier netns                        hub netns
//	lo 198.51.100.1/32            ip_forward=1, nft masquerade          lo 192.0.2.1/32
//	s0 100.64.0.2/24 ---- c-site 100.64.0.1 | c-hub 203.0.113.1 ---- h0 203.0.113.2/24
//
// The site routes 203.0.113.0/24 via the carrier; the hub has no route back
// to 100.64.0.0/24 and only ever sees the carrier's address 203.0.113.1.
// No namespace gets a default route, and only documentation ranges and
// 100.64.0.0/10 are used.
//
// The kernels this runs on have XFRM but no ESP transform, so charon uses
// the kernel-libipsec plugin (userspace ESP over a TUN device), which only
// supports UDP-encapsulated ESP: every connection is configured with
// encap = yes.
//
// The carrier can be made harder to cross: [Lab.BlockUDP] drops every
// forwarded UDP packet; [Lab.StartStrictMiddlebox] checks TCP sequence
// numbers the way an anti-replay NAT box does (package
// integration/antireplay, on NFQUEUE); [Lab.LimitRate] makes it a
// rate-limited bottleneck toward the hub; [Lab.PortChangingNAT] gives each
// flow a random source port, as carrier-grade NAT does. The [Profiles]
// name these combinations for users (`iketcp-lab up --profile`) and
// tests ([Lab.SetProfile]): open, block-udp, cgnat, strict-tcp, slow.
// Faults live in a table of their
// own ([FaultTable]), so the carrier's rules stay as they are:
// [Lab.Blackout] drops everything, [Lab.RebindNAT] makes its NAT forget
// and remap every TCP connection, [Lab.ResetOnce] answers every
// connection's next segment with a RST. A [Stream] of numbered datagrams
// through the tunnel measures what a fault costs. TunnelOptions.Direct
// runs the tunnel over plain UDP without iketcp, as a baseline, and
// TunnelOptions.ServerAs and ClientAs run iketcp under setpriv as an
// ordinary user with chosen capabilities ([Privileges]).
//
// A tunnel ([Lab.StartTunnel]) runs one connection between the charons,
// or several (TunnelOptions.Connections), each its own IKE SA with inner
// addresses of its own. What crosses the carrier can be read as a
// stranger on the path would: [ClientStream] and [SplitRFC9329] take the
// client's RFC 9329 stream apart from a capture, and a [RawPeer] sends
// frames of its own to the server from any namespace.
//
// The server's front door meets third parties, which the lab runs in its
// namespaces from Debian's packages, each with a configuration, pid file
// and logs of its own in the lab directory, stopped by PID on Close (never
// the packages' system services): HAProxy in front of the server
// ([Namespace.StartHAProxy], with a PROXY v2 header), nginx behind it
// ([Namespace.StartNginx], a site sharing its port) and tinyproxy on the
// carrier ([Namespace.StartTinyproxy], with [Lab.BlockTCPToHub] closing
// the direct way). [NewCA] makes the certificates, [Lab.StartIketcp] runs
// more iketcp instances beside the tunnel's (a client with other flags,
// nudged to dial by an [IKESAInitDatagram]), and [TCPStreams] with
// [SplitTLSRecords] reads a capture's TLS as the carrier sees it.
//
// The package needs root and the tools listed by [MissingTools]. It works
// without the testing package (everything takes a context and returns
// errors); [Require] and [NewForTest] are small helpers for tests.
package lab
