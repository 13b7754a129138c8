// Package faketcp owns fake-TCP mode's endpoints: a userspace TCP stack,
// in the manner of phantun, that carries each datagram (IKE with its
// 4-byte zero non-ESP marker, or raw ESP) in a TCP segment of its own,
// over an IP packet device (a tun.Device): a TUN device in production,
// the in-memory pipe of nat/tun/tuntest in tests. No kernel TCP stream
// owns these segments, so nothing retransmits, orders or throttles them,
// and a lost segment costs what a lost UDP datagram costs: there is no
// TCP-in-TCP meltdown.
//
// To anything between the peers the segments look like one healthy TCP
// connection: a three-way handshake with plausible options, then
// sequence numbers that advance by each payload's length and acks that
// follow the peer's, a constant window, keepalives when idle, a FIN or an
// RST at the end. That is what FortiOS's fortinet-esp lacks: its ESP
// segments all carry one sequence number, which middleboxes with
// anti-replay checks drop. SeqFrozen reproduces that, for
// interoperability tests and demonstrations.
//
// What the stack does not do: retransmission, congestion or flow control,
// reassembly, urgent data, SACK blocks. One datagram is one segment, and
// one segment is one datagram: the handler gets each payload as it came.
//
// Choices a real stack would make differently, and why:
//
//   - Acks. The ack is the highest seq+len seen from the peer and never
//     goes back; a gap (a lost segment) is acknowledged past at once,
//     since it will never be filled. Data carries the ack; a receiver
//     that sends nothing acknowledges within 200 ms (Linux's delayed-ACK
//     ceiling), and at once after a quarter window of data, so that a
//     stateful middlebox never sees a sender run past the advertised
//     window. Pure ACKs and keepalives do not advance seq.
//   - Keepalive. After KeepAlive with nothing heard, a conn sends what
//     Linux sends: a segment with no data, ACK, and seq one before the
//     next, which any TCP answers with an ACK (it is old). It repeats
//     every KeepAlive while nothing is heard; after 4*KeepAlive of
//     silence the conn sends an RST and ends with ErrTimeout, as Linux
//     does when its keepalive gives up. A zero-byte probe never puts a
//     byte into the peer's stream, and one that carried a byte would be
//     a datagram to this package. The accepting side waits 1.5*KeepAlive
//     before its first probe, so that on an idle conn the dialling side
//     probes and the other answers (two segments per interval), as when
//     only a client enables keepalives, rather than both probing in step.
//   - Options. SYN and SYN-ACK carry MSS, window scale 7 and SACK
//     permitted, laid out as Windows lays them out; no timestamps. A
//     negotiated timestamp option must then ride on every segment (RFC
//     7323), 12 bytes each, which would not fit Headroom in front of an
//     IPv6 payload. Windows does not negotiate timestamps either, so the
//     handshake stays an ordinary one.
//   - RSTs. A segment for no conn is answered with an RST (RFC 9293
//     §3.10.7.1), as a real stack does: a peer that kept its conn across
//     this side's restart learns at its next segment, ends it with
//     ErrReset, and dials again. An RST ends a conn when its seq is
//     within the window of the expected one; a SYN inside a live conn
//     gets a challenge ACK (RFC 5961 §4), which a restarted peer answers
//     with an RST. Stack.Close and Conn.Close send FINs.
//   - Closing. Close sends a FIN and ends the conn for its user at once;
//     the 4-tuple lingers for two seconds to acknowledge the peer's FIN.
//     A FIN from the peer is answered with FIN|ACK and ends the conn with
//     ErrPeerClosed.
//
// GRO: with the TUN device and forwarding that production uses, the
// kernel segments a GRO'd run again before it enters the TUN, so each
// read is one segment as it was sent. A segment larger than the MSS this
// side advertised would be such a run that was not split, or a peer that
// ignores the MSS: it is dropped and counted (ConnStats.DroppedOversize)
// rather than handed on as one datagram; its sequence space is still
// acknowledged. Send likewise refuses datagrams larger than the peer's
// MSS.
//
// A Stack serves one address (Config.Local) of one family, IPv4 or IPv6,
// verifies every IPv4 header checksum and TCP checksum it receives, and
// computes both on what it sends. Send builds headers in place in front
// of the caller's payloads, and neither sending nor receiving allocates
// in steady state.
//
// Goroutines: a Stack runs a reader (which also runs the handlers) and a
// timer (handshake retries, keepalives, delayed ACKs, lingers); Close ends
// both. Each conn's state machine (tcb) is pure and told the time, so its
// tests drive it with explicit times.
package faketcp
