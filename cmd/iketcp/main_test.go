package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/dial"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(cleaningM{m}) }

// cleaningM removes the binary the tests built once they have run.
type cleaningM struct{ m *testing.M }

func (c cleaningM) Run() int {
	code := c.m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	return code
}

// run runs the command line with args and returns its output and error.
func run(ctx context.Context, args ...string) (string, error) {
	app := newApp()
	var out bytes.Buffer
	app.Writer = &out
	app.ErrWriter = &out
	err := app.RunContext(ctx, append([]string{"iketcp"}, args...))
	return out.String(), err
}

func TestBadFlagsAreRejectedWithAdvice(t *testing.T) {
	ctl := filepath.Join(t.TempDir(), "x.sock")
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"client needs a peer", nil, []string{"client", "--control", ctl}, "peer"},
		{"peer must be host:port", nil, []string{"client", "--peer", "203.0.113.2", "--control", ctl}, "host:port"},
		{"datagram size", nil, []string{"server", "--max-datagram", "10", "--control", ctl}, "--max-datagram 10"},
		{"datagram size from the environment", map[string]string{"IKETCP_MAX_DATAGRAM": "99999"}, []string{"server", "--control", ctl}, "--max-datagram 99999"},
		{"log format", nil, []string{"server", "--log-format", "xml", "--control", ctl}, "--log-format"},
		{"log level from the environment", map[string]string{"IKETCP_LOG_LEVEL": "loud"}, []string{"server", "--control", ctl}, "--log-level"},
		{"non-positive limit", nil, []string{"server", "--max-conns", "0", "--control", ctl}, "--max-conns"},
		{"backend address", nil, []string{"server", "--backend", "nowhere", "--control", ctl}, "--backend"},
		{"transport", nil, []string{"client", "--peer", "203.0.113.2:4500", "--transport", "quic", "--control", ctl}, "--transport: unknown transport \"quic\": want udp, tcp"},
		{"threshold too short", nil, []string{"client", "--peer", "203.0.113.2:4500", "--transport", "auto", "--fallback-threshold", "500ms", "--control", ctl}, "--fallback-threshold: threshold 500ms is out of range: want 1s to 300s"},
		{"threshold too long, from the environment", map[string]string{"IKETCP_FALLBACK_THRESHOLD": "301s"}, []string{"client", "--peer", "203.0.113.2:4500", "--transport", "auto", "--control", ctl}, "--fallback-threshold: threshold 5m1s is out of range: want 1s to 300s"},
		{"member syntax", nil, []string{"client", "--member", "wan1=100.64.0.2", "--location-id", "1.1.1.1", "--control", ctl}, "NAME=LOCAL_ADDR->HUB:PORT"},
		{"member local address", nil, []string{"client", "--member", "wan1=uplink->203.0.113.2:4500", "--location-id", "1.1.1.1", "--control", ctl}, "local address \"uplink\""},
		{"member needs a location", nil, []string{"client", "--member", "wan1=100.64.0.2->203.0.113.2:4500", "--control", ctl}, "--location-id"},
		{"location is a dotted quad", nil, []string{"client", "--member", "wan1=100.64.0.2->203.0.113.2:4500", "--location-id", "site-a", "--control", ctl}, "dotted quad"},
		{"algorithm", nil, []string{"client", "--member", "a=100.64.0.2->203.0.113.2:4500", "--location-id", "1.1.1.1", "--aggregate", "wrr", "--control", ctl}, "want round-robin, weighted"},
		{"weight needs weighted", nil, []string{"client", "--member", "a=100.64.0.2->203.0.113.2:4500", "--location-id", "1.1.1.1", "--weight", "a=3", "--control", ctl}, "--aggregate weighted"},
		{"weight of no member", nil, []string{"client", "--member", "a=100.64.0.2->203.0.113.2:4500", "--location-id", "1.1.1.1", "--aggregate", "weighted", "--weight", "b=3", "--control", ctl}, "no --member of that name"},
		{"member and peer", nil, []string{"client", "--member", "a=100.64.0.2->203.0.113.2:4500", "--peer", "203.0.113.2:4500", "--location-id", "1.1.1.1", "--control", ctl}, "exclude each other"},
		// Members with fake-TCP pass the member checks and get as far as
		// the device's subnet, which stops them before any setup.
		{"members and fake-tcp", nil, []string{"client", "--encap", "fake-tcp", "--fake-tcp-net", "nonsense", "--member", "a=100.64.0.2->203.0.113.2:4500", "--location-id", "1.1.1.1", "--control", ctl}, `--fake-tcp-net "nonsense"`},
		{"members, fake-tcp and tun", nil, []string{"client", "--encap", "fake-tcp", "--tun", "--member", "a=100.64.0.2->203.0.113.2:4500", "--location-id", "1.1.1.1", "--control", ctl}, "explicit mode only, not with --tun"},
		{"IPv6 member and fake-tcp", nil, []string{"client", "--encap", "fake-tcp", "--member", "a=2001:db8::2->[2001:db8::1]:4500", "--location-id", "1.1.1.1", "--control", ctl}, "IPv4 only"},
		{"location without members, fake-tcp", nil, []string{"client", "--encap", "fake-tcp", "--peer", "203.0.113.2:4500", "--location-id", "1.1.1.1", "--control", ctl}, "--location-id goes with --member"},
		{"location without members", nil, []string{"client", "--peer", "203.0.113.2:4500", "--location-id", "1.1.1.1", "--control", ctl}, "--location-id goes with --member"},
		{"race needs auto", nil, []string{"client", "--peer", "203.0.113.2:4500", "--race", "--control", ctl}, "--race"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			_, err := run(context.Background(), tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

func TestListenAddressInUseGivesAdvice(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = run(context.Background(), "server", "--listen", ln.Addr().String(), "--control", filepath.Join(t.TempDir(), "s.sock"))
	if err == nil || !strings.Contains(err.Error(), "--listen") {
		t.Fatalf("err = %v, want advice naming --listen", err)
	}
}

func TestVersion(t *testing.T) {
	out, err := run(context.Background(), "version")
	if err != nil || !strings.HasPrefix(out, "iketcp ") {
		t.Fatalf("version: %q %v", out, err)
	}
}

// TestServerAndClientFromTheCommandLine runs both roles as a user would,
// as processes of the built binary (flags from the environment included),
// sends a datagram through them and reads both back with `iketcp status`:
// in clear, and over TLS with the server's key pinned.
func TestServerAndClientFromTheCommandLine(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "iketcp")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Run("clear", func(t *testing.T) { commandLinePair(t, bin, nil, nil) })
	t.Run("TLS", func(t *testing.T) {
		certFile, keyFile, pin := selfSigned(t)
		commandLinePair(t, bin, []string{"--tls-cert", certFile, "--tls-key", keyFile, "--tls-required"},
			[]string{"--tls", "--tls-pin", pin})
	})
}

// selfSigned writes a self-signed certificate and its key for ::1, and
// returns their files and the pin of the key.
func selfSigned(t *testing.T) (certFile, keyFile, pin string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "hub"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.IPv6loopback}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	os.WriteFile(certFile, certPEM, 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600)
	if pin, err = dial.PinOf(certPEM); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, pin
}

