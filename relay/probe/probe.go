// Package probe is `iketcp probe`: from a site, it tries each way a hub
// might be reached (UDP 500 and 4500 with a real IKE_SA_INIT, TCP to the
// hub's iketcp or RFC 9329 port, TLS on it), times each, asks an iketcp
// server which address and port it saw (framing's Observe), and turns
// what it found into a verdict in plain language.
//
// It owns the probes and the verdict; it does not own the wire formats
// (framing), TLS checks (relay/dial) or anything of a relay's.
package probe

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/dial"
)

// ALPN is what iketcp's clients offer in TLS, and the probe with them.
const ALPN = "iketcp"

// Options say what to probe. The zero value of every field but Host has
// a default.
type Options struct {
	// Host is the hub: a name or an address.
	Host string
	// UDPPorts are the IKE ports probed with IKE_SA_INIT (500 and 4500).
	UDPPorts []uint16
	// TCPPorts are the ports tried with TCP (4500).
	TCPPorts []uint16
	// TLS also tries TLS 1.3 on each TCP port.
	TLS bool
	// TLSOptions check the server's certificate as `iketcp client --tls`
	// would; the probe reports the check's result, and goes on either way.
	TLSOptions dial.TLSOptions
	// Tries is how many IKE_SA_INIT requests each UDP port gets (3), one
	// after the other, each waiting Wait for its answer.
	Tries int
	// Wait bounds the wait for any one answer (1 s); a TCP connection
	// gets three times as long.
	Wait time.Duration
	// Dialer opens the TCP connections (a net.Dialer by default).
	Dialer func(ctx context.Context, network, address string) (net.Conn, error)
}

func (o *Options) defaults() {
	if len(o.UDPPorts) == 0 {
		o.UDPPorts = []uint16{500, 4500}
	}
	if len(o.TCPPorts) == 0 {
		o.TCPPorts = []uint16{4500}
	}
	if o.Tries <= 0 {
		o.Tries = 3
	}
	if o.Wait <= 0 {
		o.Wait = time.Second
	}
	if o.Dialer == nil {
		d := &net.Dialer{}
		o.Dialer = d.DialContext
	}
}

// UDPResult is what one UDP port said.
type UDPResult struct {
	Port     uint16        `json:"port"`
	Sent     int           `json:"sent"`
	Answered int           `json:"answered"`
	RTT      time.Duration `json:"rtt_ns,omitempty"` // the first answer's
	Answer   string        `json:"answer,omitempty"` // what the responder said
	// NATSeen: the answer carried NAT detection; Translated: it says the
	// responder saw another address or port than the probe sent from.
	NATSeen    bool   `json:"nat_seen"`
	Translated bool   `json:"translated"`
	Error      string `json:"error,omitempty"`
}

// Observation is one address an iketcp server said it saw.
type Observation struct {
	Local    netip.AddrPort `json:"local"`    // the probe's end of the connection
	Observed netip.AddrPort `json:"observed"` // what the server saw
}

// TCPResult is what one TCP port said, in clear or in TLS.
type TCPResult struct {
	Port       uint16        `json:"port"`
	TLS        bool          `json:"tls"`
	Connected  bool          `json:"connected"`
	ConnectRTT time.Duration `json:"connect_rtt_ns,omitempty"`
	// Iketcp: an iketcp server answered Observe; Observed holds what it
	// saw, once per connection (two connections, for the NAT's kind).
	Iketcp    bool          `json:"iketcp"`
	Observed  []Observation `json:"observed,omitempty"`
	AnswerRTT time.Duration `json:"answer_rtt_ns,omitempty"`
	// RFC9329: a responder answered a framed IKE_SA_INIT (probed only
	// where no iketcp server answered).
	RFC9329 bool `json:"rfc9329"`
	// TLS only: the server's certificate, its pin, and how the check of
	// TLSOptions went ("" when it passed).
	TLSVersion  string `json:"tls_version,omitempty"`
	TLSSubject  string `json:"tls_subject,omitempty"`
	TLSPin      string `json:"tls_pin,omitempty"`
	TLSCheck    string `json:"tls_check,omitempty"`
	TLSProtocol string `json:"tls_alpn,omitempty"`
	Error       string `json:"error,omitempty"`
}

