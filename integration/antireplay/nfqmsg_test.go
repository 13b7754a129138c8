package antireplay

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/mdlayher/netlink"
)

// The expected bytes below are written out by hand from
// include/uapi/linux/netfilter/nfnetlink_queue.h and nfnetlink.h: netlink
// headers in host order (these tests assume a little-endian host),
// nfnetlink payloads big-endian.

func requireLittleEndian(t *testing.T) {
	t.Helper()
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("the expected bytes are written for a little-endian host")
	}
}

func TestBindRequestBytes(t *testing.T) {
	requireLittleEndian(t)
	want := []byte{
		0x00, 0x00, 0x00, 0x07, // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 7
		0x08, 0x00, 0x01, 0x00, // NFQA_CFG_CMD, 8 bytes
		0x01, 0x00, 0x00, 0x00, // command BIND, pad, pf 0
		0x09, 0x00, 0x02, 0x00, // NFQA_CFG_PARAMS, 9 bytes
		0x00, 0x00, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, // copy_range 256, copy_mode PACKET, padding
		0x08, 0x00, 0x03, 0x00, // NFQA_CFG_QUEUE_MAXLEN
		0x00, 0x00, 0x10, 0x00, // 4096
		0x08, 0x00, 0x04, 0x00, // NFQA_CFG_MASK
		0x00, 0x00, 0x00, 0x05, // FAIL_OPEN | GSO
		0x08, 0x00, 0x05, 0x00, // NFQA_CFG_FLAGS
		0x00, 0x00, 0x00, 0x00, // both off
	}
	got := bindRequest(7, 256, 4096)
	if !bytes.Equal(got, want) {
		t.Fatalf("bind request\n got % x\nwant % x", got, want)
	}
	// The whole message as the netlink package sends it.
	m := netlink.Message{
		Header: netlink.Header{
			Length:   uint32(16 + len(got)),
			Type:     netlink.HeaderType(queueMsgType(nfqnlMsgConfig)),
			Flags:    netlink.Request | netlink.Acknowledge,
			Sequence: 0x11223344,
		},
		Data: got,
	}
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	wantHdr := []byte{
		0x40, 0x00, 0x00, 0x00, // length 64
		0x02, 0x03, // type NFNL_SUBSYS_QUEUE<<8 | NFQNL_MSG_CONFIG
		0x05, 0x00, // NLM_F_REQUEST | NLM_F_ACK
		0x44, 0x33, 0x22, 0x11, // sequence
		0x00, 0x00, 0x00, 0x00, // port ID
	}
	if !bytes.Equal(b[:16], wantHdr) || !bytes.Equal(b[16:], want) {
		t.Fatalf("config message\n got % x\nwant % x % x", b, wantHdr, want)
	}
	checkAttrs(t, got[4:], []uint16{nfqaCfgCmd, nfqaCfgParams, nfqaCfgQueueMaxlen, nfqaCfgMask, nfqaCfgFlags})
}

func TestUnbindRequestBytes(t *testing.T) {
	requireLittleEndian(t)
	want := []byte{
		0x00, 0x00, 0x01, 0x2c, // nfgenmsg, res_id 300
		0x08, 0x00, 0x01, 0x00, // NFQA_CFG_CMD
		0x02, 0x00, 0x00, 0x00, // command UNBIND
	}
	if got := unbindRequest(300); !bytes.Equal(got, want) {
		t.Fatalf("unbind request\n got % x\nwant % x", got, want)
	}
}

