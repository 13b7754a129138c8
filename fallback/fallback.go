// Package fallback chooses the transport of a client flow: UDP, TCP, or
// UDP first and TCP when UDP gets no answer, as FortiOS's transport
// udp-fallback-tcp (later auto) with its fallback-tcp-threshold does. It
// also offers a race: after the daemon's first unanswered retransmission,
// send on both and keep whichever transport answers first, so a network
// that blocks UDP costs about one retransmission interval instead of the
// whole threshold.
//
// Machine is the state machine, one per flow. It is pure: it owns no
// sockets and reads no clock (every event carries its time), so its
// transitions are table-tested. The caller sends each of the daemon's
// datagrams on the Transport Outbound returns, reports what the peer sends
// with Inbound, and logs the Changes both return.
//
// The rules, after RFC 9329 5.1:
//   - A new IKE SA (an IKE_SA_INIT request with a new initiator SPI) tries
//     UDP first.
//   - An IKE message from the peer for that SA, on either transport,
//     settles the flow on that transport for the life of the IKE SA.
//     Other IKE SAs of the daemon (rekeys) follow, since their state at
//     the peer is tied to the same path.
//   - If the threshold passes without an answer, the daemon's next
//     message, normally its next retransmission, goes over TCP. If TCP
//     stays silent for another threshold, the flow tries UDP again.
//   - An answer that arrives late on UDP after the fallback, before TCP
//     has answered, settles the flow back on UDP: the peer's state for
//     the exchange is on UDP.
package fallback

import (
	"fmt"
	"time"

	"github.com/iketcp/iketcp/framing"
)

// Threshold bounds, as FortiOS's fallback-tcp-threshold (1-300 s, 15 s).
const (
	MinThreshold     = time.Second
	MaxThreshold     = 300 * time.Second
	DefaultThreshold = 15 * time.Second
)

// Mode is a flow's transport setting.
type Mode uint8

// Modes.
const (
	ModeTCP      Mode = iota // always TCP (RFC 9329)
	ModeUDP                  // always UDP: a plain NAT-T relay
	ModeFallback             // UDP first, TCP when UDP gets no answer
)

func (m Mode) String() string {
	switch m {
	case ModeUDP:
		return "udp"
	case ModeFallback:
		return "udp-fallback-tcp"
	}
	return "tcp"
}

// ParseMode reads a --transport value: udp, tcp, udp-fallback-tcp, or
// auto (an alias of udp-fallback-tcp, as FortiOS renamed it).
func ParseMode(s string) (Mode, error) {
	switch s {
	case "tcp":
		return ModeTCP, nil
	case "udp":
		return ModeUDP, nil
	case "udp-fallback-tcp", "auto":
		return ModeFallback, nil
	}
	return 0, fmt.Errorf("unknown transport %q: want udp, tcp, udp-fallback-tcp or auto", s)
}

// CheckThreshold refuses thresholds outside MinThreshold..MaxThreshold.
func CheckThreshold(d time.Duration) error {
	if d < MinThreshold || d > MaxThreshold {
		return fmt.Errorf("threshold %v is out of range: want %ds to %ds", d, int(MinThreshold.Seconds()), int(MaxThreshold.Seconds()))
	}
	return nil
}

// Transport is a set of paths a datagram travels: UDP, TCP, or both
// (UDP|TCP) while a race is on.
type Transport uint8

// Transports.
const (
	UDP Transport = 1 << iota
	TCP
)

func (t Transport) String() string {
	switch t {
	case UDP:
		return "udp"
	case TCP:
		return "tcp"
	case UDP | TCP:
		return "udp+tcp"
	}
	return "none"
}

// Config configures a Machine.
type Config struct {
	Mode Mode
	// Threshold is how long UDP may stay unanswered; zero means
	// DefaultThreshold.
	Threshold time.Duration
	// Race starts TCP alongside UDP after the first unanswered
	// retransmission, and keeps whichever answers first.
	Race bool
}

// state is where a fallback flow stands.
type state uint8

const (
	probing  state = iota // trying UDP for a new IKE SA
	fellBack              // threshold passed: sending on TCP, no answer yet
	racing                // sending on both, waiting for the first answer
	settled               // answered: on cur for the life of the IKE SA
)

// Change is a transition a caller should log: the transport went from
// From to To, for Reason.
type Change struct {
	From, To Transport
	Reason   string
}

func (c *Change) String() string {
	return fmt.Sprintf("transport %v->%v: %s", c.From, c.To, c.Reason)
}

// request identifies an IKE request, to spot retransmissions.
type request struct {
	ispi     uint64
	exchange framing.ExchangeType
	id       uint32
}

// Machine decides one flow's transport. It is not safe for concurrent
// use: callers serialize calls.
type Machine struct {
	cfg Config

	state state
	cur   Transport // where datagrams go now
	since time.Time // start of the current probe, fallback or race
	// ike is the initiator SPI of the IKE SA being probed or settled; zero
	// until the daemon starts one (a flow may start mid-SA, after a
	// restart: then any IKE answer counts).
	ike uint64
	// what names the unanswered exchange, for reasons ("IKE_SA_INIT").
	what string
	// last is the daemon's latest request and sends how often it went out.
	last  request
	sends int
	// reason says why the flow is where it is, for Status.
	reason string
}

