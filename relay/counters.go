package relay

import (
	"sync/atomic"

	"github.com/iketcp/iketcp/relay/sendq"
)

// Counters are the events a relay counts. Each field says which role
// counts it; Snapshot lists the role's own. Names in a snapshot are
// stable: scripts and dashboards read them.
//
// "In" and "out" are seen from the relay's far side: in is what came from
// the far end (over whichever path) and went to the local daemon, out is
// what went from the local daemon toward the far end.
type Counters struct {
	ConnsAccepted     atomic.Uint64 // server: links accepted
	ConnsRejected     atomic.Uint64 // server: refused over a connection limit
	ConnsEvicted      atomic.Uint64 // server: closed for a newer one, carrying no confirmed session
	UnconfirmedCloses atomic.Uint64 // server: closed after --confirm-timeout without a confirmed session
	ConnsDialed       atomic.Uint64 // client: links established
	DialFailures      atomic.Uint64 // client: connection attempts that failed
	LinksDead         atomic.Uint64 // client: links closed because they heard nothing for the liveness timeout
	PingsAnswered     atomic.Uint64 // server: an iketcp client's liveness pings answered
	ProxyRefused      atomic.Uint64 // server: a PROXY header from an untrusted source, or none from a trusted one
	TLSFailures       atomic.Uint64 // TLS handshakes that failed
	SharedConns       atomic.Uint64 // server: connections handed to --share-backend
	Unrecognized      atomic.Uint64 // server: connections that began with nothing the front door takes: neither IKETCP nor TLS for iketcp, nor TLS or HTTP for --share-backend
	ClearRefused      atomic.Uint64 // server: IKETCP in clear, refused because TLS is required
	IdentityRefused   atomic.Uint64 // server: frames of a session from a connection with another TLS identity (not moved)
	PrefixTimeouts    atomic.Uint64 // server: no IKETCP prefix within the deadline
	BadPrefix         atomic.Uint64 // server: a stream that began with something else
	BadLength         atomic.Uint64 // frame Length 0 or 1 (connection closed)
	TruncatedFrames   atomic.Uint64 // a stream ended inside a frame (discarded)
	OversizedFrames   atomic.Uint64 // frames over --max-datagram (skipped)
	OversizedDgrams   atomic.Uint64 // datagrams over --max-datagram (dropped)
	Malformed         atomic.Uint64 // datagrams that are neither IKE, ESP nor a keepalive
	UnknownSPI        atomic.Uint64 // server: ESP for no known session (dropped)
	GarbageCloses     atomic.Uint64 // server: connections closed for sustained garbage
	StrayFrames       atomic.Uint64 // server: frames of a session from a connection that does not carry it (delivered; replies stay put)
	LearnRefused      atomic.Uint64 // server: new SPIs a session may not learn (too fast, or from a connection that does not carry it)
	ClaimsAccepted    atomic.Uint64 // server: sessions an iketcp client proved it owns
	ClaimsRefused     atomic.Uint64 // server: claims and moves that proved nothing
	SPIMoves          atomic.Uint64 // server: ESP SPIs an iketcp client moved to the session they belong to
	MembersJoined     atomic.Uint64 // links that joined an aggregate (server: accepted; client: the server's word)
	JoinsRefused      atomic.Uint64 // joins that proved nothing (server), or that the server refused (client)
	MembersDown       atomic.Uint64 // times a member left its aggregate's rotation: its probes went unanswered
	ObservesAnswered  atomic.Uint64 // server: `iketcp probe` told the address it came from
	ObservesRefused   atomic.Uint64 // server: probes not answered, over the server's rate of answers
	KeepalivesDropped atomic.Uint64 // NAT keepalives not carried over TCP (RFC 9329 6.6)
	NoPath            atomic.Uint64 // datagrams for a session or flow with no link (dropped)
	QueueFull         atomic.Uint64 // datagrams refused by a link's full queue (ESP over --queue-bytes)
	QueueLate         atomic.Uint64 // ESP dropped at the head of a link's queue: it waited longer than --queue-delay
	Foreign           atomic.Uint64 // client, transparent mode: intercepted packets for no configured peer
	Port500Refused    atomic.Uint64 // client, explicit mode: IKE from the daemon's port 500 (needs local_port = 4500)
	SessionsCreated   atomic.Uint64 // server
	SessionsRestored  atomic.Uint64 // server: rebuilt from --state at start
	StateWrites       atomic.Uint64 // server: the session table written to --state
	SessionsExpired   atomic.Uint64 // server: the client did not come back
	SessionsRejected  atomic.Uint64 // server: over a session or half-open limit
	HalfOpenExpired   atomic.Uint64 // server: IKE_SA_INIT never answered by the backend
	FlowsCreated      atomic.Uint64 // client
	FlowsExpired      atomic.Uint64 // client: the daemon went quiet
	FlowsRejected     atomic.Uint64 // client: over the flow limit
	Rebinds           atomic.Uint64 // server: sessions that moved to another connection
	PacketsIn         atomic.Uint64 // datagrams from the far end relayed to the daemon
	BytesIn           atomic.Uint64
	PacketsOut        atomic.Uint64 // datagrams from the daemon relayed to the far end
	BytesOut          atomic.Uint64
	// Of PacketsIn and PacketsOut, by kind: IKE messages, ESP, and NAT
	// keepalives (the UDP path's; over TCP they are not carried).
	IKEIn, IKEOut               atomic.Uint64
	ESPIn, ESPOut               atomic.Uint64
	KeepalivesIn, KeepalivesOut atomic.Uint64
	WriteErrors                 atomic.Uint64 // failed or timed-out writes
	Fallbacks                   atomic.Uint64 // client: flows whose transport went from UDP to TCP

	// QueueDelay is how long the datagrams that had to wait in a link's
	// queue waited, by sendq.Lane: ESP (sendq.Bulk) and IKE
	// (sendq.Priority). Datagrams the socket took at once are not in it.
	QueueDelay [2]sendq.Histogram
}

