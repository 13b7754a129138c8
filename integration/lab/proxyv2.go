package lab

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// proxyV2Signature starts every PROXY protocol version 2 header
// (HAProxy's proxy-protocol.txt, 2.2).
const proxyV2Signature = "\r\n\r\n\x00\r\nQUIT\n"

// ProxyV2Header returns a PROXY protocol version 2 header, command PROXY,
// for a TCP connection from src to dst (both IPv4 or both IPv6): what a
// load balancer such as HAProxy (send-proxy-v2) sends first on its
// connection to the server. The lab builds it by hand, from the
// specification, to send it from where no load balancer is.
func ProxyV2Header(src, dst netip.AddrPort) ([]byte, error) {
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	var family byte
	switch {
	case s.Is4() && d.Is4():
		family = 0x11 // AF_INET, STREAM
	case s.Is6() && d.Is6():
		family = 0x21 // AF_INET6, STREAM
	default:
		return nil, fmt.Errorf("PROXY v2 header: %s and %s are not of one family", src, dst)
	}
	addrs := append(s.AsSlice(), d.AsSlice()...)
	addrs = binary.BigEndian.AppendUint16(addrs, src.Port())
	addrs = binary.BigEndian.AppendUint16(addrs, dst.Port())
	h := append([]byte(proxyV2Signature), 0x21, family) // version 2, PROXY
	h = binary.BigEndian.AppendUint16(h, uint16(len(addrs)))
	return append(h, addrs...), nil
}
