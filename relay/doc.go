// Package relay moves datagrams between IKE daemons' UDP sockets and
// RFC 9329 TCP streams. It owns the two ends of an iketcp pair:
//
//   - Client, beside the IKE daemon that initiates: it reads the daemon's
//     datagrams from a local UDP socket, opens one TCP connection per local
//     flow, and keeps reconnecting with backoff (and the IKETCP prefix)
//     when the connection drops, so the daemon's SAs survive.
//   - Server, beside the gateway's IKE daemon: it accepts TCP, checks the
//     prefix, and relays each session's traffic to the backend daemon from a
//     UDP socket of the session's own. Sessions are found by IKE and ESP
//     SPIs, so a client that reconnects from a new address and port lands on
//     its old session and the gateway never sees its peer move.
//
// Packet formats come from package framing; socket batching from
// relay/udpbatch. Both sides count what they drop and why (Counters) and
// describe themselves through Status, which the control socket serves.
//
// Hot path: a datagram is read into a buffer with framing.Headroom in
// front, its Length is written in place, and frames leave in one writev per
// batch; the way back deframes in place from large reads and sends a batch
// of datagrams with one sendmmsg. Nothing on that path allocates.
package relay
