package relay

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/nat/intercept"
	"github.com/iketcp/iketcp/relay/relaytest"
)

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
		growSocketBuffers(rx)
		tx, err := net.DialUDP("udp", nil, rx.LocalAddr().(*net.UDPAddr))
		if err != nil {
			b.Fatal(err)
		}
		defer tx.Close()
		growSocketBuffers(tx)
		relaytest.MeasureFlow(b, tx, rx)
	})
	b.Run("iketcp", func(b *testing.B) {
		r := newRig(b, rigOptions{})
		r.establish(0x4242, 0xc9, 0xd9)
		relaytest.MeasureFlow(b, r.site, r.backend)
	})
	b.Run("iketcp-transparent", func(b *testing.B) {
		r := newRig(b, rigOptions{noCl: true})
		relaytest.MeasureFlow(b, startTransparentClient(b, r), r.backend)
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
func startTransparentClient(tb testing.TB, r *rig) *net.UDPConn {
	daemonAddr := netip.MustParseAddrPort("100.64.0.2:4500")
	peer := netip.MustParseAddr("203.0.113.2")
	var tun *intercept.Interceptor
	var daemon *net.UDPConn
	inPrivateNetns(tb, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		addr, _ := netlink.ParseAddr(daemonAddr.Addr().String() + "/32")
		if err := netlink.AddrAdd(lo, addr); err != nil {
			return err
		}
		if tun, err = intercept.Open(intercept.Config{Peers: []netip.Addr{peer}, Logger: testLogger(tb)}); err != nil {
			return err
		}
		daemon, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(daemonAddr), net.UDPAddrFromAddrPort(netip.AddrPortFrom(peer, 4500)))
		if err != nil {
			tun.Close()
			return err
		}
		growSocketBuffers(daemon)
		return nil
	})
	tb.Cleanup(func() { daemon.Close(); tun.Close() })
	serveTUN(tb, r, ClientConfig{Peers: []netip.Addr{peer}}, tun)
	ike := ikeDatagram(0x4343, 0, framing.IKESAInit, framing.FlagInitiator, 200)
	if _, err := daemon.Write(ike); err != nil {
		tb.Fatal(err)
	}
	if got, _ := recv(tb, r.backend); !bytes.Equal(got, ike) {
		tb.Fatal("the IKE message from the daemon did not come through the TUN")
	}
	return daemon
}
