package main

import (
	"slices"
	"strings"
	"testing"
)

func TestPlanListen(t *testing.T) {
	for _, tc := range []struct {
		name     string
		listen   []string
		encap    string
		port     uint
		set      bool
		want     []string
		redirect uint16
		err      string
	}{
		{name: "default", encap: "rfc9329", want: []string{"rfc9329://:4500"}},
		{name: "default fake-tcp", encap: "fake-tcp", want: []string{"fake-tcp://:4500"}},
		{name: "ike-tcp-port 4500", encap: "rfc9329", port: 4500, set: true, want: []string{"rfc9329://:4500"}},
		{name: "ike-tcp-port 443", encap: "rfc9329", port: 443, set: true, want: []string{"rfc9329://:4500", "rfc9329://:11443"}, redirect: 443},
		{name: "ike-tcp-port 11443", encap: "rfc9329", port: 11443, set: true, want: []string{"rfc9329://:4500", "rfc9329://:11443"}},
		{name: "both encaps", encap: "rfc9329", listen: []string{":4500", "fake-tcp://:4501"}, want: []string{"rfc9329://:4500", "fake-tcp://:4501"}},
		{name: "listen and ike-tcp-port", encap: "rfc9329", listen: []string{"[::1]:4600"}, port: 8443, set: true,
			want: []string{"rfc9329://[::1]:4600", "rfc9329://:4500", "rfc9329://:11443"}, redirect: 8443},
		{name: "two fake-tcp ports", encap: "fake-tcp", listen: []string{":1", ":2"}, err: "one fake-tcp"},
		{name: "two fake-tcp addresses of one port", encap: "fake-tcp", listen: []string{"203.0.113.2:4500", "100.64.2.2:4500"},
			want: []string{"fake-tcp://203.0.113.2:4500", "fake-tcp://100.64.2.2:4500"}},
		{name: "bad scheme", encap: "rfc9329", listen: []string{"udp://:1"}, err: "not udp://"},
		{name: "no port", encap: "rfc9329", listen: []string{"host"}, err: "want [rfc9329://|fake-tcp://]host:port"},
		{name: "port 0", encap: "rfc9329", port: 0, set: true, err: "want 1 to 65535"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			specs, redirect, err := planListen(tc.listen, tc.encap, tc.port, tc.set)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one saying %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, s := range specs {
				got = append(got, s.String())
			}
			if !slices.Equal(got, tc.want) || redirect != tc.redirect {
				t.Fatalf("got %v, redirect %d; want %v, redirect %d", got, redirect, tc.want, tc.redirect)
			}
		})
	}
}
