package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// writeFile writes a configuration file and returns its path.
func writeFile(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "iketcp.yaml")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// effective runs the command line args with the command's action replaced
// by one that captures its instances, and returns them.
func effective(t *testing.T, args ...string) ([]*instance, error) {
	t.Helper()
	app := newApp()
	var got []*instance
	for _, cmd := range app.Commands {
		cmd.Action = func(c *cli.Context) error {
			ins, err := instances(c)
			if err != nil {
				return err
			}
			for _, in := range ins {
				if err := checkInstance(c.Command.Name, in.ctx); err != nil {
					return &configError{in.located(err)}
				}
			}
			got = ins
			return nil
		}
	}
	err := app.RunContext(context.Background(), append([]string{"iketcp"}, args...))
	return got, err
}

func TestConfigPrecedence(t *testing.T) {
	file := writeFile(t, `# a server
max-conns: 10
max-sessions: 11
max-half-open: 12
listen: [":4501", "fake-tcp://:4502"]
session-idle: 90s
tls-required: false
`)
	t.Setenv("IKETCP_MAX_SESSIONS", "21")
	t.Setenv("IKETCP_MAX_HALF_OPEN", "22")
	ins, err := effective(t, "server", "--config", file, "--max-half-open", "32", "--control", "/x/s.sock")
	if err != nil {
		t.Fatal(err)
	}
	if len(ins) != 1 {
		t.Fatalf("%d instances, want 1", len(ins))
	}
	c, src := ins[0].ctx, ins[0].sources
	for _, tc := range []struct {
		name string
		got  any
		want any
		src  string
	}{
		{"max-conns", c.Int("max-conns"), 10, file + ":2"},                             // file over the default
		{"max-sessions", c.Int("max-sessions"), 21, "environment IKETCP_MAX_SESSIONS"}, // environment over the file
		{"max-half-open", c.Int("max-half-open"), 32, "flag"},                          // flag over both
		{"max-sessions-per-source", c.Int("max-sessions-per-source"), 256, "default"},
		{"listen", strings.Join(c.StringSlice("listen"), " "), ":4501 fake-tcp://:4502", file + ":5"},
		{"session-idle", c.Duration("session-idle").String(), "1m30s", file + ":6"},
	} {
		if fmt.Sprint(tc.got) != fmt.Sprint(tc.want) || src[tc.name].String() != tc.src {
			t.Errorf("%s = %v from %s, want %v from %s", tc.name, tc.got, src[tc.name], tc.want, tc.src)
		}
	}
	if !c.IsSet("max-conns") || c.IsSet("max-half-open-per-source") {
		t.Errorf("IsSet: a value from the file counts as set, a default does not")
	}

	// A list on the command line replaces the file's, and a flag given
	// with the environment also set wins.
	t.Setenv("IKETCP_LISTEN", ":4600")
	ins, err = effective(t, "server", "--config", file, "--listen", ":4700", "--control", "/x/s.sock")
	if err != nil {
		t.Fatal(err)
	}
	if got := ins[0].ctx.StringSlice("listen"); len(got) != 1 || got[0] != ":4700" || ins[0].sources["listen"].kind != "flag" {
		t.Errorf("listen = %v from %s, want [:4700] from the flag", got, ins[0].sources["listen"])
	}
}

func TestConfigTunnels(t *testing.T) {
	file := writeFile(t, `role: client
transport: auto
max-flows: 8
tunnels:
  - name: hub-a
    peer: 203.0.113.2:4500
    listen: 127.0.0.1:14500
  - name: hub-b
    peer: [198.51.100.7:443]
    listen: 127.0.0.1:14501
    max-flows: 4
    transport: tcp
`)
	ins, err := effective(t, "client", "--config", file)
	if err != nil {
		t.Fatal(err)
	}
	if len(ins) != 2 || ins[0].name != "hub-a" || ins[1].name != "hub-b" {
		t.Fatalf("instances: %v", ins)
	}
	a, b := ins[0].ctx, ins[1].ctx
	if a.String("transport") != "auto" || a.Int("max-flows") != 8 || a.StringSlice("peer")[0] != "203.0.113.2:4500" {
		t.Errorf("hub-a: transport %s max-flows %d peer %v: want the top level's auto and 8, its own peer", a.String("transport"), a.Int("max-flows"), a.StringSlice("peer"))
	}
	if b.String("transport") != "tcp" || b.Int("max-flows") != 4 || ins[1].sources["max-flows"].String() != file+":11" {
		t.Errorf("hub-b: transport %s max-flows %d from %s: want its own tcp and 4 from line 11", b.String("transport"), b.Int("max-flows"), ins[1].sources["max-flows"])
	}
	if a.String("control") == b.String("control") || !strings.HasSuffix(b.String("control"), "client-hub-b.sock") {
		t.Errorf("control sockets %s and %s: want one per tunnel", a.String("control"), b.String("control"))
	}
	// A flag applies to every tunnel, over the file.
	ins, err = effective(t, "client", "--config", file, "--max-flows", "2")
	if err != nil {
		t.Fatal(err)
	}
	if ins[0].ctx.Int("max-flows") != 2 || ins[1].ctx.Int("max-flows") != 2 {
		t.Errorf("--max-flows 2: tunnels have %d and %d", ins[0].ctx.Int("max-flows"), ins[1].ctx.Int("max-flows"))
	}
}