func TestVerdictBytes(t *testing.T) {
	requireLittleEndian(t)
	for _, c := range []struct {
		accept  bool
		verdict byte
	}{{true, 1}, {false, 0}} {
		want := []byte{
			0x20, 0x00, 0x00, 0x00, // length 32
			0x01, 0x03, // NFNL_SUBSYS_QUEUE<<8 | NFQNL_MSG_VERDICT
			0x01, 0x00, // NLM_F_REQUEST
			0x00, 0x00, 0x00, 0x00, // sequence
			0x00, 0x00, 0x00, 0x00, // port ID
			0x00, 0x00, 0x00, 0x07, // nfgenmsg, res_id 7
			0x0c, 0x00, 0x02, 0x00, // NFQA_VERDICT_HDR, 12 bytes
			0x00, 0x00, 0x00, c.verdict, // NF_ACCEPT or NF_DROP
			0xde, 0xad, 0xbe, 0xef, // packet ID
		}
		buf := make([]byte, 0, verdictMsgLen)
		got := appendVerdict(buf, 7, 0xdeadbeef, c.accept)
		if !bytes.Equal(got, want) {
			t.Fatalf("verdict accept=%v\n got % x\nwant % x", c.accept, got, want)
		}
		if &got[0] != &buf[:1][0] {
			t.Error("appendVerdict reallocated a buffer with room")
		}
		// The netlink package reads it back the same way.
		var m netlink.Message
		if err := m.UnmarshalBinary(got); err != nil {
			t.Fatal(err)
		}
		if m.Header.Type != 0x0301 || m.Header.Flags != netlink.Request || int(m.Header.Length) != len(got) {
			t.Fatalf("netlink reads the header as %+v", m.Header)
		}
		checkAttrs(t, m.Data[4:], []uint16{nfqaVerdictHdr})
	}
	if n := testing.AllocsPerRun(100, func() { appendVerdict(make([]byte, 0, 64)[:0], 1, 2, true) }); n > 1 {
		t.Errorf("appendVerdict: %v allocations, want none beyond the buffer", n)
	}
}