// commandLinePair runs a server and a client of bin with the extra
// arguments given, and carries an IKE_SA_INIT and its answer through.
func commandLinePair(t *testing.T, bin string, srvExtra, clExtra []string) {
	dir := t.TempDir()
	backend, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	// A free TCP port for the server and a free UDP port for the client.
	tl, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	srvAddr := tl.Addr().String()
	tl.Close()
	ul, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv6loopback})
	if err != nil {
		t.Fatal(err)
	}
	clAddr := ul.LocalAddr().String()
	ul.Close()

	srvCtl, clCtl := filepath.Join(dir, "server.sock"), filepath.Join(dir, "client.sock")
	start := func(env []string, args ...string) *exec.Cmd {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			if err := cmd.Wait(); err != nil {
				t.Errorf("%s exited with %v after SIGTERM:\n%s", args[0], err, out.String())
			}
		})
		return cmd
	}
	start([]string{"IKETCP_BACKEND=" + backend.LocalAddr().String(), "IKETCP_LOG_LEVEL=error"},
		append([]string{"server", "--listen", srvAddr, "--control", srvCtl}, srvExtra...)...)
	start([]string{"IKETCP_PEER=" + srvAddr}, append([]string{"client", "--listen", clAddr, "--control", clCtl}, clExtra...)...)

	waitStatus := func(path string) *relay.Status {
		for range 200 {
			if out, err := run(context.Background(), "status", "--json", "--control", path); err == nil {
				var st relay.Status
				if err := json.Unmarshal([]byte(out), &st); err != nil {
					t.Fatalf("status --json: %v: %q", err, out)
				}
				return &st
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Fatalf("no status on %s", path)
		return nil
	}
	waitStatus(srvCtl)
	waitStatus(clCtl)

	site, err := net.Dial("udp", clAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer site.Close()
	ike := make([]byte, 4+28)
	ike[4], ike[4+17], ike[4+18], ike[4+19] = 0x42, 0x20, 34, 0x08
	ike[4+27] = 28
	site.Write(ike)
	backend.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 100)
	n, from, err := backend.ReadFromUDP(buf)
	if err != nil || !bytes.Equal(buf[:n], ike) {
		t.Fatalf("backend got %x (%v), want the IKE_SA_INIT", buf[:n], err)
	}
	if st := waitStatus(srvCtl); len(st.Sessions) != 1 || st.Sessions[0].State != "half-open" {
		t.Fatalf("server status before the backend answered: %+v", st)
	}
	// The backend answers, with its SPI: the session is confirmed.
	resp := bytes.Clone(ike)
	resp[4+8], resp[4+19] = 0x51, 0x20
	backend.WriteToUDP(resp, from)
	site.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, err := site.Read(buf); err != nil || !bytes.Equal(buf[:n], resp) {
		t.Fatalf("site got %x (%v), want the IKE_SA_INIT response", buf[:n], err)
	}
	st := waitStatus(srvCtl)
	if st.Role != "server" || len(st.Sessions) != 1 || st.Sessions[0].State != "up" || st.Backend != backend.LocalAddr().String() {
		t.Fatalf("server status: %+v", st)
	}
	text, err := run(context.Background(), "status", "--control", clCtl)
	if err != nil || !strings.Contains(text, "iketcp client") || !strings.Contains(text, "flows: 1") {
		t.Fatalf("client status text: %q %v", text, err)
	}
}

// TestEveryCommandHasAnExample: each command's --help shows how to use it
// with an example, and the example's flags are the command's own.
func TestEveryCommandHasAnExample(t *testing.T) {
	app := newApp()
	for _, cmd := range app.Commands {
		if cmd.Hidden {
			continue
		}
		if !strings.Contains(cmd.UsageText, "Example") {
			t.Errorf("iketcp %s: its help has no example", cmd.Name)
			continue
		}
		flags := map[string]bool{"help": true}
		for _, f := range cmd.Flags {
			for _, n := range f.Names() {
				flags[n] = true
			}
		}
		for _, line := range strings.Split(cmd.UsageText, "\n") {
			line = strings.TrimSpace(line)
			if !strings.HasPrefix(line, "iketcp "+cmd.Name) {
				continue
			}
			for _, word := range strings.Fields(line) {
				if word == "#" {
					break
				}
				name := strings.Trim(word, "[]|")
				if strings.HasPrefix(name, "--") && !flags[strings.TrimPrefix(strings.SplitN(name, "=", 2)[0], "--")] {
					t.Errorf("iketcp %s: its example uses %s, which is not its flag", cmd.Name, name)
				}
			}
		}
	}
}
