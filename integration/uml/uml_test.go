package uml

import (
	"strings"
	"testing"
	"time"
)

func TestMissingOptions(t *testing.T) {
	fragment := "# comment\nCONFIG_A=y\nCONFIG_B=n\nCONFIG_C=4\nCONFIG_D=y\n"
	config := "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=2\n"
	got := missingOptions(fragment, config)
	want := []string{"CONFIG_C=4", "CONFIG_D=y"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("missingOptions = %q, want %q", got, want)
	}
	if got := missingOptions("CONFIG_B=n\n", "CONFIG_B=y\n"); len(got) != 1 {
		t.Errorf("an option the fragment turns off but the config has on is not reported: %q", got)
	}
	// The fragment in the repository asks for what the tests rely on.
	for _, opt := range []string{"CONFIG_INET_ESPINTCP=y", "CONFIG_XFRM_USER=y", "CONFIG_HOSTFS=y", "CONFIG_UML_NET_VECTOR=y", "CONFIG_INET_DIAG_DESTROY=y"} {
		if !strings.Contains(string(kernelConfig), opt+"\n") {
			t.Errorf("kernel.config lacks %s", opt)
		}
	}
}

func TestPlutoConfig(t *testing.T) {
	conf, secrets, err := plutoConfig(PlutoOptions{ListenTCP: true, Conns: []PlutoConn{{
		Name: "lab", Left: "100.64.1.2", LeftID: "@hub.example", LeftSubnet: "192.0.2.0/24",
		Right: "%any", RightID: "@site.example", RightSubnet: "198.51.100.0/24",
		PSK: "not-a-secret", EnableTCP: "yes", TCPRemotePort: 10500,
		RetransmitTimeout: 30 * time.Second, DPDDelay: 2 * time.Second,
	}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"\tlisten-tcp=yes\n", "conn lab\n", "\tenable-tcp=yes\n", "\ttcp-remoteport=10500\n",
		"\tike=aes128-sha2_256-modp2048\n", "\tesp=aes128-sha2_256\n", "\tpfs=no\n", "\tretransmit-timeout=30s\n",
		"\tdpddelay=2s\n", "\tdpdtimeout=6s\n", "\tauto=add\n", "\tright=%any\n"} {
		if !strings.Contains(conf, want) {
			t.Errorf("ipsec.conf lacks %q:\n%s", want, conf)
		}
	}
	if secrets != "@hub.example @site.example : PSK \"not-a-secret\"\n" {
		t.Errorf("ipsec.secrets = %q", secrets)
	}
	if _, _, err := plutoConfig(PlutoOptions{Conns: []PlutoConn{{Name: "a b", Left: "x", Right: "y", PSK: "z"}}}); err == nil {
		t.Error("a connection name with a space was accepted")
	}
	if _, _, err := plutoConfig(PlutoOptions{Conns: []PlutoConn{{Name: "a", Left: "x", Right: "y", PSK: "q\"uote"}}}); err == nil {
		t.Error("a PSK with a quote was accepted")
	}
}

func TestParseTrafficStatus(t *testing.T) {
	out := `006 #2: "lab", type=ESP, add_time=1764571234, inBytes=420, outBytes=840, maxBytes=2^63B, id='@hub.iketcp.test'
000 unrelated line
006 #4: "other"[1] 100.64.0.2, type=ESP, add_time=1764571240, inBytes=0, outBytes=0, maxBytes=2^63B, id='@x'
`
	ts := ParseTrafficStatus(out)
	if len(ts) != 2 {
		t.Fatalf("got %d entries, want 2: %+v", len(ts), ts)
	}
	if ts[0].Conn != "lab" || ts[0].InBytes != 420 || ts[0].OutBytes != 840 {
		t.Errorf("first entry %+v", ts[0])
	}
	if ts[1].Conn != "other" || ts[1].InBytes != 0 {
		t.Errorf("second entry %+v", ts[1])
	}
}