// Counter is one named value of a snapshot.
type Counter struct {
	Name  string `json:"name"`
	Value uint64 `json:"value"`
}

// Roles, as Status and Snapshot name them.
const (
	RoleServer = "server"
	RoleClient = "client"
)

// counterDef names a counter and the roles that count it.
type counterDef struct {
	name           string
	server, client bool
	get            func(*Counters) *atomic.Uint64
}

var counterDefs = []counterDef{
	{"conns_accepted", true, false, func(c *Counters) *atomic.Uint64 { return &c.ConnsAccepted }},
	{"conns_rejected", true, false, func(c *Counters) *atomic.Uint64 { return &c.ConnsRejected }},
	{"conns_evicted", true, false, func(c *Counters) *atomic.Uint64 { return &c.ConnsEvicted }},
	{"unconfirmed_closes", true, false, func(c *Counters) *atomic.Uint64 { return &c.UnconfirmedCloses }},
	{"conns_dialed", false, true, func(c *Counters) *atomic.Uint64 { return &c.ConnsDialed }},
	{"dial_failures", false, true, func(c *Counters) *atomic.Uint64 { return &c.DialFailures }},
	{"links_dead", false, true, func(c *Counters) *atomic.Uint64 { return &c.LinksDead }},
	{"pings_answered", true, false, func(c *Counters) *atomic.Uint64 { return &c.PingsAnswered }},
	{"proxy_refused", true, false, func(c *Counters) *atomic.Uint64 { return &c.ProxyRefused }},
	{"tls_failures", true, true, func(c *Counters) *atomic.Uint64 { return &c.TLSFailures }},
	{"shared_conns", true, false, func(c *Counters) *atomic.Uint64 { return &c.SharedConns }},
	{"unrecognized", true, false, func(c *Counters) *atomic.Uint64 { return &c.Unrecognized }},
	{"clear_refused", true, false, func(c *Counters) *atomic.Uint64 { return &c.ClearRefused }},
	{"identity_refused", true, false, func(c *Counters) *atomic.Uint64 { return &c.IdentityRefused }},
	{"prefix_timeouts", true, false, func(c *Counters) *atomic.Uint64 { return &c.PrefixTimeouts }},
	{"bad_prefix", true, false, func(c *Counters) *atomic.Uint64 { return &c.BadPrefix }},
	{"bad_length", true, true, func(c *Counters) *atomic.Uint64 { return &c.BadLength }},
	{"truncated_frames", true, true, func(c *Counters) *atomic.Uint64 { return &c.TruncatedFrames }},
	{"oversized_frames", true, true, func(c *Counters) *atomic.Uint64 { return &c.OversizedFrames }},
	{"oversized_datagrams", true, true, func(c *Counters) *atomic.Uint64 { return &c.OversizedDgrams }},
	{"malformed", true, true, func(c *Counters) *atomic.Uint64 { return &c.Malformed }},
	{"unknown_spi", true, false, func(c *Counters) *atomic.Uint64 { return &c.UnknownSPI }},
	{"garbage_closes", true, false, func(c *Counters) *atomic.Uint64 { return &c.GarbageCloses }},
	{"stray_frames", true, false, func(c *Counters) *atomic.Uint64 { return &c.StrayFrames }},
	{"learn_refused", true, false, func(c *Counters) *atomic.Uint64 { return &c.LearnRefused }},
	{"claims_accepted", true, false, func(c *Counters) *atomic.Uint64 { return &c.ClaimsAccepted }},
	{"claims_refused", true, false, func(c *Counters) *atomic.Uint64 { return &c.ClaimsRefused }},
	{"spi_moves", true, false, func(c *Counters) *atomic.Uint64 { return &c.SPIMoves }},
	{"members_joined", true, true, func(c *Counters) *atomic.Uint64 { return &c.MembersJoined }},
	{"joins_refused", true, true, func(c *Counters) *atomic.Uint64 { return &c.JoinsRefused }},
	{"members_down", true, true, func(c *Counters) *atomic.Uint64 { return &c.MembersDown }},
	{"observes_answered", true, false, func(c *Counters) *atomic.Uint64 { return &c.ObservesAnswered }},
	{"observes_refused", true, false, func(c *Counters) *atomic.Uint64 { return &c.ObservesRefused }},
	{"keepalives_dropped", true, true, func(c *Counters) *atomic.Uint64 { return &c.KeepalivesDropped }},
	{"no_path", true, true, func(c *Counters) *atomic.Uint64 { return &c.NoPath }},
	{"queue_full", true, true, func(c *Counters) *atomic.Uint64 { return &c.QueueFull }},
	{"queue_late", true, true, func(c *Counters) *atomic.Uint64 { return &c.QueueLate }},
	{"foreign_packets", false, true, func(c *Counters) *atomic.Uint64 { return &c.Foreign }},
	{"port500_refused", false, true, func(c *Counters) *atomic.Uint64 { return &c.Port500Refused }},
	{"sessions_created", true, false, func(c *Counters) *atomic.Uint64 { return &c.SessionsCreated }},
	{"sessions_restored", true, false, func(c *Counters) *atomic.Uint64 { return &c.SessionsRestored }},
	{"state_writes", true, false, func(c *Counters) *atomic.Uint64 { return &c.StateWrites }},
	{"sessions_expired", true, false, func(c *Counters) *atomic.Uint64 { return &c.SessionsExpired }},
	{"sessions_rejected", true, false, func(c *Counters) *atomic.Uint64 { return &c.SessionsRejected }},
	{"half_open_expired", true, false, func(c *Counters) *atomic.Uint64 { return &c.HalfOpenExpired }},
	{"flows_created", false, true, func(c *Counters) *atomic.Uint64 { return &c.FlowsCreated }},
	{"flows_expired", false, true, func(c *Counters) *atomic.Uint64 { return &c.FlowsExpired }},
	{"flows_rejected", false, true, func(c *Counters) *atomic.Uint64 { return &c.FlowsRejected }},
	{"rebinds", true, false, func(c *Counters) *atomic.Uint64 { return &c.Rebinds }},
	{"packets_in", true, true, func(c *Counters) *atomic.Uint64 { return &c.PacketsIn }},
	{"bytes_in", true, true, func(c *Counters) *atomic.Uint64 { return &c.BytesIn }},
	{"packets_out", true, true, func(c *Counters) *atomic.Uint64 { return &c.PacketsOut }},
	{"bytes_out", true, true, func(c *Counters) *atomic.Uint64 { return &c.BytesOut }},
	{"ike_in", true, true, func(c *Counters) *atomic.Uint64 { return &c.IKEIn }},
	{"ike_out", true, true, func(c *Counters) *atomic.Uint64 { return &c.IKEOut }},
	{"esp_in", true, true, func(c *Counters) *atomic.Uint64 { return &c.ESPIn }},
	{"esp_out", true, true, func(c *Counters) *atomic.Uint64 { return &c.ESPOut }},
	{"keepalives_in", false, true, func(c *Counters) *atomic.Uint64 { return &c.KeepalivesIn }},
	{"keepalives_out", false, true, func(c *Counters) *atomic.Uint64 { return &c.KeepalivesOut }},
	{"write_errors", true, true, func(c *Counters) *atomic.Uint64 { return &c.WriteErrors }},
	{"transport_fallbacks", false, true, func(c *Counters) *atomic.Uint64 { return &c.Fallbacks }},
}

