package framing

import (
	"testing"
)

// clientHelloStart is the first bytes of a TLS 1.3 ClientHello record.
var clientHelloStart = []byte{22, 3, 1, 0x02, 0x00, 1, 0x00, 0x01, 0xfc, 3, 3}

func TestSniff(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Opening
	}{
		{"", OpeningMore},
		{"I", OpeningMore},
		{"IKETC", OpeningMore},
		{"IKETCP", OpeningIKETCP},
		{"IKETCP\x00\x10", OpeningIKETCP},
		{"IKETCX", OpeningMore}, // a method named IKETCX?
		{"IKETCX\x00", OpeningOther},
		{string(clientHelloStart[:1]), OpeningMore},
		{string(clientHelloStart[:5]), OpeningMore},
		{string(clientHelloStart), OpeningTLS},
		{"\x16\x03\x01\x00\x00\x01", OpeningOther},     // an empty record
		{"\x16\x03\x01\x40\x01\x01", OpeningOther},     // longer than a plaintext record
		{"\x16\x03\x05\x01\x00\x01", OpeningOther},     // no such version
		{"\x16\x03\x01\x01\x00\x02", OpeningOther},     // a ServerHello
		{"\x16\x02\x00\x01\x00\x01", OpeningOther},     // SSL 2
		{"\x17\x03\x03\x00\x20\x00", OpeningOther},     // application data
		{"\x80\x2e\x01\x03\x01\x00\x15", OpeningOther}, // an SSL 2 compatible hello
		{"PROXY", OpeningMore},                         // PROXY v1, or a PROXYFIND method
		{"PROXY ", OpeningProxyV1},                     // even if a method named PROXY followed
		{"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n", OpeningProxyV1},
		{"\r\n\r\n\x00\r\nQUI", OpeningMore},
		{ProxyV2Signature, OpeningProxyV2},
		{"\r\n\r\n\x00\r\nQUIX", OpeningOther},
		{"GET", OpeningMore},
		{"GET / HTTP/1.", OpeningMore},
		{"GET / HTTP/1.1\r", OpeningMore},
		{"GET / HTTP/1.1\r\n", OpeningHTTP},
		{"GET / HTTP/1.1\n", OpeningHTTP},
		{"GET / HTTP/1.1\rX", OpeningOther},
		{"POST /x?y=1 HTTP/1.0\r\nHost: a\r\n\r\n", OpeningHTTP},
		{"VERSION-CONTROL /r HTTP/1.1\r\n", OpeningHTTP},
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", OpeningHTTP},
		{"CONNECT example.com:443 HTTP/1.1\r\n", OpeningHTTP},
		{"get / HTTP/1.1\r\n", OpeningOther},  // methods are case-sensitive
		{"GE / HTTP/1.1\r\n", OpeningOther},   // too short a method
		{"GET  / HTTP/1.1\r\n", OpeningOther}, // an empty target
		{"GET /\x01 HTTP/1.1\r\n", OpeningOther},
		{"GET / HTTP/x.1\r\n", OpeningOther},
		{"GET / FTP/1.1\r\n", OpeningOther},
		{"GET / HTTP/1.1 \r\n", OpeningOther},
		{"ABCDEFGHIJKLMNOPQRSTUVWXY / HTTP/1.1\r\n", OpeningOther}, // too long a method
		{"SSH-2.0-OpenSSH_9.2\r\n", OpeningOther},
		{"\x00\x00\x00\x00", OpeningOther},
		{"\xff", OpeningOther},
	} {
		if got := Sniff([]byte(tc.in)); got != tc.want {
			t.Errorf("Sniff(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestSniffDoesNotAllocate(t *testing.T) {
	inputs := [][]byte{[]byte("IKETCP"), clientHelloStart, []byte("GET /index.html HTTP/1.1\r\n"), []byte(ProxyV2Signature), []byte("garbage")}
	if n := testing.AllocsPerRun(1000, func() {
		for _, in := range inputs {
			Sniff(in)
		}
	}); n != 0 {
		t.Errorf("Sniff allocates %v times per run", n)
	}
}

// FuzzSniff checks that Sniff's answer is final: once it is not
// OpeningMore, every longer stream gets the same answer, and every shorter
// one got OpeningMore or the same.
func FuzzSniff(f *testing.F) {
	f.Add([]byte("IKETCP\x00\x08"))
	f.Add(clientHelloStart)
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nIKETCP"))
	f.Add([]byte(ProxyV2Signature + "\x21\x11\x00\x0c"))
	f.Add([]byte("PRI * HTTP/2.0\r\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		final := Sniff(in)
		if final > OpeningOther {
			t.Fatalf("Sniff returned %d", final)
		}
		decided := OpeningMore
		for n := 0; n <= len(in); n++ {
			o := Sniff(in[:n])
			if decided != OpeningMore && o != decided {
				t.Fatalf("Sniff(%q) = %v after Sniff(%q) = %v", in[:n], o, in[:n-1], decided)
			}
			decided = o
		}
		if final == OpeningIKETCP && string(in[:len(Prefix)]) != Prefix {
			t.Fatalf("IKETCP for %q", in)
		}
	})
}
