package relay

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/iketcp/iketcp/relay/aggregate"
)

// Status describes a running relay: what `iketcp status` prints and the
// control socket serves as JSON.
type Status struct {
	Role     string          `json:"role"`           // RoleServer or RoleClient
	Mode     string          `json:"mode,omitempty"` // client: "explicit" or "transparent"; server: its encapsulation, "rfc9329" or "fake-tcp"
	Version  string          `json:"version,omitempty"`
	PID      int             `json:"pid,omitempty"`
	Listen   string          `json:"listen"`
	Peer     string          `json:"peer,omitempty"`    // client: the server it dials
	Backend  string          `json:"backend,omitempty"` // server: the IKE daemon it feeds
	Started  time.Time       `json:"started"`
	Counters []Counter       `json:"counters"`
	Sessions []SessionStatus `json:"sessions"`
	// Aggregates are the IKE SAs carried over several member links, as
	// FortiOS's `diagnose sys ipsec-aggregate list` lists them.
	Aggregates []AggregateStatus `json:"aggregates,omitempty"`
}

// AggregateStatus describes one aggregate: one IKE SA's session (server)
// or link path (client) and the member links that carry it.
type AggregateStatus struct {
	LocationID string         `json:"location_id"`
	Algorithm  string         `json:"algorithm"`
	Session    uint64         `json:"session,omitempty"` // the server's session
	Members    []MemberStatus `json:"members"`
	// Reorder is what this end's reorder buffer did with the ESP the
	// members brought, on its way to the daemon.
	Reorder ReorderStatus `json:"reorder"`
}

// ReorderStatus describes an aggregate's reorder buffer (package
// relay/reorder).
type ReorderStatus struct {
	HoldMs     float64 `json:"hold_ms"`      // how long a datagram may wait for a gap now (0: off)
	Delivered  uint64  `json:"delivered"`    // ESP datagrams delivered to the daemon
	Held       uint64  `json:"held"`         // held for a while, behind a gap
	Expired    uint64  `json:"expired"`      // gaps given up when their hold time passed
	Passed     uint64  `json:"passed"`       // gaps given up at once: every live member had brought what follows them
	OutOfOrder uint64  `json:"out_of_order"` // ESP the daemon got behind a higher sequence number of its SPI
	MaxBehind  uint32  `json:"max_behind"`   // the farthest behind: the anti-replay window the daemon needs
}

// MemberStatus describes one member of an aggregate, from its probes and
// counters. In and out are seen as in SessionStatus: in came from the far
// end on this member, out went to it.
type MemberStatus struct {
	Name        string  `json:"name"`
	Index       uint8   `json:"index"`
	Weight      int     `json:"weight"`
	Local       string  `json:"local,omitempty"`
	Remote      string  `json:"remote,omitempty"`
	State       string  `json:"state"` // "up" (in the rotation), "down" (probes unanswered), "connecting", "waiting", "joining"
	Connections uint64  `json:"connections,omitempty"`
	RTTms       float64 `json:"rtt_ms"`
	Loss        float64 `json:"loss"`       // share of recent probes unanswered, 0 to 1
	Rate        uint64  `json:"rate_bytes"` // carried lately, bytes a second
	PacketsIn   uint64  `json:"packets_in"`
	BytesIn     uint64  `json:"bytes_in"`
	PacketsOut  uint64  `json:"packets_out"`
	BytesOut    uint64  `json:"bytes_out"`
}

// MemberStatusOf fills a MemberStatus from m's figures at now; the state
// is "up" or "down".
func MemberStatusOf(m *aggregate.Member, now time.Time) MemberStatus {
	sn := m.Snapshot(now.UnixNano())
	ms := MemberStatus{
		Name: m.Name, Index: m.Index, Weight: max(m.Weight, 1), State: "down",
		RTTms: float64(sn.RTT.Microseconds()) / 1000, Loss: sn.Loss, Rate: sn.Rate,
		PacketsIn: sn.PacketsIn, BytesIn: sn.BytesIn, PacketsOut: sn.PacketsOut, BytesOut: sn.BytesOut,
	}
	if sn.Live {
		ms.State = "up"
	}
	return ms
}

