package deploy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// iketcpBinary is built once by TestMain from this checkout.
var iketcpBinary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "iketcp-deploy-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	iketcpBinary = filepath.Join(dir, "iketcp")
	if out, err := exec.Command("go", "build", "-o", iketcpBinary, "github.com/iketcp/iketcp/cmd/iketcp").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building iketcp: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// need fails (under CI) or skips the test when a tool is missing.
func need(t *testing.T, tool string) string {
	t.Helper()
	for _, p := range []string{tool, "/usr/bin/" + tool, "/bin/" + tool} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	msg := tool + " not found: run make deps (it installs Debian's systemd and podman)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

var helpFlag = regexp.MustCompile(`(?m)^\s+(--[a-z0-9-]+)(?:, (--[a-z0-9-]+))?`)

// flagsOf returns the flags `iketcp COMMAND --help` lists.
func flagsOf(t *testing.T, command string) map[string]bool {
	t.Helper()
	out, err := exec.Command(iketcpBinary, command, "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("iketcp %s --help: %v\n%s", command, err, out)
	}
	flags := map[string]bool{}
	for _, m := range helpFlag.FindAllStringSubmatch(string(out), -1) {
		flags[m[1]] = true
		if m[2] != "" {
			flags[m[2]] = true
		}
	}
	if !flags["--help"] || len(flags) < 5 {
		t.Fatalf("iketcp %s --help lists %d flags: %s", command, len(flags), out)
	}
	return flags
}

// checkArgs checks a command line after "iketcp": the command exists and
// takes every flag given.
func checkArgs(t *testing.T, where string, args []string) {
	t.Helper()
	if len(args) == 0 {
		t.Errorf("%s: no iketcp command", where)
		return
	}
	flags := flagsOf(t, args[0])
	for _, a := range args[1:] {
		if !strings.HasPrefix(a, "--") {
			continue
		}
		name, _, _ := strings.Cut(a, "=")
		if !flags[name] {
			t.Errorf("%s: iketcp %s has no flag %s", where, args[0], name)
		}
	}
}

// checkEnv checks that an IKETCP_* variable is a flag of the command.
func checkEnv(t *testing.T, where, command, name string) {
	t.Helper()
	if !strings.HasPrefix(name, "IKETCP_") {
		return
	}
	flag := "--" + strings.ReplaceAll(strings.ToLower(strings.TrimPrefix(name, "IKETCP_")), "_", "-")
	if !flagsOf(t, command)[flag] {
		t.Errorf("%s: %s is no flag of iketcp %s (%s)", where, name, command, flag)
	}
}

// unit is a systemd unit file's [Service] settings, each key's values in
// order.
type unit map[string][]string

func readUnit(t *testing.T, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = line
		case section == "[Service]":
			k, v, _ := strings.Cut(line, "=")
			u[k] = append(u[k], v)
		}
	}
	return u
}

func units(t *testing.T) []string {
	paths, err := filepath.Glob("systemd/*.service")
	if err != nil || len(paths) < 4 {
		t.Fatalf("units: %v %v", paths, err)
	}
	return paths
}

// instances names the units to check: a template once per role.
func instances(path string) []string {
	base := filepath.Base(path)
	if strings.HasSuffix(base, "@.service") {
		stem := strings.TrimSuffix(base, "@.service")
		return []string{stem + "@server.service", stem + "@client.service"}
	}
	return []string{base}
}

