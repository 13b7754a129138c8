package fallback

import (
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
)

// Messages the steps use. SPIs: 0xa is the first IKE SA, 0xb a new one.
func ikeReq(ispi uint64, x framing.ExchangeType, id uint32) framing.Message {
	rspi := uint64(0)
	if x != framing.IKESAInit {
		rspi = 0x77
	}
	return framing.Message{Kind: framing.KindIKE, IKE: framing.IKEHeader{
		InitiatorSPI: ispi, ResponderSPI: rspi, Exchange: x, MessageID: id, Flags: framing.FlagInitiator, MajorVersion: 2}}
}

func ikeResp(ispi uint64, x framing.ExchangeType, id uint32) framing.Message {
	m := ikeReq(ispi, x, id)
	m.IKE.ResponderSPI = 0x77
	m.IKE.Flags = framing.FlagResponse
	return m
}

var (
	initA     = ikeReq(0xa, framing.IKESAInit, 0)
	initARe   = ikeReq(0xa, framing.IKESAInit, 0) // its retransmission
	initAResp = ikeResp(0xa, framing.IKESAInit, 0)
	authA     = ikeReq(0xa, framing.IKEAuth, 1)
	initB     = ikeReq(0xb, framing.IKESAInit, 0)
	initBResp = ikeResp(0xb, framing.IKESAInit, 0)
	rekeyC    = ikeReq(0xc, framing.Informational, 0) // a rekeyed IKE SA's first request
	esp       = framing.Message{Kind: framing.KindESP, ESP: framing.ESPHeader{SPI: 9, Seq: 1}}
	keepalive = framing.Message{Kind: framing.KindKeepalive}
	otherResp = ikeResp(0xd, framing.Informational, 3)
)

// step is one event: the daemon sends (out) or the peer answers (in, over
// via), at time at (seconds from the start). want is the route afterwards
// for sends; change, if not "", must appear in the change's text, and ""
// means no change.
type step struct {
	at     float64
	out    *framing.Message
	in     *framing.Message
	via    Transport
	want   Transport
	change string
}

func run(t *testing.T, cfg Config, steps []step) *Machine {
	t.Helper()
	start := time.Unix(1000, 0)
	m := New(cfg)
	for i, s := range steps {
		now := start.Add(time.Duration(s.at * float64(time.Second)))
		var ch *Change
		if s.out != nil {
			var r Transport
			r, ch = m.Outbound(now, s.out)
			if r != s.want {
				t.Fatalf("step %d (t=%vs): route %v, want %v", i, s.at, r, s.want)
			}
		} else {
			ch = m.Inbound(now, s.via, s.in)
			if cur, _ := m.Current(); s.want != 0 && cur != s.want {
				t.Fatalf("step %d (t=%vs): now on %v, want %v", i, s.at, cur, s.want)
			}
		}
		switch {
		case s.change == "" && ch != nil:
			t.Fatalf("step %d (t=%vs): unexpected change %v", i, s.at, ch)
		case s.change != "" && ch == nil:
			t.Fatalf("step %d (t=%vs): no change, want one with %q", i, s.at, s.change)
		case s.change != "" && !strings.Contains(ch.String(), s.change):
			t.Fatalf("step %d (t=%vs): change %q, want it to contain %q", i, s.at, ch, s.change)
		}
	}
	return m
}

func ptr(m framing.Message) *framing.Message { return &m }

