package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/iketcp/iketcp/relay"
)

var (
	binOnce sync.Once
	binDir  string
	binPath string
	binErr  error
)

// iketcpBinary builds the command once for the package's tests.
func iketcpBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		if binDir, binErr = os.MkdirTemp("", "iketcp-bin-"); binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "iketcp")
		if out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// syncBuffer is a buffer a process writes while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitFor polls cond every 20 ms for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 250 {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// proc is a running iketcp of the test.
type testProc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan error
}

func startIketcp(t *testing.T, args ...string) *testProc {
	t.Helper()
	p := &testProc{cmd: exec.Command(iketcpBinary(t), args...), out: new(syncBuffer), done: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// wait returns the exit code within 10 s.
func (p *testProc) wait(t *testing.T) int {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err // for Cleanup
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(10 * time.Second):
		t.Fatalf("still running after 10 s:\n%s", p.out.String())
		return -1
	}
}

func freeTCP(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// ikeInit is an IKE_SA_INIT request in port-4500 form, initiator SPI
// 4200000000000000.
func ikeInit() []byte {
	ike := make([]byte, 4+28)
	ike[4], ike[4+17], ike[4+18], ike[4+19] = 0x42, 0x20, 34, 0x08
	ike[4+27] = 28
	return ike
}

// openSession connects to an iketcp server as an RFC 9329 client and
// sends an IKE_SA_INIT request; the backend receives it.
func openSession(t *testing.T, srv string, backend *net.UDPConn) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", srv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ike := ikeInit()
	frame := binary.BigEndian.AppendUint16([]byte("IKETCP"), uint16(len(ike)+2))
	c.Write(append(frame, ike...))
	backend.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 100)
	if n, _, err := backend.ReadFromUDP(buf); err != nil || !bytes.Equal(buf[:n], ike) {
		t.Fatalf("the backend got %x (%v), want the IKE_SA_INIT", buf[:n], err)
	}
	return c
}

func udpBackend(t *testing.T) *net.UDPConn {
	t.Helper()
	b, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// counter reads a counter of the instance on ctl, or -1.
func counter(t *testing.T, ctl, name string) int64 {
	t.Helper()
	out, err := run(context.Background(), "status", "--json", "--control", ctl)
	if err != nil {
		return -1
	}
	var st relay.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v", err)
	}
	for _, c := range st.Counters {
		if c.Name == name {
			return int64(c.Value)
		}
	}
	return 0
}

