// Package realaddr owns real-address mode, an opt-in of the server: each
// session's UDP socket toward the gateway's IKE daemon carries the
// client's real address (the one the server saw, or the one the PROXY
// protocol gave) as its source, at a port of its own, instead of
// 127.0.0.1 — as HAProxy's "usesrc clientip" or Envoy's original source
// do. It owns the routing that brings the daemon's answers back to those
// sockets, and the clean-up of it, after Close or after a crash (Cleanup).
//
// # When to use it
//
// When the daemon's view of its peers matters: its per-address
// protections (strongSwan's limit of half-open IKE SAs per peer address,
// charon.block_threshold, 5 by default, which counts every client together
// while all sessions come from 127.0.0.1), remote_addrs in its
// connections, and its logs all see the clients' addresses. Clients
// behind one carrier-grade NAT share an address, as they would reaching
// the daemon over UDP, and each session still keeps its own port, so the
// daemon tells their IKE SAs apart.
//
// # How it works
//
// Dial opens a transparent socket (IP_TRANSPARENT or IPV6_TRANSPARENT),
// bound to the client's address and a port the kernel picks, connected to
// the backend. Its datagrams reach the daemon through lo, from
// client:port. The daemon answers client:port; the kernel routes the
// answer by the main table first, toward the client, and then, in the
// output hook, the table's route chain marks it, because its destination
// and source are a session socket's element in the table's sets, and the
// kernel routes it again: the policy rule sends the mark to Table, whose
// local default route delivers it, through lo, to the socket. Nothing of
// it leaves the host. The table, rules and routes, as Setup installs
// them:
//
//	ip rule:      99: from all fwmark 0x4501 lookup 4501          (and ip -6 rule)
//	ip route:     local default dev lo table 4501 scope host      (and ip -6 route)
//	nftables:     table inet iketcp_realaddr, whose chain output
//	              (type route hook output priority mangle) marks
//	              ip daddr . udp dport . ip saddr . udp sport @sessions4 (and ip6, @sessions6)
//
// The sessions' sockets carry the mark too (SO_MARK), so that should the
// backend's address leave the host, their datagrams are delivered locally
// rather than sent on the wire with a client's address.
//
// # What it needs
//
//   - Linux, with nf_tables: route chains and concatenated sets (any kernel
//     of the last years). Elsewhere Setup returns an error that matches
//     nat.ErrNeedsLinux.
//   - CAP_NET_ADMIN, for Setup, Close and Cleanup, and for as long as
//     sessions come and go: each Dial and each release changes a set.
//     Without it the errors wrap nat.ErrNeedsNetAdmin. (The sockets' own
//     options, IP_TRANSPARENT and SO_MARK, need CAP_NET_ADMIN or
//     CAP_NET_RAW.)
//   - The IKE daemon on this host, and the backend given as one of the
//     host's own addresses that is not a loopback address; Dial refuses
//     others. From a loopback address the daemon cannot answer a client's
//     address: for IPv4 the kernel refuses to route a 127.0.0.0/8 source
//     off the host (the daemon's send fails with EINVAL) before the output
//     hook could mark it, unless net.ipv4.conf.*.route_localnet lets such
//     packets on the wire; IPv6 routes a ::1 source, and would send it on
//     the wire whenever no session's element catches it. So let the
//     daemon listen on the host's addresses (or on all of them, 0.0.0.0
//     and ::) and give one of them as the backend.
//   - The daemon must answer from the address it was reached at (the
//     backend), as strongSwan and libreswan do; an answer from another of
//     the host's addresses is no session's and leaves the host.
//   - A route that covers the clients' addresses, usually the default
//     route: the daemon's answers are routed once before they are marked,
//     and without a route its sends fail ("network is unreachable").
//   - A firewall that lets lo carry traffic from and to addresses that are
//     not local (an "iif lo accept" rule does), on input and output.
//   - IPv6 clients need IPv6 on lo when Setup runs; otherwise the mode
//     serves IPv4 clients only and says so (IPv6).
//
// # What it costs
//
//   - Per session, a route lookup and an nftables transaction when Dial
//     opens it and another when it is released: one netlink round trip
//     each, serialized within the Net.
//   - Per packet: the output chain sees every packet the host sends and
//     looks UDP up in a hash set; the daemon's answers to sessions are
//     routed twice.
//   - Ports: the sessions of one client address share the host's
//     ephemeral ports for that address (net.ipv4.ip_local_port_range,
//     28232 by default). A UDP client that reaches the daemon directly,
//     from the same address and by chance the same port as a session,
//     would be taken by the daemon for that session, and its answers
//     caught: the price of sharing the clients' address space.
//   - After a session's socket is released, what the daemon still sends
//     for it (retransmissions, liveness checks) leaves the host toward the
//     client's address, as it would toward a UDP client whose NAT mapping
//     expired; without this mode it went to 127.0.0.1 and was refused.
//   - UDP-encapsulated ESP that the kernel's XFRM writes for the daemon
//     passes the same output hook and is expected to be caught alike;
//     these tests cover datagrams from sockets only (their kernels have no
//     ESP transform).
//
// # Clean-up
//
// Close closes the sockets not yet released and removes the table, the
// rules and the routes; the host is then as it was. Table belongs to
// iketcp: Setup first runs Cleanup, which removes the table of the same
// Name, every rule that leads to Table and every route in it, whoever
// left them. Other tables, rules and routes are left alone; Setup refuses
// to start if another policy rule selects Mark.
//
// A planned restart or upgrade of the server hands the mode over without
// removing anything: the old server hands the sessions' sockets to the
// new one, which adopts the running rules, routes and table (Adopt, which
// installs only what is missing, where Setup would remove all of it as
// stale) and each socket with its element (AdoptSocket); the old one then
// lets go without removing anything (Release). The daemon's answers to
// the sessions are caught all along.
package realaddr
