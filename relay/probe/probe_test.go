package probe

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay/relaytest"
)

// responder is a fake IKE responder on UDP loopback: it answers every
// IKE_SA_INIT request (with the marker when marker is set) with a response
// whose NAT detection hashes the address it saw, shifted by portShift
// (non-zero: as if a NAT had changed the port), and answers only the first
// answerFirst requests (0: all; -1: none, as behind a carrier that drops
// UDP).
func responder(t *testing.T, marker bool, portShift uint16, answerFirst int) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 4096)
		answered := 0
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			msg := buf[:n]
			if marker {
				msg = msg[4:]
			}
			var h framing.IKEHeader
			if h.Decode(msg) != nil || !h.IsInitRequest() {
				continue
			}
			if answerFirst != 0 && answered >= answerFirst { // -1: none
				continue
			}
			answered++
			const rspi = 0x1122334455667788
			seen := netip.AddrPortFrom(from.Addr().Unmap(), from.Port()+portShift)
			body := appendPayload(nil, payloadNone, notifyBody(notifyNATDestinationIP, natHash(h.InitiatorSPI, rspi, seen)))
			resp := make([]byte, framing.IKEHeaderSize, 64)
			binary.BigEndian.PutUint64(resp, h.InitiatorSPI)
			binary.BigEndian.PutUint64(resp[8:], rspi)
			resp[16], resp[17], resp[18], resp[19] = payloadNotify, 0x20, byte(framing.IKESAInit), framing.FlagResponse
			resp = append(resp, body...)
			binary.BigEndian.PutUint32(resp[24:], uint32(len(resp)))
			if marker {
				resp = append(make([]byte, 4), resp...)
			}
			c.WriteToUDPAddrPort(resp, from)
		}
	}()
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

func TestInitRequestParses(t *testing.T) {
	local, remote := netip.MustParseAddrPort("100.64.0.2:40000"), netip.MustParseAddrPort("203.0.113.2:500")
	req, err := newInitRequest(local, remote)
	if err != nil {
		t.Fatal(err)
	}
	var m framing.Message
	if err := m.Decode(append(make([]byte, 4), req.bytes...)); err != nil || m.Kind != framing.KindIKE || !m.IKE.IsInitRequest() || m.IKE.InitiatorSPI != req.spi {
		t.Fatalf("the probe's IKE_SA_INIT does not parse as one: %v %+v", err, m.IKE)
	}
	// Walk the payload chain: SA, KE, Nonce, Notify, Notify, and the
	// lengths add up to the message.
	next, p, kinds := req.bytes[16], req.bytes[framing.IKEHeaderSize:], []byte(nil)
	for next != payloadNone {
		kinds = append(kinds, next)
		n := int(binary.BigEndian.Uint16(p[2:]))
		next, p = p[0], p[n:]
	}
	if string(kinds) != string([]byte{payloadSA, payloadKE, payloadNonce, payloadNotify, payloadNotify}) || len(p) != 0 {
		t.Fatalf("payloads %v, %d bytes left over", kinds, len(p))
	}
}

// TestRunAgainstIketcpServer: UDP answered by a responder without NAT on
// one port and blocked (nothing listens) on the other, TCP to a real
// iketcp server on loopback, which sees the probe's own address: no NAT.
func TestRunAgainstIketcpServer(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) }) // after the responder's and the rig's cleanups
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	_, srvPort, _ := net.SplitHostPort(r.SrvAddr)
	tcpPort := mustPort(t, srvPort)
	udp4500 := responder(t, true, 0, 0)
	dead := deadUDPPort(t)
	rep, err := Run(context.Background(), Options{Host: "127.0.0.1", UDPPorts: []uint16{dead, udp4500}, TCPPorts: []uint16{tcpPort}, Wait: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + rep.Format())
	if u := rep.UDP[1]; u.Answered != 3 || u.Sent != 3 || !u.NATSeen || u.Translated || u.Answer != "IKE_SA_INIT response" {
		t.Errorf("answered UDP port: %+v", u)
	}
	if u := rep.UDP[0]; u.Answered != 0 {
		t.Errorf("dead UDP port answered: %+v", u)
	}
	tc := rep.TCP[0]
	if !tc.Connected || !tc.Iketcp || len(tc.Observed) != 2 {
		t.Fatalf("TCP: %+v", tc)
	}
	for _, o := range tc.Observed {
		if o.Observed != o.Local {
			t.Errorf("server saw %v, the probe was %v", o.Observed, o.Local)
		}
	}
	if rep.NAT != NATNone || !rep.Reachable || rep.PublicAddr.String() != "127.0.0.1" {
		t.Errorf("nat %s reachable %v public %v", rep.NAT, rep.Reachable, rep.PublicAddr)
	}
	if got := r.Srv.Counters().ObservesAnswered.Load(); got != 2 {
		t.Errorf("server answered %d observes, want 2", got)
	}
}

// TestVerdicts: the plain-language verdict for each situation the lab's
// profiles produce, and a lossy UDP path.
func TestVerdicts(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true})
	_, srvPort, _ := net.SplitHostPort(r.SrvAddr)
	tcpPort := mustPort(t, srvPort)
	cases := []struct {
		name string
		udp  func() uint16
		want string
	}{
		{"refused", func() uint16 { return deadUDPPort(t) }, "UDP 4500 is refused (ICMP port unreachable)"},
		{"blocked", func() uint16 { return responder(t, true, 0, -1) }, "UDP 4500 is blocked here (no answer to 3 IKE_SA_INIT probes); use --transport tcp"},
		{"open", func() uint16 { return responder(t, true, 0, 0) }, "UDP 4500 works here"},
		{"lossy", func() uint16 { return responder(t, true, 0, 1) }, "UDP 4500 lost 2 of 3 probes here: it looks rate-limited or lossy"},
		{"translated", func() uint16 { return responder(t, true, 7, 0) }, "UDP 4500 works here"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			port := tc.udp()
			rep, err := Run(context.Background(), Options{Host: "127.0.0.1", UDPPorts: []uint16{port}, TCPPorts: []uint16{tcpPort}, Wait: 200 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			// The report names the port it probed; the verdict says 4500.
			v := strings.ReplaceAll(strings.Join(rep.Verdict, "\n"), "UDP "+itoa(port), "UDP 4500")
			if !strings.Contains(v, tc.want) {
				t.Errorf("verdict:\n%s\nwant %q", v, tc.want)
			}
			if tc.name == "translated" && !rep.UDP[0].Translated {
				t.Errorf("NAT detection missed the changed port: %+v", rep.UDP[0])
			}
		})
	}
}

func itoa(p uint16) string { return strconv.Itoa(int(p)) }

func mustPort(t *testing.T, s string) uint16 {
	ap, err := netip.ParseAddrPort("127.0.0.1:" + s)
	if err != nil {
		t.Fatal(err)
	}
	return ap.Port()
}

// deadUDPPort is a loopback UDP port nothing listens on.
func deadUDPPort(t *testing.T) uint16 {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(c.LocalAddr().(*net.UDPAddr).Port)
	c.Close()
	return port
}