// NAT kinds, from what iketcp servers saw.
const (
	NATUnknown        = "unknown"         // no iketcp server answered
	NATNone           = "none"            // seen at the address and port it sent from
	NATPortPreserving = "port-preserving" // another address, the same ports
	NATPortChanging   = "port-changing"   // another address and other ports
)

// Report is everything the probe found, and its verdict.
type Report struct {
	Host    string      `json:"host"`
	Address netip.Addr  `json:"address"`
	UDP     []UDPResult `json:"udp"`
	TCP     []TCPResult `json:"tcp"`
	NAT     string      `json:"nat"`
	// PublicAddr is the address iketcp servers saw, when they did.
	PublicAddr netip.Addr `json:"public_address,omitzero"`
	// Verdict says, in plain language, what works and what to use.
	Verdict []string `json:"verdict"`
	// Reachable: some way reached the hub.
	Reachable bool `json:"reachable"`
}

// Run probes o.Host and returns the report. Every probe is bounded in
// time: with the defaults, a run takes at most about 10 s, and less
// where things answer. The error is for a host that does not resolve or
// a context that ends; what does not answer is in the report.
func Run(ctx context.Context, o Options) (*Report, error) {
	o.defaults()
	addr, err := resolve(ctx, o.Host)
	if err != nil {
		return nil, err
	}
	r := &Report{Host: o.Host, Address: addr}
	r.UDP = make([]UDPResult, len(o.UDPPorts))
	r.TCP = make([]TCPResult, 0, 2*len(o.TCPPorts))
	var wg sync.WaitGroup
	for i, port := range o.UDPPorts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.UDP[i] = probeUDP(ctx, o, netip.AddrPortFrom(addr, port))
		}()
	}
	tcp := make([]TCPResult, 2*len(o.TCPPorts))
	for i, port := range o.TCPPorts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tcp[2*i] = probeTCP(ctx, o, netip.AddrPortFrom(addr, port), false)
			if o.TLS {
				tcp[2*i+1] = probeTCP(ctx, o, netip.AddrPortFrom(addr, port), true)
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	for i := range o.TCPPorts {
		r.TCP = append(r.TCP, tcp[2*i])
		if o.TLS {
			r.TCP = append(r.TCP, tcp[2*i+1])
		}
	}
	r.NAT, r.PublicAddr = natKind(r.TCP)
	r.Verdict, r.Reachable = verdict(r, o)
	return r, nil
}

func resolve(ctx context.Context, host string) (netip.Addr, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		return a.Unmap(), nil
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%s: %w", host, err)
	}
	if len(addrs) == 0 {
		return netip.Addr{}, fmt.Errorf("%s: no address", host)
	}
	return addrs[0].Unmap(), nil
}