// New returns a machine for cfg. A fallback flow starts probing UDP with
// its first datagram.
func New(cfg Config) *Machine {
	if cfg.Threshold == 0 {
		cfg.Threshold = DefaultThreshold
	}
	m := &Machine{cfg: cfg}
	switch cfg.Mode {
	case ModeUDP:
		m.state, m.cur, m.reason = settled, UDP, "transport udp"
	case ModeTCP:
		m.state, m.cur, m.reason = settled, TCP, "transport tcp"
	default:
		m.state, m.cur, m.reason = probing, UDP, "trying UDP first"
	}
	return m
}

// Outbound tells the machine the daemon sends msg at now, and returns
// where to send it, and the transition it caused, if any.
func (m *Machine) Outbound(now time.Time, msg *framing.Message) (Transport, *Change) {
	if m.cfg.Mode != ModeFallback {
		return m.cur, nil
	}
	var ch *Change
	if isNewIKESA(msg) && msg.IKE.InitiatorSPI != m.ike {
		// RFC 9329 5.1: a new IKE SA tries UDP again.
		from := m.cur
		m.ike, m.state, m.cur, m.since = msg.IKE.InitiatorSPI, probing, UDP, now
		m.what, m.last, m.sends = msg.IKE.Exchange.String(), request{}, 0
		m.reason = "new IKE SA: trying UDP first"
		if from != UDP {
			ch = &Change{From: from, To: UDP, Reason: "new IKE SA: trying UDP first"}
		}
	}
	if m.since.IsZero() {
		m.since = now // a flow's first datagram starts its probe
	}
	retransmit := m.noteRequest(msg)
	waited := now.Sub(m.since)
	switch m.state {
	case probing:
		switch {
		case waited >= m.cfg.Threshold:
			m.state, m.cur, m.since = fellBack, TCP, now
			m.reason = fmt.Sprintf("no answer to %s in %v", m.unanswered(), m.cfg.Threshold)
			ch = &Change{From: UDP, To: TCP, Reason: m.reason}
		case m.cfg.Race && retransmit:
			m.state, m.cur, m.since = racing, UDP|TCP, now
			m.reason = fmt.Sprintf("no answer to %s after %v and a retransmission: racing TCP against UDP",
				m.unanswered(), waited.Round(time.Millisecond))
			ch = &Change{From: UDP, To: UDP | TCP, Reason: m.reason}
		}
	case fellBack:
		if waited >= m.cfg.Threshold {
			m.state, m.cur, m.since = probing, UDP, now
			m.reason = fmt.Sprintf("no answer on TCP either in %v: trying UDP again", m.cfg.Threshold)
			ch = &Change{From: TCP, To: UDP, Reason: m.reason}
		}
	}
	return m.cur, ch
}

// Inbound tells the machine the peer's msg arrived over via at now, and
// returns the transition it caused, if any. Only IKE messages of the IKE
// SA being probed answer a probe; ESP and keepalives do not.
func (m *Machine) Inbound(now time.Time, via Transport, msg *framing.Message) *Change {
	if m.cfg.Mode != ModeFallback || m.state == settled || msg.Kind != framing.KindIKE {
		return nil
	}
	if m.ike != 0 && msg.IKE.InitiatorSPI != m.ike {
		return nil // an answer for another IKE SA
	}
	from, took := m.cur, now.Sub(m.since).Round(time.Millisecond)
	m.state, m.cur = settled, via
	switch {
	case from == UDP|TCP:
		m.reason = fmt.Sprintf("%v answered first, %v into the race", via, took)
	case from == TCP && via == UDP:
		m.reason = fmt.Sprintf("answered late on UDP, %v after falling back to TCP", took)
	default:
		m.reason = fmt.Sprintf("answered on %v", via)
	}
	if from == via {
		return nil // settled where it already was: nothing a user needs to know
	}
	return &Change{From: from, To: via, Reason: m.reason}
}

// Current returns where datagrams go now and why.
func (m *Machine) Current() (Transport, string) { return m.cur, m.reason }

// noteRequest remembers the daemon's requests and reports whether msg
// retransmits the last one.
func (m *Machine) noteRequest(msg *framing.Message) bool {
	if msg.Kind != framing.KindIKE || msg.IKE.IsResponse() {
		return false
	}
	r := request{msg.IKE.InitiatorSPI, msg.IKE.Exchange, msg.IKE.MessageID}
	if r == m.last {
		m.sends++
		return true
	}
	m.last, m.sends = r, 1
	if m.what == "" {
		m.what = msg.IKE.Exchange.String()
	}
	return false
}

func (m *Machine) unanswered() string {
	if m.what == "" {
		return "the daemon's traffic"
	}
	return m.what
}

// isNewIKESA reports whether msg starts an IKE SA: an IKE_SA_INIT request,
// whose responder SPI is still zero.
func isNewIKESA(msg *framing.Message) bool {
	return msg.Kind == framing.KindIKE && msg.IKE.Exchange == framing.IKESAInit &&
		!msg.IKE.IsResponse() && msg.IKE.ResponderSPI == 0
}