// TestExitCodes runs the binary into each exit code the README
// documents.
func TestExitCodes(t *testing.T) {
	dir := t.TempDir()
	ctl := filepath.Join(dir, "s.sock")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("max-conns: 10\nmax-conn: 3\n"), 0o600)
	for _, tc := range []struct {
		name string
		args []string
		code int
		say  string
	}{
		{"bad value", []string{"server", "--max-conns", "lots", "--control", ctl}, exitConfig, "invalid value"},
		{"unknown flag", []string{"server", "--max-connz", "3", "--control", ctl}, exitConfig, "max-connz"},
		{"bad file", []string{"server", "--config", bad, "--control", ctl}, exitConfig, bad + `:2: unknown key "max-conn"`},
		{"bad value, checked", []string{"client", "--peer", "203.0.113.2:4500", "--transport", "quic", "--control", ctl}, exitConfig, "--transport"},
		{"bad environment", []string{"server", "--control", ctl}, exitConfig, `"abc" as int value from environment variable "IKETCP_MAX_CONNS"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "bad environment" {
				t.Setenv("IKETCP_MAX_CONNS", "abc")
			}
			p := startIketcp(t, tc.args...)
			if code := p.wait(t); code != tc.code || !strings.Contains(p.out.String(), tc.say) {
				t.Fatalf("exit %d, want %d; output:\n%s", code, tc.code, p.out.String())
			}
		})
	}
	t.Run("failed to start", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		p := startIketcp(t, "server", "--listen", l.Addr().String(), "--control", ctl)
		if code := p.wait(t); code != exitFailed {
			t.Fatalf("exit %d, want %d:\n%s", code, exitFailed, p.out.String())
		}
	})
	t.Run("SIGTERM", func(t *testing.T) {
		backend := udpBackend(t)
		srv := freeTCP(t)
		p := startIketcp(t, "server", "--listen", srv, "--backend", backend.LocalAddr().String(), "--control", ctl,
			"--shutdown-timeout", "3s")
		waitFor(t, "the server", func() bool { return strings.Contains(p.out.String(), "server listening") })
		openSession(t, srv, backend)
		start := time.Now()
		p.cmd.Process.Signal(syscall.SIGTERM)
		code := p.wait(t)
		if code != exitOK || !strings.Contains(p.out.String(), "msg=drained") || time.Since(start) > 3*time.Second {
			t.Fatalf("exit %d after %v, want %d within the bound, drained:\n%s", code, time.Since(start), exitOK, p.out.String())
		}
		if _, err := os.Stat(ctl); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("control socket left behind: %v", err)
		}
	})
}

// TestSIGHUPReloads: SIGHUP applies the file's new limits and log level
// to a running server without closing anything, says which change needs
// a restart, and keeps everything when the file has become invalid.
func TestSIGHUPReloads(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "server.yaml")
	backend := udpBackend(t)
	srv := freeTCP(t)
	write := func(text string) {
		if err := os.WriteFile(file, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf("listen: %s\nbackend: %s\nmax-unconfirmed-per-source: 64\nlog-level: info\n", srv, backend.LocalAddr()))
	ctl := filepath.Join(dir, "s.sock")
	p := startIketcp(t, "server", "--config", file, "--control", ctl)
	waitFor(t, "the server", func() bool { return strings.Contains(p.out.String(), "server listening") })

	// Two connections that confirm nothing, from one source.
	var conns []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", srv)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	waitFor(t, "both accepted", func() bool { return counter(t, ctl, "conns_accepted") == 2 })

	write(fmt.Sprintf("listen: %s\nbackend: 127.0.0.1:1\nmax-unconfirmed-per-source: 1\nlog-level: debug\n", srv))
	p.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the reload", func() bool { return strings.Contains(p.out.String(), "SIGHUP: configuration reloaded") })
	out := p.out.String()
	for _, want := range []string{
		`msg="SIGHUP: log level changed" level=debug`,
		`msg="SIGHUP: limits changed`, "max_unconfirmed_per_source=1",
		`msg="SIGHUP: this setting takes a restart; the running value stays" tunnel="" key=backend`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	// The lowered limit refuses the next connection, and closes neither
	// of the two that run.
	third, err := net.Dial("tcp", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	waitFor(t, "the refusal", func() bool { return counter(t, ctl, "conns_rejected") == 1 })
	third.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := third.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a third connection over the reloaded limit: read %v, want it closed", err)
	}
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("connection %d after the reload: %v, want it still open", i, err)
		}
	}

	// At debug level, a connection from another source is logged.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	other, err := d.Dial("tcp", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	waitFor(t, "the other source's connection", func() bool { return counter(t, ctl, "conns_accepted") == 3 })

	// A file that has gone bad changes nothing.
	write("max-unconfirmed-per-source: many\n")
	p.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the refusal", func() bool { return strings.Contains(p.out.String(), "the configuration file was not reloaded") })
	if !strings.Contains(p.out.String(), file+`:1: key \"max-unconfirmed-per-source\"`) {
		t.Errorf("the refusal does not name the key and line:\n%s", p.out.String())
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t); code != exitOK {
		t.Fatalf("exit %d after SIGTERM:\n%s", code, p.out.String())
	}
	_, after, _ := strings.Cut(p.out.String(), "SIGHUP: log level changed")
	if !strings.Contains(after, `level=DEBUG msg="connection accepted"`) {
		t.Errorf("no debug line after the log level went to debug:\n%s", p.out.String())
	}
}

// screen is a terminal screen that applies the control sequences status
// --watch writes: cursor home, clear screen, erase to the end of the line
// and of the screen, carriage return, new line.
type screen struct {
	rows      [][]rune
	row, col  int
	cursorOff bool
}

var csi = regexp.MustCompile(`^\x1b\[(\??[0-9;]*)([A-Za-z])`)

func (s *screen) write(p string) {
	for len(p) > 0 {
		if m := csi.FindStringSubmatch(p); m != nil {
			switch m[1] + m[2] {
			case "H":
				s.row, s.col = 0, 0
			case "2J":
				s.rows = nil
			case "K":
				if s.row < len(s.rows) && s.col < len(s.rows[s.row]) {
					s.rows[s.row] = s.rows[s.row][:s.col]
				}
			case "J":
				if s.row < len(s.rows) {
					if s.col < len(s.rows[s.row]) {
						s.rows[s.row] = s.rows[s.row][:s.col]
					}
					s.rows = s.rows[:s.row+1]
				}
			case "?25l":
				s.cursorOff = true
			case "?25h":
				s.cursorOff = false
			}
			p = p[len(m[0]):]
			continue
		}
		r := []rune(p[:1])[0]
		if p[0] >= 0x80 {
			rs := []rune(p)
			r = rs[0]
			p = p[len(string(r)):]
		} else {
			p = p[1:]
		}
		switch r {
		case '\r':
			s.col = 0
		case '\n':
			s.row++
		default:
			for len(s.rows) <= s.row {
				s.rows = append(s.rows, nil)
			}
			for len(s.rows[s.row]) < s.col {
				s.rows[s.row] = append(s.rows[s.row], ' ')
			}
			if s.col < len(s.rows[s.row]) {
				s.rows[s.row][s.col] = r
			} else {
				s.rows[s.row] = append(s.rows[s.row], r)
			}
			s.col++
		}
	}
}