// TestConfigMembers: a file gives an aggregate's members as mappings,
// with their weights, or in the flag's own form.
func TestConfigMembers(t *testing.T) {
	file := writeFile(t, `role: client
location-id: 1.1.1.1
aggregate: weighted
member:
  - name: wan1
    local: 100.64.0.2
    hub: 203.0.113.2:4500
    weight: 3
  - name: wan2
    local: 100.64.1.2
    hub: 198.51.100.2:4500
    weight: 1
  - wan3=100.64.2.2->198.51.100.3:4500
`)
	ins, err := effective(t, "client", "--config", file)
	if err != nil {
		t.Fatal(err)
	}
	c := ins[0].ctx
	wantMembers := []string{"wan1=100.64.0.2->203.0.113.2:4500", "wan2=100.64.1.2->198.51.100.2:4500", "wan3=100.64.2.2->198.51.100.3:4500"}
	if got := c.StringSlice("member"); fmt.Sprint(got) != fmt.Sprint(wantMembers) {
		t.Errorf("members %q, want %q", got, wantMembers)
	}
	if got := c.StringSlice("weight"); fmt.Sprint(got) != "[wan1=3 wan2=1]" {
		t.Errorf("weights %q, want [wan1=3 wan2=1]", got)
	}
	if src := ins[0].sources["weight"].String(); src != file+":8" {
		t.Errorf("weights from %s, want line 8", src)
	}
	for _, tc := range []struct{ name, file, want string }{
		{"unknown key", "member:\n  - name: a\n    local: 100.64.0.2\n    hub: 203.0.113.2:4500\n    port: 1\n", `:5: member: unknown key "port"`},
		{"missing hub", "member:\n  - name: a\n    local: 100.64.0.2\n", `:2: member: missing "hub"`},
		{"weights twice", "weight: [a=2]\nmember:\n  - name: a\n    local: 100.64.0.2\n    hub: 203.0.113.2:4500\n    weight: 3\n", `:6: key "weight" given twice (first at line 1)`},
		{"bad address", "location-id: 1.1.1.1\nmember:\n  - name: a\n    local: here\n    hub: 203.0.113.2:4500\n", `local address "here"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := effective(t, "client", "--config", writeFile(t, tc.file))
			if err == nil || !strings.Contains(err.Error(), tc.want) || exitCode(err) != exitConfig {
				t.Fatalf("err = %v, want a configuration error with %q", err, tc.want)
			}
		})
	}
}

func TestConfigErrors(t *testing.T) {
	tunnel := "role: client\ntunnels:\n  - name: a\n    peer: 203.0.113.2:4500\n"
	for _, tc := range []struct {
		name, cmd, file, want string
	}{
		{"unknown key", "server", "max-conns: 5\nmax-connz: 5\n", `:2: unknown key "max-connz"`},
		{"a client flag in a server's file", "server", "peer: 203.0.113.2:4500\n", `:1: unknown key "peer"`},
		{"tunnels in a server's file", "server", "tunnels: []\n", `:1: unknown key "tunnels"`},
		{"not an integer", "server", "\n\nmax-conns: lots\n", `:3: key "max-conns": "lots" is not an integer`},
		{"not a duration", "server", "session-idle: 5 minutes\n", `:1: key "session-idle": "5 minutes" is not a duration`},
		{"not a bool", "server", "tls-required: maybe\n", `:1: key "tls-required": "maybe" is not true or false`},
		{"negative unsigned", "server", "ike-tcp-port: -1\n", `:1: key "ike-tcp-port": "-1" is not a non-negative integer`},
		{"list for one value", "server", "backend:\n  - 127.0.0.1:4500\n", `:2: key "backend" takes one value, not a list`},
		{"mapping for a value", "server", "backend:\n  host: 127.0.0.1\n", `:2: key "backend": want a value, not a mapping`},
		{"no value", "server", "backend:\n", `:1: key "backend" has no value`},
		{"list of lists", "server", "listen:\n  - [a]\n", `:2: key "listen": each item must be a plain value`},
		{"given twice", "server", "max-conns: 1\nmax-conns: 2\n", `:2: key "max-conns" given twice (first at line 1)`},
		{"a file naming a file", "server", "config: other.yaml\n", `:1: key "config": a file cannot name another`},
		{"not a mapping", "server", "- max-conns\n", `:1: the file must be a mapping`},
		{"bad YAML", "server", "max-conns: [1\n", `line`},
		{"wrong role", "server", "role: client\n", `the file is for iketcp client (role: client), not iketcp server`},
		{"bad role", "server", "role: hub\n", `:1: key "role": want server or client`},
		{"bad value, checked as the command checks it", "server", "max-conns: 5\nmax-datagram: 10\n", `:2: key "max-datagram": --max-datagram 10: want 576 to 65533 bytes`},
		{"bad value from a tunnel", "client", tunnel + "    transport: quic\n", `:5: key "transport": --transport: unknown transport "quic"`},
		{"unknown key in a tunnel", "client", tunnel + "    peers: x\n", `:5: unknown key "peers"`},
		{"process-wide key in a tunnel", "client", tunnel + "    metrics: 127.0.0.1:9450\n", `:5: key "metrics" belongs to the whole process`},
		{"tunnels not a list", "client", "tunnels: hub\n", `:1: key "tunnels": want a list of tunnels`},
		{"tunnel not a mapping", "client", "tunnels:\n  - hub\n", `:2: tunnel 1: want a mapping`},
		{"bad tunnel name", "client", "tunnels:\n  - name: a b\n", `:2: tunnel name "a b"`},
		{"tunnel name taken", "client", tunnel + "  - name: a\n    peer: 203.0.113.3:4500\n", `:5: tunnel name "a" is taken by the tunnel at line 3`},
		{"tunnels share a socket", "client", tunnel + "  - name: b\n    peer: 203.0.113.3:4500\n", `tunnels "a" and "b" both have listen 127.0.0.1:14500`},
		{"no peer anywhere", "client", "max-flows: 3\n", `--peer is required`},
		{"transparent tunnels share a device", "client", "tun: true\ntunnels:\n  - name: a\n    peer: 203.0.113.2\n  - name: b\n    peer: 203.0.113.3\n", `tunnels "a" and "b" both have tun-name iketcp0`},
		{"fake-TCP tunnels share a device", "client", "encap: fake-tcp\ntunnels:\n  - name: a\n    peer: 203.0.113.2:4500\n    listen: 127.0.0.1:1\n  - name: b\n    peer: 203.0.113.3:4500\n    listen: 127.0.0.1:2\n", `tunnels "a" and "b" both have fake-tcp-name iketcpft0`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeFile(t, tc.file)
			_, err := effective(t, tc.cmd, "--config", path)
			var ce *configError
			if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.As(err, &ce) {
				t.Fatalf("err = %v, want a configuration error with %q", err, tc.want)
			}
			if exitCode(err) != exitConfig {
				t.Errorf("exit code %d, want %d", exitCode(err), exitConfig)
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		_, err := effective(t, "server", "--config", filepath.Join(t.TempDir(), "none.yaml"))
		if err == nil || !strings.Contains(err.Error(), "--config: open") || exitCode(err) != exitConfig {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("empty file sets nothing", func(t *testing.T) {
		ins, err := effective(t, "server", "--config", writeFile(t, ""), "--control", "/x/s.sock")
		if err != nil || ins[0].ctx.Int("max-conns") != 4096 {
			t.Fatalf("err = %v", err)
		}
	})
}

func TestCheckConfig(t *testing.T) {
	file := writeFile(t, `role: client
log-level: debug
tunnels:
  - name: hub-a
    peer: 203.0.113.2:4500
  - name: hub-b
    peer: 198.51.100.7:4500
    listen: 127.0.0.1:14501
`)
	t.Setenv("IKETCP_MAX_FLOWS", "9")
	out, err := run(context.Background(), "check-config", file)
	if err != nil {
		t.Fatalf("check-config: %v\n%s", err, out)
	}
	for _, want := range []string{
		"role: client\ntunnels:\n  - name: hub-a\n",
		"    peer: [203.0.113.2:4500]  # " + file + ":5\n",
		"    log-level: debug  # " + file + ":2\n",
		"    max-flows: 9  # environment IKETCP_MAX_FLOWS\n",
		"    listen: 127.0.0.1:14501  # " + file + ":8\n",
		"    max-datagram: 9216  # default\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("check-config output lacks %q:\n%s", want, out)
		}
	}
	if _, err := run(context.Background(), "check-config", writeFile(t, "max-conns: 3\n")); err == nil || !strings.Contains(err.Error(), `"role: server" or "role: client"`) {
		t.Errorf("a file without role: %v", err)
	}
	if _, err := run(context.Background(), "check-config"); exitCode(err) != exitConfig {
		t.Errorf("no FILE: %v", err)
	}
}
