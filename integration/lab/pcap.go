package lab

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// TCPFlag selects one TCP header flag for CountTCPFlags.
type TCPFlag uint8

// TCP flags.
const (
	TCPFlagFIN TCPFlag = 1 << iota
	TCPFlagSYN
	TCPFlagRST
	TCPFlagPSH
	TCPFlagACK
)

func (f TCPFlag) set(tcp *layers.TCP) bool {
	switch f {
	case TCPFlagFIN:
		return tcp.FIN
	case TCPFlagSYN:
		return tcp.SYN
	case TCPFlagRST:
		return tcp.RST
	case TCPFlagPSH:
		return tcp.PSH
	case TCPFlagACK:
		return tcp.ACK
	}
	return false
}

// tcpSegment is one TCP segment from a capture with its IP endpoints.
type tcpSegment struct {
	src, dst string // "addr:port"
	tcp      *layers.TCP
}

// readTCPSegments decodes every IPv4/IPv6 TCP segment in a pcap file.
func readTCPSegments(pcapPath string) ([]tcpSegment, error) {
	f, err := os.Open(pcapPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		return nil, fmt.Errorf("read pcap %s: %w", pcapPath, err)
	}
	var segs []tcpSegment
	for {
		data, _, err := r.ReadPacketData()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			// A capture cut off mid-packet still yields what came before.
			return segs, nil
		}
		if err != nil {
			return segs, fmt.Errorf("read pcap %s: %w", pcapPath, err)
		}
		pkt := gopacket.NewPacket(data, r.LinkType(), gopacket.DecodeOptions{Lazy: true, NoCopy: true})
		tcp, ok := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if !ok {
			continue
		}
		var srcIP, dstIP string
		switch ip := pkt.NetworkLayer().(type) {
		case *layers.IPv4:
			srcIP, dstIP = ip.SrcIP.String(), ip.DstIP.String()
		case *layers.IPv6:
			srcIP, dstIP = "["+ip.SrcIP.String()+"]", "["+ip.DstIP.String()+"]"
		default:
			continue
		}
		segs = append(segs, tcpSegment{
			src: fmt.Sprintf("%s:%d", srcIP, tcp.SrcPort),
			dst: fmt.Sprintf("%s:%d", dstIP, tcp.DstPort),
			tcp: tcp,
		})
	}
}

// FirstTCPPayload returns the first n bytes that a client sent to a server
// on dstPort in the pcap file: it finds the first segment toward dstPort
// that carries payload and reassembles that connection's client-to-server
// byte stream from there (in sequence order, ignoring retransmissions)
// until it has n bytes. It fails if the capture holds fewer.
func FirstTCPPayload(pcapPath string, dstPort uint16, n int) ([]byte, error) {
	if n <= 0 {
		return nil, errors.New("FirstTCPPayload: n must be positive")
	}
	stream, err := clientStream(pcapPath, dstPort, n)
	if err != nil {
		return nil, err
	}
	if len(stream) < n {
		return stream, fmt.Errorf("%s: only %d bytes of payload toward port %d, wanted %d", pcapPath, len(stream), dstPort, n)
	}
	return stream[:n], nil
}

// ClientStream returns what the first client that sent payload to a
// server on dstPort in the pcap file sent on that connection, as one byte
// stream: reassembled in sequence order, retransmissions ignored, up to
// the first gap the capture has.
func ClientStream(pcapPath string, dstPort uint16) ([]byte, error) {
	return clientStream(pcapPath, dstPort, math.MaxInt)
}

// clientStream is ClientStream, stopping once it has at least limit bytes.
func clientStream(pcapPath string, dstPort uint16, limit int) ([]byte, error) {
	segs, err := readTCPSegments(pcapPath)
	if err != nil {
		return nil, err
	}
	first := slices.IndexFunc(segs, func(s tcpSegment) bool {
		return uint16(s.tcp.DstPort) == dstPort && len(s.tcp.Payload) > 0
	})
	if first < 0 {
		return nil, fmt.Errorf("%s: no TCP payload toward port %d", pcapPath, dstPort)
	}
	return reassemble(segs[first:], segs[first].src, segs[first].dst, limit), nil
}

