// Package relay is the shared vocabulary of iketcp's relays: what both
// roles and every kind of link agree on, and nothing role- or wire-
// specific.
//
//   - Link, the one connection abstraction (an RFC 9329 stream in
//     relay/streamlink, a fake-TCP conn in relay/fakelink), with the
//     Receiver it hands what it receives to, and the Dialer and Listener
//     that open links for a client and accept them for a server;
//   - Headroom, the room every datagram keeps in front of it so that
//     links and the way to the daemon write their headers in place;
//   - Counters, Traffic, SABook and Status: what a relay counts and how
//     it describes itself to `iketcp status`;
//   - Sometimes, the rate limit on every log line a remote party can
//     trigger; ReadUDP and WriteUDP, the error policy of a relay's UDP
//     loops; and the small helpers of a relay's lifecycle.
//
// The data path, top to bottom:
//
//	IKE daemon ─UDP/TUN─▶ relay/client ─Link.Send─▶ relay/streamlink or relay/fakelink
//	   ─wire─▶ Link.Serve ─Receiver─▶ relay/server ─UDP─▶ IKE daemon
//
// and back the same way. No package calls back into a higher one: a link
// is handed a Receiver; the roles are handed links.
//
// Hot path: a datagram is read into a buffer with Headroom in front, its
// link's header is written in place, and frames leave in one writev (or
// one batch of segments) per burst; the way back deframes in place from
// large reads and sends a batch of datagrams with one sendmmsg. Nothing on
// that path allocates.
package relay
