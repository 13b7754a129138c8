// The end-to-end tests of both roles: a client and a server relaying
// between fake daemons on loopback, over RFC 9329 links.
package relay_test

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/nat/intercept"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/relaytest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestRelayEndToEnd(t *testing.T) {
	for _, ip := range []string{"127.0.0.1", "::1"} {
		t.Run(ip, func(t *testing.T) {
			r := relaytest.NewRig(t, relaytest.RigOptions{IP: ip})
			from := r.Establish(0xf050ac7a151a3b31, 0xc0000001, 0xd0000001)
			if !from.Addr().Is4() && ip == "127.0.0.1" || from.Addr().Is4() && ip == "::1" {
				t.Fatalf("backend saw the session from %v", from)
			}

			// The daemon's NAT keepalives stay off the TCP stream.
			r.Site.Write([]byte{0xff})
			relaytest.ExpectNothing(t, r.Backend, "keepalive from the site")
			relaytest.Eventually(t, "client counts the keepalive", func() bool { return relaytest.Counter(r.Cl.Counters(), "keepalives_dropped") == 1 })
			// And so do the hub's.
			r.Backend.WriteToUDPAddrPort([]byte{0xff}, from)
			relaytest.ExpectNothing(t, r.Site, "keepalive from the hub")
			relaytest.Eventually(t, "server counts the keepalive", func() bool { return relaytest.Counter(r.Srv.Counters(), "keepalives_dropped") == 1 })

			// Many datagrams at once arrive complete and in order.
			for i := range 200 {
				r.Site.Write(relaytest.ESP(0xc0000001, uint32(i+2), 100+i))
			}
			for i := range 200 {
				got, _ := relaytest.Recv(t, r.Backend)
				if want := relaytest.ESP(0xc0000001, uint32(i+2), 100+i); !bytes.Equal(got, want) {
					t.Fatalf("datagram %d: got %d bytes (seq %d), want %d bytes", i, len(got), binary.BigEndian.Uint32(got[4:]), len(want))
				}
			}

			st := r.Srv.Status()
			if len(st.Sessions) != 1 {
				t.Fatalf("server sessions: %d", len(st.Sessions))
			}
			s := st.Sessions[0]
			if s.State != "up" || s.Local != from.String() || s.Transport != "TCP" || s.PacketsIn != 202 || s.PacketsOut != 2 {
				t.Fatalf("server session status: %+v", s)
			}
			if len(s.IKESAs) != 1 || s.IKESAs[0].InitiatorSPI != "f050ac7a151a3b31" || s.IKESAs[0].ResponderSPI != "0000000000005151" {
				t.Fatalf("IKE SAs: %+v", s.IKESAs)
			}
			if len(s.ESPIn) != 1 || s.ESPIn[0] != "c0000001" || len(s.ESPOut) != 1 || s.ESPOut[0] != "d0000001" {
				t.Fatalf("ESP SPIs: in %v out %v", s.ESPIn, s.ESPOut)
			}
			cs := r.Cl.Status()
			if len(cs.Sessions) != 1 || cs.Sessions[0].State != "up" || cs.Sessions[0].PacketsOut != 202 || cs.Sessions[0].PacketsIn != 2 {
				t.Fatalf("client status: %+v", cs.Sessions)
			}
			var text strings.Builder
			if err := st.WriteText(&text, time.Now()); err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{"transport: TCP", "IKE SA: spi f050ac7a151a3b31/0000000000005151", "stat: rxp=202 txp=2", "ESP SPI: in c0000001  out d0000001"} {
				if !strings.Contains(text.String(), want) {
					t.Errorf("status text lacks %q:\n%s", want, text.String())
				}
			}
		})
	}
}

// TestReconnectKeepsSession cuts the client's connection mid-traffic: the
// client reconnects, the session follows, and the backend keeps seeing the
// same source port (so a daemon with MOBIKE on keeps its SAs working).
func TestReconnectKeepsSession(t *testing.T) {
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	from := r.Establish(0x1111, 0xc1, 0xd1)
	first := <-r.Dialed
	first.Close() // as if a middlebox reset it

	deadline := time.Now().Add(5 * time.Second)
	var got []byte
	var from2 netip.AddrPort
	buf := make([]byte, 2048)
	for seq := uint32(10); time.Now().Before(deadline); seq++ {
		r.Site.Write(relaytest.ESP(0xc1, seq, 200))
		r.Backend.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		n, f, err := r.Backend.ReadFromUDPAddrPort(buf)
		if err == nil {
			got, from2 = buf[:n], f
			break
		}
	}
	if got == nil {
		t.Fatal("traffic did not resume after the connection was cut")
	}
	if from2 != from {
		t.Fatalf("backend sees the session move from %v to %v", from, from2)
	}
	// Return traffic uses the new connection.
	r.Backend.WriteToUDPAddrPort(relaytest.ESP(0xd1, 50, 300), from)
	if got, _ := relaytest.Recv(t, r.Site); binary.BigEndian.Uint32(got[4:]) != 50 {
		t.Fatal("return traffic lost after reconnect")
	}
	st := r.Srv.Status()
	if len(st.Sessions) != 1 || st.Sessions[0].Connections != 2 {
		t.Fatalf("want one session carried by 2 connections, got %+v", st.Sessions)
	}
	if relaytest.Counter(r.Srv.Counters(), "rebinds") != 1 || relaytest.Counter(r.Cl.Counters(), "conns_dialed") != 2 {
		t.Fatalf("rebinds %d, dialed %d", relaytest.Counter(r.Srv.Counters(), "rebinds"), relaytest.Counter(r.Cl.Counters(), "conns_dialed"))
	}
}