// checkAttrs decodes attrs with the netlink package and compares the
// types in order.
func checkAttrs(t *testing.T, attrs []byte, types []uint16) {
	t.Helper()
	ad, err := netlink.NewAttributeDecoder(attrs)
	if err != nil {
		t.Fatal(err)
	}
	var got []uint16
	for ad.Next() {
		got = append(got, ad.Type())
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(types) {
		t.Fatalf("attribute types %v, want %v", got, types)
	}
	for i := range got {
		if got[i] != types[i] {
			t.Fatalf("attribute types %v, want %v", got, types)
		}
	}
}

// kernelPacketMsg is an NFQNL_MSG_PACKET as the kernel sends it for a
// forwarded IPv4 packet cut to a 4-byte copy range.
var kernelPacketMsg = []byte{
	0x58, 0x00, 0x00, 0x00, // length 88
	0x00, 0x03, // NFNL_SUBSYS_QUEUE<<8 | NFQNL_MSG_PACKET
	0x00, 0x00, // flags
	0x00, 0x00, 0x00, 0x00, // sequence
	0x00, 0x00, 0x00, 0x00, // port ID
	0x02, 0x00, 0x00, 0x07, // nfgenmsg: AF_INET, V0, queue 7
	0x0b, 0x00, 0x01, 0x00, // NFQA_PACKET_HDR, 11 bytes
	0x00, 0x00, 0x00, 0x2a, 0x08, 0x00, 0x02, 0x00, // id 42, ETH_P_IP, hook FORWARD (2), padding
	0x08, 0x00, 0x05, 0x00, // NFQA_IFINDEX_INDEV
	0x00, 0x00, 0x00, 0x03,
	0x08, 0x00, 0x06, 0x00, // NFQA_IFINDEX_OUTDEV
	0x00, 0x00, 0x00, 0x04,
	0x10, 0x00, 0x09, 0x00, // NFQA_HWADDR, struct nfqnl_msg_packet_hw
	0x00, 0x06, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
	0x08, 0x00, 0x0b, 0x80, // NFQA_CT, nested (skipped)
	0x04, 0x00, 0x01, 0x00,
	0x08, 0x00, 0x0d, 0x00, // NFQA_CAP_LEN
	0x00, 0x00, 0x05, 0xdc, // 1500
	0x08, 0x00, 0x0a, 0x00, // NFQA_PAYLOAD, 4 bytes
	0x45, 0x00, 0x05, 0xdc,
}

func TestParsePacketMsg(t *testing.T) {
	requireLittleEndian(t)
	h, data, rest, err := splitMessage(kernelPacketMsg)
	if err != nil {
		t.Fatal(err)
	}
	if h.Type != queueMsgType(nfqnlMsgPacket) || h.Len != 88 || len(rest) != 0 {
		t.Fatalf("header %+v, %d bytes after it", h, len(rest))
	}
	p, err := parsePacketMsg(data)
	if err != nil {
		t.Fatal(err)
	}
	if p.Queue != 7 || p.ID != 42 || p.HWProtocol != 0x0800 || p.Hook != 2 || p.CapLen != 1500 || p.InDev != 3 || p.OutDev != 4 ||
		!bytes.Equal(p.Payload, []byte{0x45, 0x00, 0x05, 0xdc}) {
		t.Fatalf("parsed %+v; want queue 7, id 42, ETH_P_IP, hook 2, cap_len 1500, in 3, out 4, payload 45 00 05 dc", p)
	}

	// Without NFQA_PACKET_HDR there is no ID to answer.
	if _, err := parsePacketMsg([]byte{2, 0, 0, 7, 8, 0, 10, 0, 1, 2, 3, 4}); err == nil {
		t.Error("packet without NFQA_PACKET_HDR: no error")
	}
	// An attribute longer than the message.
	if _, err := parsePacketMsg([]byte{2, 0, 0, 7, 0x20, 0, 1, 0, 0, 0, 0, 1}); err == nil {
		t.Error("overlong attribute: no error")
	}
	if _, err := parsePacketMsg([]byte{2, 0}); err == nil {
		t.Error("no nfgenmsg: no error")
	}
	// A payload attribute without NFQA_PAYLOAD leaves Payload nil: the
	// tracker drops it as malformed.
	p, err = parsePacketMsg([]byte{2, 0, 0, 7, 11, 0, 1, 0, 0, 0, 0, 9, 8, 0, 2, 0})
	if err != nil || p.ID != 9 || p.Payload != nil {
		t.Fatalf("metadata-only packet: %+v, %v", p, err)
	}
	if v := NewTracker(Config{}).Check(t0, p.Payload); v.Accept {
		t.Fatalf("a packet without payload was accepted: %+v", v)
	}
}

func TestSplitMessages(t *testing.T) {
	requireLittleEndian(t)
	ack := []byte{
		0x24, 0x00, 0x00, 0x00, // length 36
		0x02, 0x00, // NLMSG_ERROR
		0x00, 0x01, // NLM_F_CAPPED
		0x44, 0x33, 0x22, 0x11, // sequence
		0x99, 0x00, 0x00, 0x00, // port ID
		0x00, 0x00, 0x00, 0x00, // error 0: an acknowledgement
		0x40, 0x00, 0x00, 0x00, 0x02, 0x03, 0x05, 0x00, // the request's header
		0x44, 0x33, 0x22, 0x11, 0x99, 0x00, 0x00, 0x00,
	}
	eperm := append([]byte(nil), ack...)
	copy(eperm[16:20], []byte{0xff, 0xff, 0xff, 0xff}) // -EPERM
	dgram := append(append(append([]byte(nil), ack...), kernelPacketMsg...), eperm...)

	var types []uint16
	var errnos []int32
	for b := dgram; len(b) > 0; {
		h, data, rest, err := splitMessage(b)
		if err != nil {
			t.Fatal(err)
		}
		types = append(types, h.Type)
		if h.Type == nlmsgError {
			errno, seq, err := parseErrorMsg(data)
			if err != nil || seq != 0x11223344 || h.Seq != seq {
				t.Fatalf("error message: errno %d seq %#x (header %#x), %v", errno, seq, h.Seq, err)
			}
			errnos = append(errnos, errno)
		}
		b = rest
	}
	if len(types) != 3 || types[0] != nlmsgError || types[1] != 0x0300 || types[2] != nlmsgError {
		t.Fatalf("message types %#x", types)
	}
	if errnos[0] != 0 || errnos[1] != -1 {
		t.Fatalf("errnos %v, want 0 and -1", errnos)
	}

	for _, bad := range [][]byte{
		ack[:15],                         // shorter than a header
		append([]byte{0x08}, ack[1:]...), // length below the header's
		append([]byte{0x40}, ack[1:]...), // length beyond the datagram
	} {
		if _, _, _, err := splitMessage(bad); !errors.Is(err, errShortMessage) {
			t.Errorf("% x: %v, want errShortMessage", bad[:4], err)
		}
	}
	if _, _, err := parseErrorMsg(ack[16:30]); err == nil {
		t.Error("short NLMSG_ERROR: no error")
	}
}