// probeUDP sends the same IKE_SA_INIT request up to o.Tries times (a
// responder answers a retransmission with its first answer) and counts
// the answers. From port 4500 the request carries the non-ESP marker.
func probeUDP(ctx context.Context, o Options, to netip.AddrPort) UDPResult {
	res := UDPResult{Port: to.Port()}
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		res.Error = err.Error()
		return res
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetReadDeadline(time.Now()) })
	defer stop()
	local := c.LocalAddr().(*net.UDPAddr).AddrPort()
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	req, err := newInitRequest(local, to)
	if err != nil {
		res.Error = err.Error()
		return res
	}
	marker := to.Port() != 500
	out := req.bytes
	if marker {
		out = append(make([]byte, 4, 4+len(out)), out...)
	}
	buf := make([]byte, 65536)
	for range o.Tries {
		if ctx.Err() != nil {
			break
		}
		sent := time.Now()
		if _, err := c.Write(out); err != nil {
			res.Error = err.Error() // an ICMP unreachable from the last try shows here
			res.Sent++
			continue
		}
		res.Sent++
		deadline := sent.Add(o.Wait)
		c.SetReadDeadline(deadline)
		for {
			n, err := c.Read(buf)
			if err != nil {
				var ne net.Error
				if !errors.As(err, &ne) || !ne.Timeout() {
					res.Error = err.Error()
					time.Sleep(time.Until(deadline)) // an unreachable port answers at once; keep the pace
				}
				break
			}
			msg := buf[:n]
			if marker {
				if n < 4 || binary.BigEndian.Uint32(msg) != 0 {
					continue
				}
				msg = msg[4:]
			}
			ans, err := parseAnswer(msg, req, local)
			if err != nil {
				continue
			}
			if res.Answered == 0 {
				res.RTT = time.Since(sent)
				res.Answer = ans.Kind
			}
			if ans.NATSeen && !res.NATSeen {
				res.NATSeen, res.Translated = true, ans.Translated
			}
			if ans.Cookie != nil && req.bytes[16] != payloadNotify {
				// A responder under load (or with a few half-open SAs from
				// this address) asks for a cookie first: the next try
				// returns it, and gets the full answer, NAT detection too.
				req = req.withCookie(ans.Cookie)
				out = req.bytes
				if marker {
					out = append(make([]byte, 4, 4+len(out)), out...)
				}
			}
			res.Answered++
			res.Error = ""
			time.Sleep(min(o.Wait/10, time.Until(deadline))) // pace the next try
			break
		}
	}
	return res
}

// probeTCP connects to the port twice (once with useTLS), asks an
// iketcp server what it saw on each connection, and, where none answers,
// whether an RFC 9329 responder answers a framed IKE_SA_INIT.
func probeTCP(ctx context.Context, o Options, to netip.AddrPort, useTLS bool) TCPResult {
	res := TCPResult{Port: to.Port(), TLS: useTLS}
	for i := range 2 {
		if !probeTCPOnce(ctx, o, to, useTLS, i == 0, &res) {
			break
		}
	}
	return res
}

// probeTCPOnce makes one connection, and reports whether a second is
// worth making (the first reached an iketcp server).
func probeTCPOnce(ctx context.Context, o Options, to netip.AddrPort, useTLS, first bool, res *TCPResult) bool {
	ctx, cancel := context.WithTimeout(ctx, 3*o.Wait)
	defer cancel()
	start := time.Now()
	nc, err := o.Dialer(ctx, "tcp", to.String())
	if err != nil {
		if first {
			res.Error = err.Error()
		}
		return false
	}
	defer nc.Close()
	if first {
		res.Connected, res.ConnectRTT = true, time.Since(start)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Now()) })
	defer stop()
	conn := nc
	if useTLS {
		tc := tls.Client(nc, &tls.Config{
			MinVersion:         tls.VersionTLS13,
			ServerName:         serverName(o, to),
			NextProtos:         []string{ALPN},
			InsecureSkipVerify: true, // checked below, as the client would, and reported
		})
		if err := tc.HandshakeContext(ctx); err != nil {
			res.Error = "TLS handshake: " + err.Error()
			return false
		}
		if first {
			describeTLS(o, tc.ConnectionState(), res)
		}
		conn = tc
	}
	local, _ := netip.ParseAddrPort(nc.LocalAddr().String())
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	var nonceBytes [framing.ObserveNonceSize]byte
	rand.Read(nonceBytes[:])
	out := append([]byte(framing.Prefix), framing.AppendFrame(nil, framing.AppendControl(nil, framing.ControlObserve, nonceBytes[:]))...)
	sent := time.Now()
	if _, err := conn.Write(out); err != nil {
		res.Error = err.Error()
		return false
	}
	dec := framing.NewDecoder(conn, framing.MinBufferSize, false)
	conn.SetReadDeadline(time.Now().Add(o.Wait))
	for range 16 {
		p, err := dec.Next()
		if err != nil {
			break
		}
		var m framing.Message
		if m.Decode(p) != nil || m.Kind != framing.KindControl {
			continue
		}
		nonce, addr, port, ok := m.Control.ObservedAddr()
		if !ok || nonce != binary.BigEndian.Uint64(nonceBytes[:]) {
			continue
		}
		if first {
			res.AnswerRTT = time.Since(sent)
		}
		res.Iketcp = true
		res.Observed = append(res.Observed, Observation{Local: local, Observed: netip.AddrPortFrom(netip.AddrFrom16(addr).Unmap(), port)})
		return true
	}
	if !first || ctx.Err() != nil {
		return false
	}
	// No iketcp server: is it an RFC 9329 responder?
	req, err := newInitRequest(local, to)
	if err != nil {
		return false
	}
	frame := framing.AppendFrame(nil, append(make([]byte, 4, 4+len(req.bytes)), req.bytes...))
	if _, err := conn.Write(frame); err != nil {
		return false
	}
	conn.SetReadDeadline(time.Now().Add(o.Wait))
	for range 16 {
		p, err := dec.Next()
		if err != nil {
			break
		}
		if len(p) > 4 && binary.BigEndian.Uint32(p) == 0 {
			if _, err := parseAnswer(p[4:], req, local); err == nil {
				res.RFC9329 = true
				break
			}
		}
	}
	return false
}

