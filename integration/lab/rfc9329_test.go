package lab

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// ikeMessage is an IKE payload in port-4500 form: the non-ESP marker and
// an IKEv2 header.
func ikeMessage(ispi, rspi uint64, exchange, flags uint8, msgID uint32) []byte {
	b := make([]byte, 4+ikeHeaderSize)
	m := b[4:]
	binary.BigEndian.PutUint64(m[0:], ispi)
	binary.BigEndian.PutUint64(m[8:], rspi)
	m[17] = 0x20 // version 2.0
	m[18] = exchange
	m[19] = flags
	binary.BigEndian.PutUint32(m[20:], msgID)
	binary.BigEndian.PutUint32(m[24:], ikeHeaderSize)
	return b
}

func TestSplitRFC9329(t *testing.T) {
	esp := []byte{0xc0, 0xff, 0xee, 0x01, 0, 0, 0, 7, 0xaa, 0xbb}
	control := append([]byte{0, 0, 0, 0xfe, 1, 1}, make([]byte, 32)...)
	init := ikeMessage(0x1122334455667788, 0, ExchangeIKESAInit, 0x08, 0)
	auth := ikeMessage(0x1122334455667788, 0x99aabbccddeeff00, ExchangeIKEAuth, 0x20, 1)
	stream := []byte(RFC9329Prefix)
	for _, p := range [][]byte{control, init, esp, auth} {
		stream = AppendFrame(stream, p)
	}
	// A frame the capture cut off.
	cut := AppendFrame(nil, esp)
	stream = append(stream, cut[:5]...)

	frames, err := SplitRFC9329(stream)
	if err != nil {
		t.Fatal(err)
	}
	if len(frames) != 4 || !bytes.Equal(frames[2], esp) || !bytes.Equal(frames[3], auth) {
		t.Fatalf("frames = %x", frames)
	}
	if spi, ok := frames[2].ESPSPI(); !ok || spi != 0xc0ffee01 {
		t.Errorf("ESPSPI of ESP = %08x, %v", spi, ok)
	}
	for i, f := range []Frame{frames[0], frames[1], frames[3], Frame(esp[:7])} {
		if spi, ok := f.ESPSPI(); ok {
			t.Errorf("frame %d (%x) taken for ESP with SPI %08x", i, f, spi)
		}
	}
	h, ok := frames[1].IKE()
	if !ok || h.InitiatorSPI != 0x1122334455667788 || h.ResponderSPI != 0 || h.Exchange != ExchangeIKESAInit || h.Response || h.MessageID != 0 {
		t.Errorf("IKE of IKE_SA_INIT = %+v, %v", h, ok)
	}
	h, ok = frames[3].IKE()
	if !ok || h.ResponderSPI != 0x99aabbccddeeff00 || h.Exchange != ExchangeIKEAuth || !h.Response || h.MessageID != 1 {
		t.Errorf("IKE of IKE_AUTH response = %+v, %v", h, ok)
	}
	if _, ok := frames[2].IKE(); ok {
		t.Error("ESP taken for IKE")
	}

	if _, err := SplitRFC9329([]byte("IKETC")); err == nil {
		t.Error("a stream shorter than the prefix was split")
	}
	if _, err := SplitRFC9329(AppendFrame([]byte("NOTIKE"), esp)); err == nil {
		t.Error("a stream without the prefix was split")
	}
	if _, err := SplitRFC9329(append([]byte(RFC9329Prefix), 0, 1, 0xff)); err == nil {
		t.Error("a frame of Length 1 was accepted")
	}
	if frames, err := SplitRFC9329([]byte(RFC9329Prefix)); err != nil || len(frames) != 0 {
		t.Errorf("the bare prefix: %x, %v", frames, err)
	}
}

func TestParseSSEstablished(t *testing.T) {
	out := []byte("0      0      203.0.113.2:4500 203.0.113.1:38384\n" +
		"0      36     [::ffff:127.0.0.1]:14500 [::ffff:127.0.0.1]:4500\n\n")
	conns, err := parseSSEstablished(out)
	if err != nil {
		t.Fatal(err)
	}
	want := []TCPConn{
		{netip.MustParseAddrPort("203.0.113.2:4500"), netip.MustParseAddrPort("203.0.113.1:38384")},
		{netip.MustParseAddrPort("127.0.0.1:14500"), netip.MustParseAddrPort("127.0.0.1:4500")},
	}
	if !slices.Equal(conns, want) {
		t.Errorf("parseSSEstablished = %v, want %v", conns, want)
	}
	if got := conns[0].String(); got != "203.0.113.2:4500 -> 203.0.113.1:38384" {
		t.Errorf("String = %q", got)
	}
	for _, bad := range []string{"ESTAB 0 0\n", "0 0 203.0.113.2 203.0.113.1:1\n"} {
		if _, err := parseSSEstablished([]byte(bad)); err == nil {
			t.Errorf("parseSSEstablished(%q) did not fail", bad)
		}
	}
}

func TestTunnelConns(t *testing.T) {
	one, site, hub := tunnelConns(0, nil)
	if len(one) != 1 || one[0] != (TunnelConn{TunnelName, SiteInner, HubInner}) || len(site) != 1 || site[0].LocalTS != SiteInnerNet || hub[0].RemoteTS != SiteInnerNet {
		t.Errorf("one connection: %+v %+v %+v", one, site, hub)
	}
	off := false
	conns, site, hub := tunnelConns(2, &off)
	if len(conns) != 2 || conns[1] != (TunnelConn{"lab2", "198.51.100.2", "192.0.2.2"}) {
		t.Fatalf("two connections: %+v", conns)
	}
	if site[0].PSK == site[1].PSK || site[0].LocalID == site[1].LocalID || site[1].RemoteTS != "192.0.2.2/32" ||
		hub[1].LocalID != site[1].RemoteID || hub[1].PSK != site[1].PSK || hub[1].RemoteAddrs != "%any" || *hub[1].Mobike {
		t.Errorf("configurations: site %+v, hub %+v", site, hub)
	}
	conf := swanctlConf(site)
	if strings.Count(conf, "connections {") != 1 || strings.Count(conf, "secrets {") != 1 {
		t.Errorf("want one connections and one secrets section:\n%s", conf)
	}
	for _, want := range []string{"    lab1 {", "    lab2 {", "ike-lab1 {", "ike-lab2 {", "id = site-2.iketcp.test", "local_ts = 198.51.100.2/32"} {
		if !strings.Contains(conf, want) {
			t.Errorf("swanctl.conf lacks %q:\n%s", want, conf)
		}
	}
}
