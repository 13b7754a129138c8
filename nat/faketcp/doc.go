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
// What the stack does not do: retransmission, congestion control,
// reassembly, urgent data, SACK blocks. One datagram is one segment, and
// one segment is one datagram: the handler gets each payload as it came.
// Flow control only as far as middleboxes enforce it: data never runs
// past the window the peer advertised (its ack plus its window), since
// every stateful middlebox drops what does, the host's own conntrack
// first; Send drops what would, as a full link drops a datagram, and
// counts it (ConnStats.DroppedWindow).
//
// Choices a real stack would make differently, and why:
//
//   - Handshake: SYN cookies, always, where Linux sends them only when
//     its SYN queue overflows. A listener faces strangers, so it keeps
//     nothing for a SYN: it answers with one SYN-ACK whose ISN is a
//     cookie, made of 25 bits of MAC (HMAC-SHA256, with a key the stack
//     draws at start, over the 4-tuple, the SYN's ISN, a 64-second time
//     slot and the bits that follow), the slot's parity, and the SYN's
//     options that matter: its MSS, rounded down to one of 16 values,
//     whether it offered window scaling, and SACK (cookie.go has the
//     layout). The conn is made, established, when a segment returns the
//     cookie: ack = cookie+1, seq = the SYN's ISN+1, the MAC right, in
//     the cookie's slot or the next (a cookie is good for 64 to 128 s).
//     That is the handshake's ACK or, when it was lost, the peer's first
//     data segment, which is delivered. The SYN-ACK is never sent again:
//     a peer whose SYN-ACK was lost sends its SYN again, and each SYN
//     gets one answer. So toward an address that has not completed a
//     handshake the stack never sends more than it received: one SYN-ACK
//     for a SYN, one RST for anything else, nothing for an RST. A spoofed
//     SYN costs one SYN-ACK and no memory, no SYN flood fills the conn
//     table or keeps the timer busy, and a real client connects through
//     one with its first SYN. The costs: the peer's MSS comes back
//     rounded down; a peer whose handshake ACK and first data segment
//     were both lost (its later segments have moved on from the SYN's
//     ISN), or that sends only a keepalive first, gets an RST, ends with
//     ErrReset, and dials again; and a late copy of the segment that
//     opened a conn, arriving after this side forgot the conn (after an
//     RST, a timeout, or Close and its linger) while the cookie is good,
//     opens it again rather than drawing an RST. A conn that a cookie
//     opened has shown the peer only its SYN-ACK's window, which is never
//     scaled, so its first data is acknowledged at once, to show the
//     scaled one (the dialling side's handshake ACK shows its own).
//   - SeqFrozen and cookies: the same handshake. Every segment of a
//     frozen peer carries the handshake's seq and ack, so any of them
//     returns the cookie: a lost handshake ACK does no harm, and any
//     segment for a conn this side forgot opens it again until the
//     cookie expires.
//   - Acks. The ack is the highest seq+len seen from the peer and never
//     goes back; a gap (a lost segment) is acknowledged past at once,
//     since it will never be filled. Data carries the ack; a receiver
//     that sends nothing acknowledges within 200 ms (Linux's delayed-ACK
//     ceiling), and at once after a quarter window of data, so that a
//     sender, which holds to the window it was shown (see above), finds
//     it moved on long before it reaches its end. Pure ACKs and
//     keepalives do not advance seq.
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
//     this side's restart learns at its next segment (the new stack's
//     key does not know its cookie), ends it with ErrReset, and dials
//     again. So is a segment to a listener that returns no valid cookie:
//     forged, for another 4-tuple or SYN, off by one, or stale; an RST
//     for no conn is ignored. An RST ends a conn when its seq is within
//     the window of the expected one; a SYN inside a live conn gets a
//     challenge ACK (RFC 5961 §4), which a restarted peer answers with an
//     RST. Stack.Close and Conn.Close send FINs.
//   - Closing. Close sends a FIN and ends the conn for its user at once;
//     the 4-tuple lingers for two seconds to acknowledge the peer's FIN.
//     A FIN from the peer is answered with FIN|ACK and ends the conn with
//     ErrPeerClosed.
//
// Segmentation offload. On a device that hands TCP segmentation and
// checksums to the kernel (a tun.OffloadDevice whose Offload is nil, as
// production's TUN device is where the kernel takes the offloads), many
// segments move in one packet, a super-segment, and one system call:
//
//   - Out (TSO): Send writes each run of datagrams of one size (the last
//     may be shorter, at most 64 and one IP packet's worth) as one
//     super-segment: the headers of its first segment, built in front of
//     the first datagram, the datagrams where they lie, and a virtio-net
//     header that tells the kernel to cut it every so many bytes, the
//     datagrams' size. The kernel cuts it into exactly the segments Send
//     would have written, one datagram each, sequence numbers and IPv4
//     IDs counting on, and finishes their checksums; only the last of a
//     run keeps PSH, as from any TCP that segments. A datagram boundary
//     is always a segment boundary: runs never mix sizes, so a receiver
//     still sees one datagram per segment. SeqFrozen never uses it (the
//     kernel would number the segments).
//   - In (GRO): the kernel may hand the reader super-segments whole: a
//     peer's TSO run that crossed the host's forwarding in one piece, or
//     segments that GRO merged, which it merges only while they are of one
//     size. The reader takes each apart where it lies, at the GSO size the
//     header gives, with each segment's own sequence number and flags, and
//     runs the segments through the state machine one by one, as if they
//     had come apart: the handler gets one datagram per segment, in
//     place, the segments one after the other in one buffer. A checksum
//     that the kernel left unfinished or verified is not verified again.
//
// Without offloads, the kernel segments a super-segment (a GRO'd run) on
// its way into the TUN, so each read is one segment as it was sent. A
// segment larger than the MSS this side advertised would be such a run
// that was not split, or a peer that ignores the MSS: it is dropped and
// counted (ConnStats.DroppedOversize) rather than handed on as one
// datagram; its sequence space is still acknowledged. Send likewise
// refuses datagrams larger than the peer's MSS.
//
// A Stack serves one address (Config.Local) of one family, IPv4 or IPv6,
// verifies every IPv4 header checksum and TCP checksum it receives, and
// computes both on what it sends. Send builds headers in place in front
// of the caller's payloads, and neither sending nor receiving allocates
// in steady state.
//
// Hand-over: a planned restart moves a stack's established conns to a
// stack in another process on the same device, with no RST and no
// reconnect (Stack.Pause, Conn.Detach, ResumeStack: handover.go has
// how); only an unplanned restart makes peers dial again.
//
// Goroutines: a Stack runs a reader (which also runs the handlers and
// owns the cookies) and a timer (Dial's SYN retries, keepalives, delayed
// ACKs, lingers); Pause stops both for a hand-over, Close ends both. Each conn's state machine (tcb) is pure and told the time, so its
// tests drive it with explicit times.
package faketcp
