package main

import (
	"strings"
	"testing"
)

// TestCalledFindings: only findings whose trace reaches a function count,
// once per vulnerability.
func TestCalledFindings(t *testing.T) {
	stream := `{"config":{"protocol_version":"v1.0.0"}}
{"finding":{"osv":"GO-1","fixed_version":"v1.26.9","trace":[{"module":"stdlib","version":"v1.26.8"}]}}
{"finding":{"osv":"GO-2","fixed_version":"v1.26.9","trace":[{"module":"stdlib","version":"v1.26.8","package":"crypto/tls","function":"Handshake","receiver":"*Conn"},{"module":"github.com/iketcp/iketcp","function":"serveConn"}]}}
{"finding":{"osv":"GO-2","fixed_version":"v1.26.9","trace":[{"module":"stdlib","version":"v1.26.8","package":"crypto/tls","function":"Read"}]}}
{"finding":{"osv":"GO-3","fixed_version":"v0.5.0","trace":[{"module":"example.com/m","version":"v0.4.0","package":"example.com/m"}]}}
`
	got, err := calledFindings(strings.NewReader(stream))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].OSV != "GO-2" {
		t.Fatalf("called findings %+v, want GO-2 alone", got)
	}
}

func TestNewerGo(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"v1.26.9", "v1.26.8", true},
		{"v1.26.8", "v1.26.8", false},
		{"v1.26.10", "v1.26.9", true},
		{"v1.27.0", "v1.26.12", true},
		{"v1.25.3", "v1.26.0", false},
		{"v1.27.0-rc.1", "v1.26.8", true},
	} {
		if got := newerGo(tc.a, tc.b); got != tc.want {
			t.Errorf("newerGo(%s, %s) = %v", tc.a, tc.b, got)
		}
	}
}