// reassemble returns the byte stream that src sent to dst in segs, from
// the first segment that carries payload on, in sequence order,
// retransmissions ignored, up to the first gap, stopping once it has at
// least limit bytes.
func reassemble(segs []tcpSegment, src, dst string, limit int) []byte {
	first := slices.IndexFunc(segs, func(s tcpSegment) bool {
		return s.src == src && s.dst == dst && len(s.tcp.Payload) > 0
	})
	if first < 0 {
		return nil
	}
	start := segs[first].tcp.Seq
	var stream []byte
	// Each pass appends every segment that continues the stream; bounded by
	// the number of segments since each useful pass consumes at least one.
	for range len(segs) {
		progress := false
		for _, s := range segs[first:] {
			if s.src != src || s.dst != dst || len(s.tcp.Payload) == 0 {
				continue
			}
			// Offset of this segment in the stream (uint32 arithmetic
			// handles sequence wrap-around).
			off := int(s.tcp.Seq - start)
			end := off + len(s.tcp.Payload)
			if off < 0 || off > len(stream) || end <= len(stream) || off > 1<<30 {
				continue
			}
			stream = append(stream, s.tcp.Payload[len(stream)-off:]...)
			progress = true
		}
		if len(stream) >= limit || !progress {
			break
		}
	}
	return stream
}

// TCPStream is one TCP connection of a capture: its ends, and what each
// sent.
type TCPStream struct {
	// Client and Server are the ends, "addr:port"; the server's port is
	// the one TCPStreams was asked for.
	Client, Server string
	// FromClient and FromServer are what each end sent, reassembled as
	// ClientStream does.
	FromClient, FromServer []byte
}

// TCPStreams returns the connections to a server on dstPort in the pcap
// file that carried payload either way, in the order their first payload
// appears.
func TCPStreams(pcapPath string, dstPort uint16) ([]TCPStream, error) {
	segs, err := readTCPSegments(pcapPath)
	if err != nil {
		return nil, err
	}
	type ends struct{ client, server string }
	var order []ends
	seen := make(map[ends]bool)
	for _, s := range segs {
		if len(s.tcp.Payload) == 0 {
			continue
		}
		var e ends
		switch {
		case uint16(s.tcp.DstPort) == dstPort:
			e = ends{s.src, s.dst}
		case uint16(s.tcp.SrcPort) == dstPort:
			e = ends{s.dst, s.src}
		default:
			continue
		}
		if !seen[e] {
			seen[e] = true
			order = append(order, e)
		}
	}
	streams := make([]TCPStream, 0, len(order))
	for _, e := range order {
		streams = append(streams, TCPStream{
			Client: e.client, Server: e.server,
			FromClient: reassemble(segs, e.client, e.server, math.MaxInt),
			FromServer: reassemble(segs, e.server, e.client, math.MaxInt),
		})
	}
	return streams, nil
}

// CountTCPFlags counts the TCP segments in the pcap file that have flag set,
// e.g. TCPFlagRST to count resets.
func CountTCPFlags(pcapPath string, flag TCPFlag) (int, error) {
	segs, err := readTCPSegments(pcapPath)
	if err != nil {
		return 0, err
	}
	count := 0
	for _, s := range segs {
		if flag.set(s.tcp) {
			count++
		}
	}
	return count, nil
}

// CountTCPLonger counts the TCP packets in a pcap file whose IP packet is
// longer than n bytes: where the capture ran on a device that receives
// super-segments whole (a veth), a TCP sender's super-segments that
// crossed it uncut.
func CountTCPLonger(pcapPath string, n int) (int, error) {
	f, err := os.Open(pcapPath)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		return 0, fmt.Errorf("read pcap %s: %w", pcapPath, err)
	}
	count := 0
	for {
		data, _, err := r.ReadPacketData()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return count, nil
		}
		if err != nil {
			return count, fmt.Errorf("read pcap %s: %w", pcapPath, err)
		}
		pkt := gopacket.NewPacket(data, r.LinkType(), gopacket.DecodeOptions{Lazy: true, NoCopy: true})
		if pkt.Layer(layers.LayerTypeTCP) == nil {
			continue
		}
		size := 0
		switch ip := pkt.NetworkLayer().(type) {
		case *layers.IPv4:
			size = int(ip.Length)
		case *layers.IPv6:
			size = 40 + int(ip.Length)
		}
		if size > n {
			count++
		}
	}
}