// TestHotPathDoesNotAllocate relays ESP both ways through client and
// server and checks the whole process allocates far less than once per
// datagram.
func TestHotPathDoesNotAllocate(t *testing.T) {
	if relaytest.RaceEnabled {
		t.Skip("the race detector allocates on its own; make test runs this check without -race")
	}
	r := relaytest.NewRig(t, relaytest.RigOptions{})
	relaytest.CheckHotPath(t, r, r.Establish(0x4242, 0xc9, 0xd9), 0)
}

// BenchmarkRelay measures 1400-byte ESP datagrams per second over
// loopback: "udp-direct" is the baseline, one UDP socket to another with
// no relay; "iketcp" sends the same datagrams from a site socket through
// the client, TCP and the server to a backend socket. Both run in the
// same process and the same run, so their ratio is meaningful.
func BenchmarkRelay(b *testing.B) {
	b.Run("udp-direct", func(b *testing.B) {
		rx, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			b.Fatal(err)
		}
		defer rx.Close()
		relay.SizeSocketBuffers(rx)
		tx, err := net.DialUDP("udp", nil, rx.LocalAddr().(*net.UDPAddr))
		if err != nil {
			b.Fatal(err)
		}
		defer tx.Close()
		relay.SizeSocketBuffers(tx)
		relaytest.MeasureFlow(b, tx, rx)
	})
	b.Run("iketcp", func(b *testing.B) {
		r := relaytest.NewRig(b, relaytest.RigOptions{})
		r.Establish(0x4242, 0xc9, 0xd9)
		relaytest.MeasureFlow(b, r.Site, r.Backend)
	})
	b.Run("iketcp-transparent", func(b *testing.B) {
		r := relaytest.NewRig(b, relaytest.RigOptions{NoCl: true})
		relaytest.MeasureFlow(b, startTransparentClient(b, r), r.Backend)
	})
}

// startTransparentClient starts a client in transparent mode whose TUN
// device and rules live in a private network namespace, together with a
// "daemon" socket there (100.64.0.2:4500) connected to the peer
// 203.0.113.2:4500, so that its datagrams enter the TUN. The client's
// connections, the server and the backend stay in the test's own
// namespace on loopback (the client dials the rig's server whatever the
// peer's address). It runs one IKE exchange so the session exists, and
// returns the daemon's socket.
func startTransparentClient(tb testing.TB, r *relaytest.Rig) *net.UDPConn {
	daemonAddr := netip.MustParseAddrPort("100.64.0.2:4500")
	peer := netip.MustParseAddr("203.0.113.2")
	var tun *intercept.Interceptor
	var daemon *net.UDPConn
	relaytest.InPrivateNetns(tb, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		addr, _ := netlink.ParseAddr(daemonAddr.Addr().String() + "/32")
		if err := netlink.AddrAdd(lo, addr); err != nil {
			return err
		}
		if tun, err = intercept.Open(intercept.Config{Peers: []netip.Addr{peer}, Logger: relaytest.Logger(tb)}); err != nil {
			return err
		}
		daemon, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(daemonAddr), net.UDPAddrFromAddrPort(netip.AddrPortFrom(peer, 4500)))
		if err != nil {
			tun.Close()
			return err
		}
		relay.SizeSocketBuffers(daemon)
		return nil
	})
	tb.Cleanup(func() { daemon.Close(); tun.Close() })
	relaytest.ServeTUN(tb, r, client.Config{Peers: []netip.Addr{peer}}, tun)
	ike := relaytest.IKE(0x4343, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	if _, err := daemon.Write(ike); err != nil {
		tb.Fatal(err)
	}
	got, from := relaytest.Recv(tb, r.Backend)
	if !bytes.Equal(got, ike) {
		tb.Fatal("the IKE message from the daemon did not come through the TUN")
	}
	// The backend answers, which confirms the session: only a confirmed
	// session learns the ESP SPIs its connection carries.
	resp := relaytest.IKE(0x4343, 0x5151, framing.IKESAInit, framing.FlagResponse, 180)
	r.Backend.WriteToUDPAddrPort(resp, from)
	daemon.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2048)
	if n, err := daemon.Read(buf); err != nil || !bytes.Equal(buf[:n], resp) {
		tb.Fatalf("the daemon did not get the IKE_SA_INIT response through the TUN: %v", err)
	}
	daemon.SetReadDeadline(time.Time{})
	return daemon
}
