package antireplay

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The nfnetlink_queue protocol, from the kernel's
// include/uapi/linux/netfilter/nfnetlink_queue.h, nfnetlink.h and
// netfilter.h. Multi-byte fields of the nfnetlink payload are big-endian;
// the netlink headers (nlmsghdr, nlattr) are in host order.
const (
	nlmsgHdrLen = 16
	nfgenHdrLen = 4
	nlaHdrLen   = 4

	nlmsgError = 2 // NLMSG_ERROR

	nlmFRequest = 0x1 // NLM_F_REQUEST
	nlmFAck     = 0x4 // NLM_F_ACK

	nfnlSubsysQueue = 3 // NFNL_SUBSYS_QUEUE
	nfnetlinkV0     = 0 // NFNETLINK_V0

	nfqnlMsgPacket  = 0 // NFQNL_MSG_PACKET
	nfqnlMsgVerdict = 1 // NFQNL_MSG_VERDICT
	nfqnlMsgConfig  = 2 // NFQNL_MSG_CONFIG

	// enum nfqnl_attr_type
	nfqaPacketHdr  = 1  // NFQA_PACKET_HDR: struct nfqnl_msg_packet_hdr
	nfqaVerdictHdr = 2  // NFQA_VERDICT_HDR: struct nfqnl_msg_verdict_hdr
	nfqaIfIndevIdx = 5  // NFQA_IFINDEX_INDEV: __be32
	nfqaIfOutdev   = 6  // NFQA_IFINDEX_OUTDEV: __be32
	nfqaPayload    = 10 // NFQA_PAYLOAD
	nfqaCapLen     = 13 // NFQA_CAP_LEN: __be32, the packet's length before the copy range cut it

	// enum nfqnl_attr_config
	nfqaCfgCmd         = 1 // NFQA_CFG_CMD: struct nfqnl_msg_config_cmd
	nfqaCfgParams      = 2 // NFQA_CFG_PARAMS: struct nfqnl_msg_config_params
	nfqaCfgQueueMaxlen = 3 // NFQA_CFG_QUEUE_MAXLEN: __be32
	nfqaCfgMask        = 4 // NFQA_CFG_MASK: __be32
	nfqaCfgFlags       = 5 // NFQA_CFG_FLAGS: __be32

	nfqnlCfgCmdBind   = 1 // NFQNL_CFG_CMD_BIND
	nfqnlCfgCmdUnbind = 2 // NFQNL_CFG_CMD_UNBIND

	nfqnlCopyPacket = 2 // NFQNL_COPY_PACKET

	nfqaCfgFFailOpen = 1 << 0 // NFQA_CFG_F_FAIL_OPEN
	nfqaCfgFGSO      = 1 << 2 // NFQA_CFG_F_GSO

	nfDrop   = 0 // NF_DROP
	nfAccept = 1 // NF_ACCEPT

	nlaTypeMask = 0x3fff // strips NLA_F_NESTED and NLA_F_NET_BYTEORDER
)

// queueMsgType is the netlink message type of an nfnetlink_queue message.
func queueMsgType(msg uint16) uint16 { return nfnlSubsysQueue<<8 | msg }

// appendNfgen appends struct nfgenmsg: family, version, res_id (the queue
// number, big-endian).
func appendNfgen(b []byte, queue uint16) []byte {
	return binary.BigEndian.AppendUint16(append(b, 0 /* AF_UNSPEC */, nfnetlinkV0), queue)
}