func serverName(o Options, to netip.AddrPort) string {
	if o.TLSOptions.ServerName != "" {
		return o.TLSOptions.ServerName
	}
	if _, err := netip.ParseAddr(o.Host); err != nil {
		return o.Host
	}
	return to.Addr().String()
}

// describeTLS notes the server's certificate and how the client's check
// (o.TLSOptions) goes.
func describeTLS(o Options, cs tls.ConnectionState, res *TCPResult) {
	res.TLSVersion = tls.VersionName(cs.Version)
	res.TLSProtocol = cs.NegotiatedProtocol
	if len(cs.PeerCertificates) > 0 {
		leaf := cs.PeerCertificates[0]
		res.TLSSubject = leaf.Subject.String()
		sum := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
		res.TLSPin = dial.FormatPin(sum[:])
	}
	opts := o.TLSOptions
	if opts.ServerName == "" {
		opts.ServerName = serverName(o, netip.AddrPort{})
	}
	cfg, err := dial.TLSConfig(opts)
	if err != nil {
		res.TLSCheck = err.Error()
		return
	}
	if cfg.VerifyConnection != nil {
		if err := cfg.VerifyConnection(cs); err != nil {
			res.TLSCheck = err.Error()
		}
	}
}

// natKind reads the NAT's kind from what iketcp servers saw.
func natKind(tcp []TCPResult) (string, netip.Addr) {
	var obs []Observation
	for _, t := range tcp {
		obs = append(obs, t.Observed...)
	}
	if len(obs) == 0 {
		return NATUnknown, netip.Addr{}
	}
	kind := NATNone
	for _, o := range obs {
		if o.Observed == o.Local {
			continue
		}
		if o.Observed.Port() != o.Local.Port() {
			return NATPortChanging, obs[0].Observed.Addr()
		}
		kind = NATPortPreserving
	}
	return kind, obs[0].Observed.Addr()
}