func TestFallbackTransitions(t *testing.T) {
	fb := Config{Mode: ModeFallback, Threshold: 3 * time.Second}
	race := Config{Mode: ModeFallback, Threshold: 15 * time.Second, Race: true}
	tests := []struct {
		name  string
		cfg   Config
		steps []step
		why   string // Current's reason at the end
	}{
		{"answered on UDP", fb, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 0.05, in: ptr(initAResp), via: UDP, want: UDP},
			{at: 0.06, out: ptr(authA), want: UDP},
			{at: 10, out: ptr(esp), want: UDP}, // settled: the threshold no longer matters
		}, "answered on udp"},
		{"never answered on UDP: the next retransmission after the threshold goes over TCP", fb, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 1, out: ptr(initARe), want: UDP},
			{at: 2.4, out: ptr(initARe), want: UDP},
			{at: 4.36, out: ptr(initARe), want: TCP, change: "transport udp->tcp: no answer to IKE_SA_INIT in 3s"},
			{at: 4.4, in: ptr(initAResp), via: TCP, want: TCP},
			{at: 4.5, out: ptr(authA), want: TCP},
			{at: 100, out: ptr(esp), want: TCP},
		}, "answered on tcp"},
		{"answered late on UDP after the fallback", fb, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 3.5, out: ptr(initARe), want: TCP, change: "udp->tcp"},
			{at: 3.6, in: ptr(initAResp), via: UDP, want: UDP, change: "tcp->udp: answered late on UDP"},
			{at: 3.7, out: ptr(authA), want: UDP},
			{at: 3.8, in: ptr(initAResp), via: TCP, want: UDP}, // the TCP copy's answer changes nothing
		}, "answered late on UDP"},
		{"TCP also failing: back to UDP, and to TCP again", fb, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 3, out: ptr(initARe), want: TCP, change: "udp->tcp"}, // exactly at the threshold
			{at: 5, out: ptr(initARe), want: TCP},
			{at: 6.5, out: ptr(initARe), want: UDP, change: "tcp->udp: no answer on TCP either in 3s"},
			{at: 9.5, out: ptr(initARe), want: TCP, change: "udp->tcp"},
		}, "no answer to IKE_SA_INIT in 3s"},
		{"new IKE SA tries UDP again", fb, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 3, out: ptr(initARe), want: TCP, change: "udp->tcp"},
			{at: 3.1, in: ptr(initAResp), via: TCP, want: TCP},
			{at: 50, out: ptr(initB), want: UDP, change: "tcp->udp: new IKE SA"},
			{at: 50.1, in: ptr(initBResp), via: UDP, want: UDP},
		}, "answered on udp"},
		{"a retransmitted IKE_SA_INIT does not restart the probe", fb, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 2.9, out: ptr(initARe), want: UDP},
			{at: 3.0, out: ptr(initARe), want: TCP, change: "udp->tcp"},
		}, "no answer to IKE_SA_INIT"},
		{"a rekeyed IKE SA stays where its parent is", fb, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 3, out: ptr(initARe), want: TCP, change: "udp->tcp"},
			{at: 3.1, in: ptr(initAResp), via: TCP},
			{at: 80, out: ptr(rekeyC), want: TCP},
		}, "answered on tcp"},
		{"ESP, keepalives and other SAs' messages do not answer a probe", fb, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 0.5, in: ptr(esp), via: UDP, want: UDP},
			{at: 0.6, in: ptr(keepalive), via: UDP, want: UDP},
			{at: 0.7, in: ptr(otherResp), via: UDP, want: UDP},
			{at: 3.1, out: ptr(initARe), want: TCP, change: "no answer to IKE_SA_INIT"},
		}, "no answer"},
		{"a flow that starts mid-SA probes with whatever it sends", fb, []step{
			{at: 0, out: ptr(esp), want: UDP},
			{at: 1, out: ptr(authA), want: UDP},
			{at: 3.5, out: ptr(esp), want: TCP, change: "no answer to IKE_AUTH in 3s"},
			{at: 3.6, in: ptr(ikeResp(0xa, framing.IKEAuth, 1)), via: TCP},
		}, "answered on tcp"},
		{"race: UDP answers before any retransmission, no TCP at all", race, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 0.04, in: ptr(initAResp), via: UDP},
			{at: 0.05, out: ptr(authA), want: UDP},
		}, "answered on udp"},
		{"race: the first retransmission goes both ways, TCP wins", race, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 1, out: ptr(initARe), want: UDP | TCP, change: "udp->udp+tcp: no answer to IKE_SA_INIT after 1s and a retransmission"},
			{at: 1.05, in: ptr(initAResp), via: TCP, want: TCP, change: "udp+tcp->tcp: tcp answered first"},
			{at: 1.06, out: ptr(authA), want: TCP},
			{at: 1.07, in: ptr(initAResp), via: UDP, want: TCP}, // late UDP copy: ignored
		}, "tcp answered first"},
		{"race: UDP wins", race, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 1, out: ptr(initARe), want: UDP | TCP, change: "racing"},
			{at: 1.2, in: ptr(initAResp), via: UDP, want: UDP, change: "udp+tcp->udp: udp answered first"},
			{at: 2, out: ptr(authA), want: UDP},
		}, "udp answered first"},
		{"race: a new IKE SA after a TCP win races again from UDP", race, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 1, out: ptr(initARe), want: UDP | TCP, change: "racing"},
			{at: 1.1, in: ptr(initAResp), via: TCP, want: TCP, change: "tcp answered first"},
			{at: 60, out: ptr(initB), want: UDP, change: "tcp->udp: new IKE SA"},
		}, "new IKE SA"},
		{"fixed udp", Config{Mode: ModeUDP}, []step{
			{at: 0, out: ptr(initA), want: UDP},
			{at: 400, out: ptr(initARe), want: UDP},
			{at: 401, in: ptr(initAResp), via: UDP, want: UDP},
		}, "transport udp"},
		{"fixed tcp", Config{Mode: ModeTCP}, []step{
			{at: 0, out: ptr(initA), want: TCP},
			{at: 400, out: ptr(initB), want: TCP},
		}, "transport tcp"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := run(t, tt.cfg, tt.steps)
			if _, why := m.Current(); !strings.Contains(why, tt.why) {
				t.Fatalf("reason %q, want it to contain %q", why, tt.why)
			}
		})
	}
}

func TestParseModeAndThreshold(t *testing.T) {
	for in, want := range map[string]Mode{"tcp": ModeTCP, "udp": ModeUDP, "udp-fallback-tcp": ModeFallback, "auto": ModeFallback} {
		if got, err := ParseMode(in); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseMode("quic"); err == nil || !strings.Contains(err.Error(), `unknown transport "quic": want udp, tcp`) {
		t.Errorf("ParseMode(quic): %v", err)
	}
	for d, ok := range map[time.Duration]bool{
		999 * time.Millisecond: false, time.Second: true, 15 * time.Second: true, 300 * time.Second: true, 301 * time.Second: false, 0: false,
	} {
		if err := CheckThreshold(d); (err == nil) != ok {
			t.Errorf("CheckThreshold(%v) = %v", d, err)
		}
	}
	if m := New(Config{Mode: ModeFallback}); m.cfg.Threshold != DefaultThreshold {
		t.Errorf("default threshold %v", m.cfg.Threshold)
	}
}
