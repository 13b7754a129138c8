package fakenet

import (
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/nat/nattest"
)

// TestFakeTCPAdopt hands a running server's plumbing to another Net, as
// an upgrade does: the old one gives a duplicate of its device's
// descriptor and lets go (Release) before the new one adopts it; a SYN
// that reaches the device in between waits there and is the new one's
// first read; the ruleset, links, addresses and forwarding are the same
// all along; the new one's Close then puts everything back as it was
// before the first Setup.
func TestFakeTCPAdopt(t *testing.T) {
	for _, offload := range []bool{true, false} {
		name := map[bool]string{true: "offload", false: "plain"}[offload]
		t.Run(name, func(t *testing.T) {
			l := newFakeTCPLab(t)
			before := stableFTSnapshot(t)
			cfg := Config{Role: Server, Name: "ftad", Port: 4500, Net4: ftServerNet4, Net6: ftServerNet6,
				NoOffload: !offload, Logger: nattest.Logger(t)}
			old, err := Setup(cfg)
			if err != nil {
				t.Fatal(err)
			}
			during := stableFTSnapshot(t)
			f, err := old.File()
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			old.Release()
			old.Close() // does nothing after Release
			sameSnapshot(t, "Release", during, ftSnapshot(t))

			// A client's SYN, while no process reads the device.
			if err := l.server.Do(func() error {
				c, err := net.DialTimeout("tcp", netip.AddrPortFrom(ftClientV4, 4500).String(), 200*time.Millisecond)
				if err == nil {
					c.Close()
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}

			n, err := Adopt(cfg, f)
			if err != nil {
				t.Fatal(err)
			}
			f.Close()
			if got := n.Offload() == nil; got != offload {
				t.Fatalf("adopted device offloads: %v, want %v", got, offload)
			}
			in := rawPump(t, n)
			syn := nextIP(t, "the adopted device", in)
			if syn.flags != tcpSYN || syn.dst != netip.AddrPortFrom(n.Endpoint4(), 4500) || syn.src.Addr() != ftServerV4 {
				t.Fatalf("the adopted device's first packet: %v, want the SYN that waited", syn)
			}
			sameSnapshot(t, "Adopt", during, ftSnapshot(t))
			if err := n.Close(); err != nil {
				t.Fatal(err)
			}
			sameSnapshot(t, "the adopting Net's Close", before, ftSnapshot(t))
		})
	}
}

// TestFakeTCPAdoptRefuses: a descriptor that is not the device, or not a
// TUN device at all, is refused, and the running plumbing stays as it
// is; after the adopting process crashes, Cleanup removes it all.
func TestFakeTCPAdoptRefuses(t *testing.T) {
	requireNft(t)
	nattest.Enter(t)
	before := stableFTSnapshot(t)
	cfg := Config{Role: Server, Name: "ftad", Port: 4500, Net4: ftServerNet4, Logger: nattest.Logger(t)}
	old, err := Setup(cfg)
	if err != nil {
		t.Fatal(err)
	}
	other, err := Setup(Config{Role: Client, Name: "ftoth", Net4: ftClientNet4, Logger: nattest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	during := ftSnapshot(t)
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	otherFile, err := other.File()
	if err != nil {
		t.Fatal(err)
	}
	defer otherFile.Close()
	for what, f := range map[string]*os.File{"not a TUN device": null, "device ftoth's": otherFile} {
		if _, err := Adopt(cfg, f); err == nil || !strings.Contains(err.Error(), what) {
			t.Errorf("Adopt of %s: %v", what, err)
		}
		sameSnapshot(t, "a refused Adopt", during, ftSnapshot(t))
	}

	// The old process hands over and exits; the new one crashes.
	f, err := old.File()
	if err != nil {
		t.Fatal(err)
	}
	old.Release()
	n, err := Adopt(cfg, f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	n.dev.Release() // the crash: its descriptor closes, the device goes
	n.nft.CloseLasting()
	n.nl.Close()
	n.sysctls.close()
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup(Config{Name: "ftad", Logger: nattest.Logger(t)}); err != nil {
		t.Fatal(err)
	}
	sameSnapshot(t, "a crash after Adopt, and Cleanup", before, ftSnapshot(t))
}