// appendAttr appends one netlink attribute, padded to 4 bytes.
func appendAttr(b []byte, typ uint16, payload ...byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(nlaHdrLen+len(payload)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, payload...)
	for range (4 - len(payload)%4) % 4 {
		b = append(b, 0)
	}
	return b
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// bindRequest is the payload (after nlmsghdr) of the NFQNL_MSG_CONFIG
// message that binds the queue, copies the first copyRange bytes of every
// packet, allows maxLen packets to wait, and clears FAIL_OPEN (a full
// queue drops) and GSO (the kernel segments GSO packets before queueing
// them, so every segment on the wire gets its own verdict). The kernel
// handles the command first and the parameters after it, in one message.
func bindRequest(queue uint16, copyRange, maxLen uint32) []byte {
	b := appendNfgen(nil, queue)
	b = appendAttr(b, nfqaCfgCmd, nfqnlCfgCmdBind, 0, 0, 0)
	b = appendAttr(b, nfqaCfgParams, append(be32(copyRange), nfqnlCopyPacket)...)
	b = appendAttr(b, nfqaCfgQueueMaxlen, be32(maxLen)...)
	b = appendAttr(b, nfqaCfgMask, be32(nfqaCfgFFailOpen|nfqaCfgFGSO)...)
	b = appendAttr(b, nfqaCfgFlags, be32(0)...)
	return b
}

// unbindRequest is the payload of the NFQNL_MSG_CONFIG message that
// unbinds the queue; the kernel drops the packets still waiting in it.
func unbindRequest(queue uint16) []byte {
	return appendAttr(appendNfgen(nil, queue), nfqaCfgCmd, nfqnlCfgCmdUnbind, 0, 0, 0)
}

// verdictMsgLen is the length of a whole verdict message.
const verdictMsgLen = nlmsgHdrLen + nfgenHdrLen + nlaHdrLen + 8

// appendVerdict appends a whole NFQNL_MSG_VERDICT message (nlmsghdr
// included, sequence 0, no ACK requested) for packet id. It does not
// allocate when b has room for verdictMsgLen more bytes.
func appendVerdict(b []byte, queue uint16, id uint32, accept bool) []byte {
	verdict := uint32(nfDrop)
	if accept {
		verdict = nfAccept
	}
	b = binary.NativeEndian.AppendUint32(b, verdictMsgLen)
	b = binary.NativeEndian.AppendUint16(b, queueMsgType(nfqnlMsgVerdict))
	b = binary.NativeEndian.AppendUint16(b, nlmFRequest)
	b = binary.NativeEndian.AppendUint32(b, 0) // sequence
	b = binary.NativeEndian.AppendUint32(b, 0) // port ID: the kernel fills it in
	b = appendNfgen(b, queue)
	b = binary.NativeEndian.AppendUint16(b, nlaHdrLen+8)
	b = binary.NativeEndian.AppendUint16(b, nfqaVerdictHdr)
	b = binary.BigEndian.AppendUint32(b, verdict)
	return binary.BigEndian.AppendUint32(b, id)
}

// nlHeader is a decoded nlmsghdr.
type nlHeader struct {
	Len   uint32
	Type  uint16
	Flags uint16
	Seq   uint32
	PID   uint32
}

var errShortMessage = errors.New("netlink message shorter than its header says")

// splitMessage takes the first netlink message off a datagram: its
// header, its payload and the messages after it.
func splitMessage(b []byte) (h nlHeader, data, rest []byte, err error) {
	if len(b) < nlmsgHdrLen {
		return h, nil, nil, errShortMessage
	}
	h = nlHeader{
		Len:   binary.NativeEndian.Uint32(b[0:4]),
		Type:  binary.NativeEndian.Uint16(b[4:6]),
		Flags: binary.NativeEndian.Uint16(b[6:8]),
		Seq:   binary.NativeEndian.Uint32(b[8:12]),
		PID:   binary.NativeEndian.Uint32(b[12:16]),
	}
	if h.Len < nlmsgHdrLen || int(h.Len) > len(b) {
		return h, nil, nil, errShortMessage
	}
	next := min(int(align4(h.Len)), len(b))
	return h, b[nlmsgHdrLen:h.Len], b[next:], nil
}

func align4(n uint32) uint32 { return (n + 3) &^ 3 }

// queuedPacket is a decoded NFQNL_MSG_PACKET.
type queuedPacket struct {
	Queue      uint16 // res_id of the nfgenmsg
	ID         uint32
	HWProtocol uint16 // EtherType, e.g. 0x0800 for IPv4
	Hook       uint8  // netfilter hook (NF_INET_FORWARD is 2)
	Payload    []byte // the packet from its IP header, at most the copy range long; nil without NFQA_PAYLOAD
	CapLen     uint32 // the packet's full length when Payload was cut, else 0
	InDev      uint32 // ifindex, 0 if absent
	OutDev     uint32
	hasHdr     bool
}

// parsePacketMsg decodes the payload of an NFQNL_MSG_PACKET. Payload
// points into data.
func parsePacketMsg(data []byte) (queuedPacket, error) {
	var p queuedPacket
	if len(data) < nfgenHdrLen {
		return p, fmt.Errorf("packet message of %d bytes has no nfgenmsg", len(data))
	}
	p.Queue = binary.BigEndian.Uint16(data[2:4])
	attrs := data[nfgenHdrLen:]
	for len(attrs) >= nlaHdrLen {
		l := int(binary.NativeEndian.Uint16(attrs[0:2]))
		typ := binary.NativeEndian.Uint16(attrs[2:4]) & nlaTypeMask
		if l < nlaHdrLen || l > len(attrs) {
			return p, fmt.Errorf("packet message attribute %d has length %d of %d bytes left", typ, l, len(attrs))
		}
		v := attrs[nlaHdrLen:l]
		switch typ {
		case nfqaPacketHdr:
			if len(v) < 7 {
				return p, fmt.Errorf("NFQA_PACKET_HDR of %d bytes, want 7", len(v))
			}
			p.ID = binary.BigEndian.Uint32(v[0:4])
			p.HWProtocol = binary.BigEndian.Uint16(v[4:6])
			p.Hook = v[6]
			p.hasHdr = true
		case nfqaPayload:
			p.Payload = v
		case nfqaCapLen:
			if len(v) >= 4 {
				p.CapLen = binary.BigEndian.Uint32(v)
			}
		case nfqaIfIndevIdx:
			if len(v) >= 4 {
				p.InDev = binary.BigEndian.Uint32(v)
			}
		case nfqaIfOutdev:
			if len(v) >= 4 {
				p.OutDev = binary.BigEndian.Uint32(v)
			}
		}
		next := int(align4(uint32(l)))
		if next >= len(attrs) {
			break
		}
		attrs = attrs[next:]
	}
	if !p.hasHdr {
		return p, errors.New("packet message without NFQA_PACKET_HDR")
	}
	return p, nil
}

// parseErrorMsg decodes the payload of an NLMSG_ERROR: the error code (0
// for an acknowledgement, else a negative errno) and the sequence number
// of the request it answers.
func parseErrorMsg(data []byte) (errno int32, seq uint32, err error) {
	if len(data) < 4+nlmsgHdrLen {
		return 0, 0, fmt.Errorf("NLMSG_ERROR of %d bytes, want at least %d", len(data), 4+nlmsgHdrLen)
	}
	return int32(binary.NativeEndian.Uint32(data[0:4])), binary.NativeEndian.Uint32(data[4+8 : 4+12]), nil
}