// SessionStatus describes one server session or one client flow.
type SessionStatus struct {
	ID uint64 `json:"id"`
	// Peer is the far end of the TCP connection (server: the client's
	// address as seen through any NAT; client: the server).
	Peer string `json:"peer"`
	// Local is the UDP side: the backend socket's address on a server
	// (stable for the session's life), the daemon's address on a client.
	Local string `json:"local"`
	// Intercepted says, in transparent mode, which of the daemon's ports
	// are intercepted: "IKE 500->500, ESP in UDP 4500->4500".
	Intercepted string `json:"intercepted,omitempty"`
	// Transport is how the session currently travels: "TCP", "UDP", or
	// "UDP+TCP" while a client races the two.
	Transport string `json:"transport"`
	// TransportReason says why, on a client: "answered on udp", "no answer
	// to IKE_SA_INIT in 15s", "transport tcp".
	TransportReason string `json:"transport_reason,omitempty"`
	// State is "up", "connecting", "waiting" (no connection; a server
	// waits for the client to reconnect, a client backs off) or, on a
	// server, "half-open" (the backend has not answered the IKE_SA_INIT).
	State       string      `json:"state"`
	Created     time.Time   `json:"created"`
	LastActive  time.Time   `json:"last_active"`
	Connections uint64      `json:"connections"` // TCP connections that have carried it
	IKESAs      []IKESAInfo `json:"ike_sas"`
	// ESPIn lists SPIs of ESP arriving over TCP; ESPOut of ESP sent onto it.
	ESPIn      []string `json:"esp_spi_in"`
	ESPOut     []string `json:"esp_spi_out"`
	PacketsIn  uint64   `json:"packets_in"`
	BytesIn    uint64   `json:"bytes_in"`
	PacketsOut uint64   `json:"packets_out"`
	BytesOut   uint64   `json:"bytes_out"`
	// Links are a client flow's connections to the server, one per IKE SA
	// (RFC 9329 6: IKE SAs do not share a connection, but for the overlap
	// of a rekey).
	Links []LinkStatus `json:"links,omitempty"`
}

// LinkStatus describes one of a client flow's links.
type LinkStatus struct {
	ID          uint64      `json:"id"`
	Peer        string      `json:"peer"`
	Local       string      `json:"local,omitempty"`
	State       string      `json:"state"`
	Connections uint64      `json:"connections"`
	Session     uint64      `json:"session,omitempty"` // the server's session, from its ticket (iketcp servers only)
	IKESAs      []IKESAInfo `json:"ike_sas"`
	ESPOut      []string    `json:"esp_spi_out"`
}

// IKESAInfo is an IKE SA seen in a session, by its SPIs in hex.
type IKESAInfo struct {
	InitiatorSPI string `json:"initiator_spi"`
	ResponderSPI string `json:"responder_spi"`
}