// TestSystemdUnitsVerify runs systemd-analyze verify on every unit (each
// template for both roles) with ExecStart pointing at the binary built
// from this checkout, and wants it silent; and systemd-analyze security
// offline, whose exposure must stay at most 2.5 of 10.
func TestSystemdUnitsVerify(t *testing.T) {
	analyze := need(t, "systemd-analyze")
	dir := t.TempDir()
	for _, path := range units(t) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(b, []byte("ExecStart=/usr/bin/iketcp ")) {
			t.Errorf("%s: ExecStart is not /usr/bin/iketcp", path)
		}
		text := bytes.ReplaceAll(b, []byte("/usr/bin/iketcp"), []byte(iketcpBinary))
		for _, name := range instances(path) {
			p := filepath.Join(dir, name)
			if err := os.WriteFile(p, text, 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(analyze, "verify", p).CombinedOutput()
			if err != nil || len(bytes.TrimSpace(out)) > 0 {
				t.Errorf("systemd-analyze verify %s: %v\n%s", name, err, out)
			}
			out, err = exec.Command(analyze, "security", "--offline=yes", "--threshold=25", p).CombinedOutput()
			overall := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`).FindSubmatch(out)
			if err != nil || overall == nil {
				t.Errorf("systemd-analyze security %s: %v\n%s", name, err, out)
				continue
			}
			t.Logf("%s: exposure %s", name, overall[1])
		}
	}
}

// TestSystemdUnitsMatchBinary checks each unit against the binary: the
// command and flags of ExecStart exist, every IKETCP_* variable is a flag,
// the control socket is in the unit's RuntimeDirectory, and the unit has
// exactly the capabilities its mode needs: CAP_NET_ADMIN and /dev/net/tun
// for --tun and fake-TCP, none otherwise.
func TestSystemdUnitsMatchBinary(t *testing.T) {
	for _, path := range units(t) {
		for _, name := range instances(path) {
			role := strings.TrimSuffix(strings.TrimPrefix(name, "iketcp-fake-tcp@"), ".service")
			b, _ := os.ReadFile(path)
			text := strings.ReplaceAll(string(b), "%i", role)
			f, err := os.CreateTemp(t.TempDir(), "*.service")
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(f, text)
			f.Close()
			u := readUnit(t, f.Name())
			exec := strings.Fields(strings.Join(u["ExecStart"], " "))
			if len(exec) < 2 || exec[0] != "/usr/bin/iketcp" {
				t.Fatalf("%s: ExecStart %v", name, exec)
			}
			args := exec[1:]
			checkArgs(t, name, args)
			control := ""
			for _, e := range u["Environment"] {
				k, v, _ := strings.Cut(e, "=")
				checkEnv(t, name, args[0], k)
				if k == "IKETCP_CONTROL" {
					control = v
				}
			}
			if want := "/run/" + strings.Join(u["RuntimeDirectory"], "") + "/"; !strings.HasPrefix(control, want) || strings.Contains(strings.TrimPrefix(control, want), "/") {
				t.Errorf("%s: control socket %q is not in RuntimeDirectory %s", name, control, want)
			}
			privileged := strings.Contains(text, "--tun") || strings.Contains(text, "--encap fake-tcp")
			caps := strings.Join(u["CapabilityBoundingSet"], " ") + "|" + strings.Join(u["AmbientCapabilities"], " ")
			tun := strings.Join(u["DeviceAllow"], " ")
			families := strings.Join(u["RestrictAddressFamilies"], " ")
			if privileged {
				if caps != "CAP_NET_ADMIN|CAP_NET_ADMIN" || tun != "/dev/net/tun rw" || !strings.Contains(families, "AF_NETLINK") {
					t.Errorf("%s: capabilities %q, devices %q, families %q: want CAP_NET_ADMIN, /dev/net/tun and netlink", name, caps, tun, families)
				}
			} else if caps != "|" || tun != "" || strings.Contains(families, "AF_NETLINK") || strings.Join(u["PrivateDevices"], "") != "yes" {
				t.Errorf("%s: capabilities %q, devices %q, families %q: want none", name, caps, tun, families)
			}
			for _, k := range []string{"NoNewPrivileges", "ProtectHome", "PrivateTmp"} {
				if strings.Join(u[k], "") != "yes" {
					t.Errorf("%s: %s is not yes", name, k)
				}
			}
			if strings.Join(u["ProtectSystem"], "") != "strict" || strings.Join(u["User"], "") != "iketcp" {
				t.Errorf("%s: ProtectSystem %v, User %v", name, u["ProtectSystem"], u["User"])
			}
		}
	}
}

// TestKubernetesManifestsMatchBinary checks the manifests against the
// binary and the Dockerfile: every iketcp container's command and flags
// exist, its IKETCP_* variables are flags, the port it listens on is the
// port it declares and probes, the Services' target ports exist, the
// writable mount holds the image's control socket, and the user is the
// image's.
func TestKubernetesManifestsMatchBinary(t *testing.T) {
	dockerfile, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	imageUser := regexp.MustCompile(`(?m)^USER (\d+):`).FindSubmatch(dockerfile)
	imageControl := regexp.MustCompile(`(?m)^ENV IKETCP_CONTROL=(\S+)`).FindSubmatch(dockerfile)
	imagePort := regexp.MustCompile(`(?m)^EXPOSE (\d+)/tcp`).FindSubmatch(dockerfile)
	if imageUser == nil || imageControl == nil || imagePort == nil {
		t.Fatal("the Dockerfile has no USER, ENV IKETCP_CONTROL or EXPOSE")
	}
	paths, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(paths) == 0 {
		t.Fatalf("manifests: %v %v", paths, err)
	}
	containers := 0
	for _, path := range paths {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		portNames := map[string]bool{}
		var services []map[string]any
		for {
			var doc map[string]any
			if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			switch doc["kind"] {
			case "Service":
				services = append(services, doc)
				continue
			case "Deployment":
			default:
				t.Errorf("%s: unexpected kind %v", path, doc["kind"])
				continue
			}
			pod := dig(doc, "spec", "template", "spec")
			for _, c := range list(pod["containers"]) {
				c := c.(map[string]any)
				for _, p := range list(c["ports"]) {
					portNames[fmt.Sprint(p.(map[string]any)["name"])] = true
				}
				if !strings.Contains(fmt.Sprint(c["image"]), "iketcp") {
					continue
				}
				containers++
				where := fmt.Sprintf("%s: container %v", path, c["name"])
				var args []string
				for _, a := range list(c["args"]) {
					args = append(args, fmt.Sprint(a))
				}
				checkArgs(t, where, args)
				for _, e := range list(c["env"]) {
					checkEnv(t, where, args[0], fmt.Sprint(e.(map[string]any)["name"]))
				}
				sc := c["securityContext"].(map[string]any)
				if fmt.Sprint(sc["runAsUser"]) != string(imageUser[1]) || sc["allowPrivilegeEscalation"] != false || sc["readOnlyRootFilesystem"] != true {
					t.Errorf("%s: securityContext %v: want the image's user %s, no privilege escalation, a read-only root", where, sc, imageUser[1])
				}
				if drop := fmt.Sprint(dig(sc, "capabilities")["drop"]); drop != "[ALL]" {
					t.Errorf("%s: capabilities dropped %s, want ALL", where, drop)
				}
				// The control socket's directory is created in a writable mount.
				mounted := false
				for _, m := range list(c["volumeMounts"]) {
					mp := fmt.Sprint(m.(map[string]any)["mountPath"])
					if filepath.Dir(filepath.Dir(string(imageControl[1]))) == mp {
						mounted = true
					}
				}
				if !mounted {
					t.Errorf("%s: no writable mount at %s for the control socket %s", where, filepath.Dir(filepath.Dir(string(imageControl[1]))), imageControl[1])
				}
				if args[0] != "server" {
					continue
				}
				listen := string(imagePort[1])
				for i, a := range args {
					if a == "--listen" && i+1 < len(args) {
						listen = args[i+1][strings.LastIndex(args[i+1], ":")+1:]
					}
				}
				declared := map[string]string{}
				for _, p := range list(c["ports"]) {
					p := p.(map[string]any)
					declared[fmt.Sprint(p["name"])] = fmt.Sprint(p["containerPort"])
				}
				metrics := ""
				for i, a := range args {
					if a == "--metrics" && i+1 < len(args) {
						metrics = args[i+1][strings.LastIndex(args[i+1], ":")+1:]
					}
				}
				for probe, path := range map[string]string{"readinessProbe": "/readyz", "livenessProbe": "/healthz"} {
					get := dig(dig(c, probe), "httpGet")
					port := fmt.Sprint(get["port"])
					switch {
					case len(get) == 0:
						t.Errorf("%s: %s is not an HTTP probe of --metrics", where, probe)
					case metrics == "":
						t.Errorf("%s: %s probes %s, but the server has no --metrics", where, probe, get["path"])
					case declared[port] != metrics || fmt.Sprint(get["path"]) != path:
						t.Errorf("%s: %s gets %v on port %s (%s); the server serves %s on --metrics port %s", where, probe, get["path"], port, declared[port], path, metrics)
					}
				}
				if declared["ike-tcp"] != listen {
					t.Errorf("%s: port ike-tcp is %s, the server listens on %s", where, declared["ike-tcp"], listen)
				}
			}
		}
		for _, s := range services {
			for _, p := range list(dig(s, "spec")["ports"]) {
				target := fmt.Sprint(p.(map[string]any)["targetPort"])
				if !portNames[target] {
					t.Errorf("%s: Service port %v targets %s, which no container declares", path, p.(map[string]any)["name"], target)
				}
			}
		}
	}
	if containers < 2 {
		t.Errorf("%d iketcp containers in the manifests, want the server and the client sidecars", containers)
	}
}

func dig(m map[string]any, keys ...string) map[string]any {
	for _, k := range keys {
		next, _ := m[k].(map[string]any)
		if next == nil {
			return map[string]any{}
		}
		m = next
	}
	return m
}

func list(v any) []any { l, _ := v.([]any); return l }
