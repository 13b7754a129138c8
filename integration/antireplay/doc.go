// Package antireplay owns iketcp's strict anti-replay middlebox: a TCP
// sequence checker that behaves like a stateful firewall with anti-replay
// set to strict (a FortiGate's "set anti-replay strict"), and the
// NFQUEUE plumbing that puts it in a Linux forwarding path.
//
// It exists to show, in iketcp's carrier-NAT lab, why ESP must not ride in
// TCP segments that repeat a sequence number: FortiOS's proprietary
// ESP-over-TCP mode sends every ESP packet in a TCP ACK segment with the
// same sequence number, and a box that checks sequence numbers drops all
// but the first. iketcp's fake-TCP mode keeps sequence numbers live and
// must pass. It is the lab's, not the product's: only integration/lab,
// the integration tests and cmd/iketcp-lab use it.
//
// The package has two layers:
//
//   - [Tracker] is pure: it takes an IP packet and a time and answers
//     accept or drop, keeping per-flow state (both directions of a TCP
//     session, each on its own) in a bounded table with idle expiry, and
//     counts its verdicts by reason. It does no I/O.
//   - [Queue] and [Run] (Linux only) bind an nfnetlink_queue queue with a
//     netlink socket of the calling thread's network namespace, hand every
//     queued packet to a Tracker and send the verdict back. The protocol is
//     implemented here on top of github.com/mdlayher/netlink; the kernel
//     needs CONFIG_NETFILTER_NETLINK_QUEUE, and packets reach the queue
//     through the xtables NFQUEUE target, e.g.
//     `iptables-legacy -A FORWARD -p tcp -j NFQUEUE --queue-num 7`.
//
// [Segment] builds IPv4 and IPv6 TCP segments by hand, for tests and tools
// that replay or forge segments at the middlebox.
package antireplay
