package dial

import (
	"bufio"
	"bytes"
	"io"
	"strconv"
	"testing"
	"unicode"
)

// FuzzReadResponse: whatever a proxy answers, reading it ends in a
// status or an error, within the bound, with a status fit for a log line.
func FuzzReadResponse(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 200 Connection established\r\n\r\n",
		"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nearly",
		"HTTP/1.1 200\r\n\r\n",
		"HTTP/1.1 2000 OK\r\n\r\n",
		"SSH-2.0-OpenSSH_9.2\r\n",
		"HTTP/1.1 403 \x00\x1b[31m\r\n\r\n",
		"HTTP/1.1 200 OK\r\nX: a\r\n continued\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bufio.NewReaderSize(io.LimitReader(bytes.NewReader(data), maxProxyResponse), 4096)
		code, status, _, err := readResponse(br)
		if err != nil {
			return
		}
		if code < 200 || code > 999 {
			t.Fatalf("code %d", code)
		}
		if _, err := strconv.Unquote(status); err == nil {
			return // quoted: escapes, no control characters
		}
		for _, r := range status {
			if !unicode.IsPrint(r) {
				t.Fatalf("status %q is not printable", status)
			}
		}
	})
}