// Snapshot returns the counters of role (RoleServer or RoleClient) with
// their stable names, in a fixed order.
func (c *Counters) Snapshot(role string) []Counter {
	out := make([]Counter, 0, len(counterDefs))
	for _, d := range counterDefs {
		if role == RoleServer && d.server || role == RoleClient && d.client {
			out = append(out, Counter{d.name, d.get(c).Load()})
		}
	}
	return out
}

// Traffic counts one session's or flow's datagrams, in and out as
// Counters counts them.
type Traffic struct {
	packetsIn, bytesIn   atomic.Uint64
	packetsOut, bytesOut atomic.Uint64
}

// Kinds tallies the IKE messages and NAT keepalives among datagrams in
// port-4500 form; the others are ESP.
type Kinds struct{ IKE, Keepalive int }

// Note tallies p.
func (k *Kinds) Note(p []byte) {
	switch {
	case len(p) == 1 && p[0] == 0xff:
		k.Keepalive++
	case len(p) >= 4 && p[0]|p[1]|p[2]|p[3] == 0:
		k.IKE++
	}
}

// CountIn counts n datagrams of b bytes in all, from the far end to the
// daemon, in t and in c; k says which of them were IKE or keepalives.
func (t *Traffic) CountIn(c *Counters, n int, b uint64, k Kinds) {
	t.packetsIn.Add(uint64(n))
	t.bytesIn.Add(b)
	c.PacketsIn.Add(uint64(n))
	c.BytesIn.Add(b)
	if k.IKE > 0 {
		c.IKEIn.Add(uint64(k.IKE))
	}
	if k.Keepalive > 0 {
		c.KeepalivesIn.Add(uint64(k.Keepalive))
	}
	if esp := n - k.IKE - k.Keepalive; esp > 0 {
		c.ESPIn.Add(uint64(esp))
	}
}

// CountOut counts n datagrams of b bytes in all, from the daemon to the
// far end, in t and in c; k says which of them were IKE or keepalives.
func (t *Traffic) CountOut(c *Counters, n int, b uint64, k Kinds) {
	t.packetsOut.Add(uint64(n))
	t.bytesOut.Add(b)
	c.PacketsOut.Add(uint64(n))
	c.BytesOut.Add(b)
	if k.IKE > 0 {
		c.IKEOut.Add(uint64(k.IKE))
	}
	if k.Keepalive > 0 {
		c.KeepalivesOut.Add(uint64(k.Keepalive))
	}
	if esp := n - k.IKE - k.Keepalive; esp > 0 {
		c.ESPOut.Add(uint64(esp))
	}
}

// Fill copies t into ss.
func (t *Traffic) Fill(ss *SessionStatus) {
	ss.PacketsIn = t.packetsIn.Load()
	ss.BytesIn = t.bytesIn.Load()
	ss.PacketsOut = t.packetsOut.Load()
	ss.BytesOut = t.bytesOut.Load()
}