// verdict says what works and what to use, most important first.
func verdict(r *Report, o Options) ([]string, bool) {
	var v []string
	udp := map[uint16]UDPResult{}
	for _, u := range r.UDP {
		udp[u.Port] = u
	}
	var iketcpPort, plainPort, tlsPort, openPort uint16
	for _, t := range r.TCP {
		switch {
		case t.Iketcp && t.TLS && tlsPort == 0:
			tlsPort = t.Port
		case t.Iketcp && !t.TLS && iketcpPort == 0:
			iketcpPort = t.Port
		case t.RFC9329 && plainPort == 0:
			plainPort = t.Port
		case t.Connected && openPort == 0:
			openPort = t.Port
		}
	}
	hostPort := func(p uint16) string { return net.JoinHostPort(r.Host, strconv.Itoa(int(p))) }
	tcpAdvice := ""
	switch {
	case iketcpPort != 0:
		tcpAdvice = fmt.Sprintf("use --transport tcp (iketcp client --peer %s)", hostPort(iketcpPort))
	case tlsPort != 0:
		tcpAdvice = fmt.Sprintf("use --transport tcp --tls (iketcp client --tls --peer %s)", hostPort(tlsPort))
	case plainPort != 0:
		tcpAdvice = fmt.Sprintf("use --transport tcp --plain-rfc9329 (iketcp client --plain-rfc9329 --peer %s)", hostPort(plainPort))
	}
	reachable := tcpAdvice != ""
	natt := uint16(4500) // the NAT-T port: 4500, or the first other than 500
	if _, ok := udp[natt]; !ok {
		for _, u := range r.UDP {
			if u.Port != 500 {
				natt = u.Port
				break
			}
		}
	}
	u4500, has4500 := udp[natt]
	u500, has500 := udp[500]
	nattName := "UDP " + strconv.Itoa(int(natt))
	switch {
	case !has4500:
	case u4500.Answered == u4500.Sent && u4500.Sent > 0:
		reachable = true
		line := fmt.Sprintf(nattName+" works here (answered %d of %d, %s): plain NAT-T needs no iketcp", u4500.Answered, u4500.Sent, round(u4500.RTT))
		if tcpAdvice != "" {
			line += "; --transport auto keeps TCP in reserve for when it stops"
		}
		v = append(v, line+".")
	case u4500.Answered > 0:
		reachable = true
		line := fmt.Sprintf(nattName+" lost %d of %d probes here: it looks rate-limited or lossy", u4500.Sent-u4500.Answered, u4500.Sent)
		if tcpAdvice != "" {
			line += "; use --transport auto --race, which keeps whichever of UDP and TCP answers first"
		}
		v = append(v, line+".")
	default:
		line := nattName + " is blocked here (no answer to " + strconv.Itoa(u4500.Sent) + " IKE_SA_INIT probes)"
		if strings.Contains(u4500.Error, "connection refused") {
			line = nattName + " is refused (ICMP port unreachable): no IKE daemon listens there, or a firewall rejects it"
		}
		if tcpAdvice != "" {
			line += "; " + tcpAdvice
		} else {
			line += ", and no TCP way answered either"
		}
		v = append(v, line+".")
	}
	if has500 && has4500 {
		switch {
		case u500.Answered == 0 && u4500.Answered > 0:
			v = append(v, "UDP 500 is blocked but "+nattName+" answers: start IKE on the NAT-T port (strongSwan: local_port = 4500 and remote_port = 4500).")
		case u500.Answered > 0 && u4500.Answered == 0 && tcpAdvice == "":
			v = append(v, "UDP 500 answers but "+nattName+" does not: IKE starts, but NAT-T and ESP in UDP will fail here.")
		}
	}
	if tcpAdvice != "" && (!has4500 || u4500.Answered == u4500.Sent) {
		v = append(v, "TCP works too: "+tcpAdvice+".")
	}
	if tlsPort != 0 && iketcpPort != 0 {
		v = append(v, fmt.Sprintf("TLS works on port %d: add --tls where TCP in clear is inspected or refused.", tlsPort))
	}
	for _, t := range r.TCP {
		if t.TLS && t.Iketcp && t.TLSCheck != "" {
			v = append(v, fmt.Sprintf("The server's certificate fails the check --tls would make (%s); its pin is %s (--tls-pin).", t.TLSCheck, t.TLSPin))
			break
		}
	}
	if openPort != 0 && tcpAdvice == "" {
		v = append(v, fmt.Sprintf("TCP %d is open but nothing there answered as iketcp or RFC 9329: check the port (--tcp-port) and that iketcp server listens on it.", openPort))
	}
	if !reachable && openPort == 0 {
		v = append(v, "Nothing reached the hub: check its address, the ports (--udp-port, --tcp-port) and its firewall.")
	}
	switch r.NAT {
	case NATNone:
		v = append(v, fmt.Sprintf("No NAT: the hub saw this host at its own address, %s.", r.PublicAddr))
	case NATPortPreserving:
		v = append(v, fmt.Sprintf("Behind NAT: the hub saw %s; the NAT kept the source ports (port-preserving).", r.PublicAddr))
	case NATPortChanging:
		v = append(v, fmt.Sprintf("Behind a port-changing NAT, as carrier-grade NAT does: the hub saw %s with other ports. "+
			"UDP lives only as long as keepalives hold each mapping; TCP keeps its own.", r.PublicAddr))
	default:
		for _, u := range r.UDP {
			if u.NATSeen {
				if u.Translated {
					v = append(v, fmt.Sprintf("Behind NAT: the IKE responder on UDP %d saw another address or port than this host's.", u.Port))
				} else {
					v = append(v, fmt.Sprintf("No NAT on the way to UDP %d: the IKE responder saw this host's own address and port.", u.Port))
				}
				break
			}
		}
	}
	return v, reachable
}