func (s *screen) String() string {
	var lines []string
	for _, r := range s.rows {
		lines = append(lines, string(r))
	}
	return strings.Join(lines, "\n")
}

// TestStatusWatchInATerminal runs iketcp status --watch in a
// pseudo-terminal against a live server, reads the screen back as a
// terminal would show it, and sees it redrawn in place as a session
// comes; then status --session shows that session in full.
func TestStatusWatchInATerminal(t *testing.T) {
	dir := t.TempDir()
	ctl := filepath.Join(dir, "s.sock")
	backend := udpBackend(t)
	srv := freeTCP(t)
	p := startIketcp(t, "server", "--listen", srv, "--backend", backend.LocalAddr().String(), "--control", ctl)
	waitFor(t, "the server", func() bool { return strings.Contains(p.out.String(), "server listening") })

	watch := exec.Command(iketcpBinary(t), "status", "--watch", "--interval", "100ms", "--control", ctl)
	tty, err := pty.StartWithSize(watch, &pty.Winsize{Rows: 40, Cols: 120})
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	var mu sync.Mutex
	scr := new(screen)
	read := make(chan struct{})
	go func() {
		defer close(read)
		buf := make([]byte, 4096)
		for {
			n, err := tty.Read(buf)
			mu.Lock()
			scr.write(string(buf[:n]))
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	shown := func() string {
		mu.Lock()
		defer mu.Unlock()
		return scr.String()
	}
	waitFor(t, "the first frame", func() bool { return strings.Contains(shown(), "sessions: 0") })
	if !strings.HasPrefix(shown(), "iketcp status, every 100ms") || !strings.Contains(shown(), "iketcp server (rfc9329 mode)") {
		t.Fatalf("first frame:\n%s", shown())
	}

	openSession(t, srv, backend)
	waitFor(t, "the session on screen", func() bool { return strings.Contains(shown(), "sessions: 1") })
	waitFor(t, "the session's block", func() bool { return strings.Contains(shown(), "state: half-open") })
	s := shown()
	if strings.Contains(s, "sessions: 0") || strings.Count(s, "iketcp status, every") != 1 || !strings.Contains(s, "IKE SA: spi 4200000000000000/0000000000000000") {
		t.Fatalf("the screen is not one redrawn frame:\n%s", s)
	}
	mu.Lock()
	hidden := scr.cursorOff
	mu.Unlock()
	if !hidden {
		t.Error("the cursor is shown while watching")
	}
	watch.Process.Signal(syscall.SIGINT)
	if err := watch.Wait(); err != nil {
		t.Fatalf("status --watch after SIGINT: %v", err)
	}
	tty.Close()
	<-read
	if scr.cursorOff {
		t.Error("the cursor stays hidden after status --watch ends")
	}

	for _, key := range []string{"1", "session-1", "4200000000000000"} {
		out, err := exec.Command(iketcpBinary(t), "status", "--control", ctl, "--session", key).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "name: session-1\n") || !strings.Contains(string(out), "state: half-open") ||
			!strings.Contains(string(out), "stat: rxp=1 txp=0 rxb=32 txb=0\nsince: ") {
			t.Errorf("status --session %s: %v\n%s", key, err, out)
		}
	}
	out, err := exec.Command(iketcpBinary(t), "status", "--control", ctl, "--session", "deadbeef").CombinedOutput()
	if err == nil || !strings.Contains(string(out), `no session or flow "deadbeef"`) {
		t.Errorf("status --session of nothing: %v\n%s", err, out)
	}
}

// TestTwoTunnelsInOneClient runs one client process with two tunnels from
// its file, each to its own server and backend, and carries an
// IKE_SA_INIT through each; status reads each tunnel on its own socket,
// and the metrics name both.
func TestTwoTunnelsInOneClient(t *testing.T) {
	dir := t.TempDir()
	var srvs []string
	var backends []*net.UDPConn
	for i := range 2 {
		b := udpBackend(t)
		srv := freeTCP(t)
		p := startIketcp(t, "server", "--listen", srv, "--backend", b.LocalAddr().String(), "--control", filepath.Join(dir, fmt.Sprintf("s%d.sock", i)))
		waitFor(t, "server", func() bool { return strings.Contains(p.out.String(), "server listening") })
		srvs, backends = append(srvs, srv), append(backends, b)
	}
	var listens []string
	for range 2 {
		u, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		listens = append(listens, u.LocalAddr().String())
		u.Close()
	}
	metricsAddr := freeTCP(t)
	file := filepath.Join(dir, "client.yaml")
	os.WriteFile(file, []byte(fmt.Sprintf(`role: client
metrics: %s
tunnels:
  - name: hub-a
    peer: %s
    listen: %s
    control: %s
  - name: hub-b
    peer: %s
    listen: %s
    control: %s
`, metricsAddr, srvs[0], listens[0], filepath.Join(dir, "a.sock"), srvs[1], listens[1], filepath.Join(dir, "b.sock"))), 0o600)
	p := startIketcp(t, "client", "--config", file)
	waitFor(t, "both tunnels", func() bool { return strings.Count(p.out.String(), "client listening") == 2 })
	for i, l := range listens {
		site, err := net.Dial("udp", l)
		if err != nil {
			t.Fatal(err)
		}
		defer site.Close()
		site.Write(ikeInit())
		backends[i].SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 100)
		if n, _, err := backends[i].ReadFromUDP(buf); err != nil || !bytes.Equal(buf[:n], ikeInit()) {
			t.Fatalf("tunnel %d: backend got %x (%v)", i, buf[:n], err)
		}
	}
	for _, name := range []string{"a", "b"} {
		if n := counter(t, filepath.Join(dir, name+".sock"), "flows_created"); n != 1 {
			t.Errorf("tunnel hub-%s: flows_created %d, want 1", name, n)
		}
	}
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	http.DefaultClient.CloseIdleConnections()
	for _, name := range []string{"hub-a", "hub-b"} {
		if want := `iketcp_frames_total{direction="out",kind="ike",role="client",tunnel="` + name + `"} 1`; !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(t); code != exitOK {
		t.Fatalf("exit %d:\n%s", code, p.out.String())
	}
	if !strings.Contains(p.out.String(), "tunnel=hub-b") {
		t.Errorf("log lines do not name their tunnel:\n%s", p.out.String())
	}
}

// TestDrainIsBounded: a client that reads nothing keeps frames queued at
// the server; SIGTERM waits for them until --shutdown-timeout, no longer,
// says so, and exits 0.
func TestDrainIsBounded(t *testing.T) {
	dir := t.TempDir()
	backend := udpBackend(t)
	srv := freeTCP(t)
	p := startIketcp(t, "server", "--listen", srv, "--backend", backend.LocalAddr().String(), "--control", filepath.Join(dir, "s.sock"),
		"--shutdown-timeout", "1s")
	waitFor(t, "the server", func() bool { return strings.Contains(p.out.String(), "server listening") })
	// A client with a small receive window, that never reads.
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	c, err := d.Dial("tcp", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ike := ikeInit()
	c.Write(append(binary.BigEndian.AppendUint16([]byte("IKETCP"), uint16(len(ike)+2)), ike...))
	backend.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, from, err := backend.ReadFromUDP(make([]byte, 100))
	if err != nil {
		t.Fatal(err)
	}
	// The backend answers with 4 MB of IKE, which is never dropped for
	// being late: what the socket does not take waits in the link's queue.
	resp := make([]byte, 4+1000)
	copy(resp, ike)
	resp[4+8], resp[4+19] = 0x51, 0x20
	binary.BigEndian.PutUint32(resp[4+24:], 1000)
	for range 4000 {
		backend.WriteToUDP(resp, from)
	}
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	p.cmd.Process.Signal(syscall.SIGTERM)
	code := p.wait(t)
	took := time.Since(start)
	t.Logf("stopped in %v with frames queued", took.Round(time.Millisecond))
	if code != exitOK || took < 900*time.Millisecond || took > 3*time.Second ||
		!strings.Contains(p.out.String(), "drain cut short by --shutdown-timeout") {
		t.Fatalf("exit %d after %v, want 0 after about 1s, the drain cut short:\n%s", code, took, p.out.String())
	}
}
