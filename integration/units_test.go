package integration

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// unitUID is the unprivileged user the units' processes run as here
// (nobody), standing in for the units' iketcp user.
const unitUID = 65534

// unitCaps reads a systemd unit's AmbientCapabilities, as setpriv's list
// ("+net_admin"), "" for none; and checks that its bounding set is the
// same.
func unitCaps(t *testing.T, name string) string {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "deploy", "systemd", name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ambient, bounding string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(strings.TrimSpace(sc.Text()), "=")
		switch k {
		case "AmbientCapabilities":
			ambient = v
		case "CapabilityBoundingSet":
			bounding = v
		}
	}
	if ambient != bounding {
		t.Fatalf("%s: AmbientCapabilities %q but CapabilityBoundingSet %q", name, ambient, bounding)
	}
	var caps string
	for _, c := range strings.Fields(ambient) {
		caps += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
	}
	return caps
}

// TestUnitsRunWithTheirCapabilities runs each mode's iketcp the way its
// systemd unit does as far as privileges go: an unprivileged user, no new
// privileges, and only the capabilities the unit grants (setpriv), and
// brings a real tunnel up through the block-udp carrier with it. The
// server and the explicit client have no capability at all; --tun and
// fake-TCP have CAP_NET_ADMIN alone, which must be enough for the TUN
// device, the rules, nftables and fake-TCP's ip_forward.
func TestUnitsRunWithTheirCapabilities(t *testing.T) {
	lab.Require(t)
	if lab.ToolPath("setpriv") == "" {
		msg := "setpriv not found (util-linux)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	modes := []struct {
		name        string
		server      string // the units
		client      string
		transparent bool
		serverArgs  []string
		clientArgs  []string
	}{
		{name: "explicit", server: "iketcp-server.service", client: "iketcp-client.service"},
		{name: "transparent", server: "iketcp-server.service", client: "iketcp-client-tun.service", transparent: true},
		{name: "fake-tcp", server: "iketcp-fake-tcp@.service", client: "iketcp-fake-tcp@.service",
			serverArgs: []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.251.0/30"},
			clientArgs: []string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.250.0/30"}},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			l := lab.NewForTest(t, lab.Options{})
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			if err := l.SetProfile(ctx, lab.ProfileBlockUDP); err != nil {
				t.Fatal(err)
			}
			// The control sockets go in the lab's directory: it must be the
			// user's, as a unit's RuntimeDirectory is.
			if err := os.Chown(l.Dir, unitUID, unitUID); err != nil {
				t.Fatal(err)
			}
			for d := filepath.Dir(l.Dir); d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
				if err := os.Chmod(d, 0o711); err != nil { // the test's own temporary directories
					t.Fatal(err)
				}
			}
			serverCaps, clientCaps := unitCaps(t, m.server), unitCaps(t, m.client)
			// /dev/net/tun is 0666 on Debian (udev), which the TUN modes'
			// units rely on; this host has it 0600. The wrapper gives the
			// process a mount namespace of its own in which a node of the same
			// device with Debian's mode sits on /dev/net/tun; the host's is
			// left alone, and the node lies in a directory only root can enter.
			devDir := filepath.Join(l.Dir, "dev")
			if err := os.Mkdir(devDir, 0o700); err != nil {
				t.Fatal(err)
			}
			wrapper := filepath.Join(l.Dir, "as-unit.sh")
			script := fmt.Sprintf(`#!/bin/sh
caps=""
case "$1" in server) caps=%q;; client) caps=%q;; esac
set -- setpriv --reuid=%d --regid=%d --clear-groups --no-new-privs --inh-caps=-all$caps --ambient-caps=-all$caps --bounding-set=-all$caps %s "$@"
[ -z "$caps" ] && exec "$@"
node=%s/tun-$$
mknod -m 0666 "$node" c 10 200 || exit 1
exec unshare --mount --propagation private sh -c 'mount --bind "$0" /dev/net/tun && rm "$0" && exec "$@"' "$node" "$@"
`, serverCaps, clientCaps, unitUID, unitUID, iketcpBinary, devDir)
			if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: wrapper, Transparent: m.transparent, ServerArgs: m.serverArgs, ClientArgs: m.clientArgs})
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []struct {
				pid  int
				caps string
			}{{tun.Server.PID(), serverCaps}, {tun.Client.PID(), clientCaps}} {
				status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid))
				if err != nil {
					t.Fatal(err)
				}
				uid, capEff := "", ""
				for _, line := range strings.Split(string(status), "\n") {
					if v, ok := strings.CutPrefix(line, "Uid:"); ok {
						uid = strings.Fields(v)[1]
					}
					if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
						capEff = strings.TrimSpace(v)
					}
				}
				want := "0000000000000000"
				if p.caps != "" {
					want = "0000000000001000" // CAP_NET_ADMIN alone
				}
				if uid != fmt.Sprint(unitUID) || capEff != want {
					t.Errorf("pid %d runs as uid %s with capabilities %s, want uid %d with %s", p.pid, uid, capEff, unitUID, want)
				}
			}
			start := time.Now()
			sa, err := tun.Initiate(ctx)
			if err != nil {
				t.Fatal(err)
			}
			got, err := tun.PingThrough(ctx, 5, 100*time.Millisecond)
			if err != nil || got != 5 {
				t.Fatalf("%d of 5 pings: %v", got, err)
			}
			t.Logf("%s: server caps %q, client caps %q: IKE SA %s up in %v, 5 of 5 pings", m.name, serverCaps, clientCaps, sa.InitiatorSPI, time.Since(start).Round(time.Millisecond))
			if dropped, _ := l.UDPDropped(ctx); m.transparent && dropped != 0 {
				t.Errorf("transparent: %d UDP packets reached the carrier", dropped)
			}
		})
	}
}