func round(d time.Duration) time.Duration {
	switch {
	case d > time.Second:
		return d.Round(time.Millisecond)
	case d > time.Millisecond:
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Microsecond)
}

// Format writes the report for people.
func (r *Report) Format() string {
	var b []byte
	b = fmt.Appendf(b, "probing %s (%s)\n", r.Host, r.Address)
	for _, u := range r.UDP {
		b = fmt.Appendf(b, "  udp %-5d IKE_SA_INIT  ", u.Port)
		if u.Answered == 0 {
			b = fmt.Appendf(b, "no answer to %d", u.Sent)
			if u.Error != "" {
				b = fmt.Appendf(b, " (%s)", u.Error)
			}
		} else {
			b = fmt.Appendf(b, "answered %d of %d, rtt %s: %s", u.Answered, u.Sent, round(u.RTT), u.Answer)
			if u.NATSeen {
				b = fmt.Appendf(b, ", NAT on the way: %v", u.Translated)
			}
		}
		b = append(b, '\n')
	}
	for _, t := range r.TCP {
		kind := "tcp"
		if t.TLS {
			kind = "tls"
		}
		b = fmt.Appendf(b, "  %s %-5d ", kind, t.Port)
		switch {
		case !t.Connected:
			b = fmt.Appendf(b, "no connection (%s)", t.Error)
		case t.TLS && t.TLSVersion == "":
			b = fmt.Appendf(b, "connected in %s, no TLS (%s)", round(t.ConnectRTT), t.Error)
		default:
			b = fmt.Appendf(b, "connected in %s", round(t.ConnectRTT))
			if t.TLS {
				b = fmt.Appendf(b, ", %s alpn %q, certificate %q %s", t.TLSVersion, t.TLSProtocol, t.TLSSubject, t.TLSPin)
				if t.TLSCheck != "" {
					b = fmt.Appendf(b, " (check failed: %s)", t.TLSCheck)
				}
			}
			switch {
			case t.Iketcp:
				b = fmt.Appendf(b, "; iketcp server answered in %s, saw", round(t.AnswerRTT))
				for _, o := range t.Observed {
					b = fmt.Appendf(b, " %s (from %s)", o.Observed, o.Local)
				}
			case t.RFC9329:
				b = fmt.Appendf(b, "; an RFC 9329 responder answered IKE_SA_INIT (not iketcp)")
			default:
				b = fmt.Appendf(b, "; neither iketcp nor RFC 9329 answered")
			}
		}
		b = append(b, '\n')
	}
	b = fmt.Appendf(b, "nat: %s\n", r.NAT)
	b = append(b, "verdict:\n"...)
	for _, line := range r.Verdict {
		b = fmt.Appendf(b, "  %s\n", line)
	}
	return string(b)
}