// WriteText prints st the way FortiOS's `diagnose vpn ike gateway list`
// reads: one block per session, one fact per line.
func (st *Status) WriteText(w io.Writer, now time.Time) error {
	var b strings.Builder
	fmt.Fprintf(&b, "iketcp %s", st.Role)
	if st.Mode != "" {
		fmt.Fprintf(&b, " (%s mode)", st.Mode)
	}
	if st.Version != "" {
		fmt.Fprintf(&b, " %s", st.Version)
	}
	fmt.Fprintf(&b, " (pid %d) listen: %s", st.PID, st.Listen)
	if st.Peer != "" {
		fmt.Fprintf(&b, " peer: %s", st.Peer)
	}
	if st.Backend != "" {
		fmt.Fprintf(&b, " backend: %s", st.Backend)
	}
	fmt.Fprintf(&b, " up: %s\n", ago(now, st.Started))
	noun := "sessions"
	if st.Role == RoleClient {
		noun = "flows"
	}
	fmt.Fprintf(&b, "%s: %d\n", noun, len(st.Sessions))
	for _, s := range st.Sessions {
		b.WriteString("\n")
		st.writeSession(&b, &s, now)
	}
	if len(st.Aggregates) > 0 {
		fmt.Fprintf(&b, "\naggregates: %d\n", len(st.Aggregates))
	}
	for _, a := range st.Aggregates {
		b.WriteString("\n")
		fmt.Fprintf(&b, "location-id: %s  algorithm: %s", a.LocationID, a.Algorithm)
		if a.Session != 0 {
			fmt.Fprintf(&b, "  session: %d", a.Session)
		}
		fmt.Fprintf(&b, "  members: %d\n", len(a.Members))
		r := a.Reorder
		fmt.Fprintf(&b, "  reorder: hold %.1fms  delivered=%d held=%d expired=%d passed=%d out_of_order=%d max_behind=%d\n",
			r.HoldMs, r.Delivered, r.Held, r.Expired, r.Passed, r.OutOfOrder, r.MaxBehind)
		for _, m := range a.Members {
			fmt.Fprintf(&b, "  member %s: %s -> %s  state: %s  weight: %d  rtt: %.1fms  loss: %.0f%%  rate: %dB/s\n",
				m.Name, orDash(m.Local), orDash(m.Remote), m.State, m.Weight, m.RTTms, 100*m.Loss, m.Rate)
			fmt.Fprintf(&b, "    stat: rxp=%d txp=%d rxb=%d txb=%d\n", m.PacketsIn, m.PacketsOut, m.BytesIn, m.BytesOut)
		}
	}
	var nonzero []string
	for _, c := range st.Counters {
		if c.Value != 0 {
			nonzero = append(nonzero, fmt.Sprintf("%s=%d", c.Name, c.Value))
		}
	}
	if len(nonzero) > 0 {
		fmt.Fprintf(&b, "\ncounters: %s\n", strings.Join(nonzero, " "))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// WriteSession prints one session (or flow) of st in full, in the spirit
// of FortiOS's `diagnose vpn tunnel list`: what WriteText shows of it,
// each link's ends, IKE SAs and SPIs, and the relay it belongs to.
func (st *Status) WriteSession(w io.Writer, s *SessionStatus, now time.Time) error {
	var b strings.Builder
	fmt.Fprintf(&b, "iketcp %s (pid %d) listen: %s\n", st.Role, st.PID, st.Listen)
	st.writeSession(&b, s, now)
	fmt.Fprintf(&b, "since: %s  last active at: %s\n", s.Created.Format(time.RFC3339), s.LastActive.Format(time.RFC3339))
	_, err := io.WriteString(w, b.String())
	return err
}

// Find returns the session whose ID is id, or that has an IKE or ESP
// SPI of hex spi; nil if none.
func (st *Status) Find(key string) *SessionStatus {
	key = strings.ToLower(strings.TrimPrefix(key, "0x"))
	for i := range st.Sessions {
		s := &st.Sessions[i]
		id := strings.TrimPrefix(strings.TrimPrefix(key, "session-"), "flow-")
		if id == fmt.Sprint(s.ID) {
			return s
		}
		spis := append(append([]string{}, s.ESPIn...), s.ESPOut...)
		for _, sa := range s.IKESAs {
			spis = append(spis, sa.InitiatorSPI, sa.ResponderSPI)
		}
		for _, l := range s.Links {
			spis = append(spis, l.ESPOut...)
			for _, sa := range l.IKESAs {
				spis = append(spis, sa.InitiatorSPI, sa.ResponderSPI)
			}
		}
		for _, spi := range spis {
			if spi != "" && strings.EqualFold(spi, key) {
				return s
			}
		}
	}
	return nil
}

func (st *Status) writeSession(b *strings.Builder, s *SessionStatus, now time.Time) {
	noun := "session"
	if st.Role == RoleClient {
		noun = "flow"
	}
	fmt.Fprintf(b, "name: %s-%d\n", noun, s.ID)
	if st.Role == RoleClient {
		fmt.Fprintf(b, "addr: %s -> %s\n", s.Local, s.Peer)
	} else {
		fmt.Fprintf(b, "addr: %s -> %s\n", s.Peer, s.Local)
	}
	if s.Intercepted != "" {
		fmt.Fprintf(b, "intercepted: %s\n", s.Intercepted)
	}
	fmt.Fprintf(b, "transport: %s  state: %s  connections: %d\n", s.Transport, s.State, s.Connections)
	if s.TransportReason != "" && s.TransportReason != "transport "+strings.ToLower(s.Transport) {
		fmt.Fprintf(b, "transport reason: %s\n", s.TransportReason)
	}
	fmt.Fprintf(b, "created: %s ago  last active: %s ago\n", ago(now, s.Created), ago(now, s.LastActive))
	for _, sa := range s.IKESAs {
		fmt.Fprintf(b, "IKE SA: spi %s/%s\n", sa.InitiatorSPI, sa.ResponderSPI)
	}
	fmt.Fprintf(b, "ESP SPI: in %s  out %s\n", spiList(s.ESPIn), spiList(s.ESPOut))
	for _, l := range s.Links {
		fmt.Fprintf(b, "link %d: %s -> %s  state: %s  connections: %d", l.ID, orDash(l.Local), l.Peer, l.State, l.Connections)
		if l.Session != 0 {
			fmt.Fprintf(b, "  session: %d", l.Session)
		}
		b.WriteString("\n")
		for _, sa := range l.IKESAs {
			fmt.Fprintf(b, "  IKE SA: spi %s/%s\n", sa.InitiatorSPI, sa.ResponderSPI)
		}
		if len(l.ESPOut) > 0 {
			fmt.Fprintf(b, "  ESP SPI out: %s\n", spiList(l.ESPOut))
		}
	}
	fmt.Fprintf(b, "stat: rxp=%d txp=%d rxb=%d txb=%d\n", s.PacketsIn, s.PacketsOut, s.BytesIn, s.BytesOut)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func spiList(spis []string) string {
	if len(spis) == 0 {
		return "-"
	}
	return strings.Join(spis, ",")
}

func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return fmt.Sprintf("%ds", int(now.Sub(t).Round(time.Second)/time.Second))
}
