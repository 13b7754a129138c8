package server_test

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/iketcp/iketcp/framing"
	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/client"
	"github.com/iketcp/iketcp/relay/relaytest"
	"github.com/iketcp/iketcp/relay/server"
	"github.com/iketcp/iketcp/relay/server/statefile"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// logBuffer collects a server's log lines for a test to read.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) lines(substr string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range strings.Split(l.b.String(), "\n") {
		if strings.Contains(line, substr) {
			out = append(out, line)
		}
	}
	return out
}

// runServer serves one server on ln until the returned stop is called.
func runServer(t *testing.T, cfg server.Config, ln net.Listener) (*server.Server, func()) {
	t.Helper()
	srv, err := server.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, streamlink.NewListener(ln, streamlink.Config{Counters: srv.Counters(), Logger: cfg.Logger})); err != nil {
			t.Errorf("server: %v", err)
		}
	}()
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return srv, stop
}

// TestRestartKeepsSessions: a server with a state file is stopped and a
// new one starts on the same port from the file as the running server had
// written it (not from the final write, as after a crash). The new one
// binds the session's backend port again, the client reconnects and
// claims its session with its ticket, and traffic flows both ways from
// the same backend port: the gateway sees no change.
func TestRestartKeepsSessions(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	backend, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	cfg := server.Config{
		Backend: backend.LocalAddr().(*net.UDPAddr).AddrPort(), Logger: relaytest.Logger(t),
		StatePath: state, StateInterval: 20 * time.Millisecond,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	srvA, stopA := runServer(t, cfg, ln)

	// The client, for the whole test.
	site, _ := startSite(t, addr, 20*time.Millisecond)

	const ispi, toHub, toSite = 0x1111222233334444, 0xc0de0001, 0xc0de0002
	init := relaytest.IKE(ispi, 0, framing.IKESAInit, framing.FlagInitiator, 300)
	site.Write(init)
	_, from := relaytest.Recv(t, backend)
	backend.WriteToUDPAddrPort(relaytest.IKE(ispi, 0x5151, framing.IKESAInit, framing.FlagResponse, 280), from)
	relaytest.Recv(t, site) // the ticket came before it, on the same link
	site.Write(relaytest.ESP(toHub, 1, 500))
	if _, f := relaytest.Recv(t, backend); f != from {
		t.Fatalf("ESP from %v, want the session's %v", f, from)
	}

	// The table, as the running server writes it: the session, its SPIs
	// and its key.
	var crashed []byte
	relaytest.Eventually(t, "the state file with the session", func() bool {
		tb, err := statefile.Read(state)
		if err != nil || len(tb.Sessions) != 1 {
			return false
		}
		s := tb.Sessions[0]
		if s.Local != from || len(s.Key) != statefile.KeySize || len(s.ESP) != 1 || s.ESP[0] != toHub || s.IKE[0].SPI != ispi {
			return false
		}
		crashed, _ = os.ReadFile(state)
		return true
	})
	if fi, _ := os.Stat(state); fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file mode %v", fi.Mode().Perm())
	}
	stopA()
	writes := relaytest.Counter(srvA.Counters(), "state_writes") // the final write included
	if err := os.WriteFile(state, crashed, 0o600); err != nil {
		t.Fatal(err)
	}

	ln2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srvB, _ := runServer(t, cfg, ln2)
	sc := srvB.Counters()
	relaytest.Eventually(t, "the session restored", func() bool { return relaytest.Counter(sc, "sessions_restored") == 1 })
	// The client's traffic brings it back: its link reconnects and claims
	// the session; the backend sees the same port, and its answers reach
	// the site.
	var got []byte
	relaytest.Eventually(t, "ESP through the restarted server", func() bool {
		site.Write(relaytest.ESP(toHub, 2, 500))
		backend.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		buf := make([]byte, 2048)
		n, f, err := backend.ReadFromUDPAddrPort(buf)
		if err != nil {
			return false
		}
		if f != from {
			t.Fatalf("after the restart the backend hears the session from %v, want %v", f, from)
		}
		got = buf[:n]
		return true
	})
	if len(got) != 500 {
		t.Fatalf("backend got %d bytes", len(got))
	}
	relaytest.Eventually(t, "the claim", func() bool { return relaytest.Counter(sc, "claims_accepted") == 1 })
	backend.WriteToUDPAddrPort(relaytest.ESP(toSite, 2, 400), from)
	if b, _ := relaytest.Recv(t, site); len(b) != 400 {
		t.Fatalf("site got %d bytes", len(b))
	}
	if c := relaytest.Counter(sc, "sessions_created"); c != 0 {
		t.Fatalf("the restarted server created %d sessions, want the restored one only", c)
	}
	st := srvB.Status()
	if len(st.Sessions) != 1 || st.Sessions[0].State != "up" || st.Sessions[0].Local != from.String() {
		t.Fatalf("status after the restart: %+v", st.Sessions)
	}
	// Writes were few: a handful for the session's changes, not one per
	// datagram.
	if writes == 0 || writes > 10 {
		t.Fatalf("the first server wrote the state file %d times", writes)
	}
}

// TestStateIgnored: a state file that cannot be used is reported in one
// line and ignored: the server starts without sessions and serves.
func TestStateIgnored(t *testing.T) {
	backendAddr := netip.MustParseAddrPort("127.0.0.1:4500")
	good := func(config string, written time.Time) []byte {
		b, err := statefile.Encode(&statefile.Table{
			Config: config, Written: written, NextSession: 1,
			Sessions: []statefile.Session{{ID: 1, Source: netip.MustParsePrefix("192.0.2.1/32"), Local: netip.MustParseAddrPort("127.0.0.1:40001"),
				IKE: []statefile.IKERoute{{SPI: 9}}}},
		})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	cases := []struct {
		name  string
		write func(t *testing.T, path, config string)
		want  string
	}{
		{"corrupt", func(t *testing.T, path, config string) {
			b := good(config, time.Now())
			os.WriteFile(path, b[:len(b)-3], 0o600)
		}, "corrupt"},
		{"stale", func(t *testing.T, path, config string) {
			os.WriteFile(path, good(config, time.Now().Add(-time.Hour)), 0o600)
		}, "stale"},
		{"foreign", func(t *testing.T, path, config string) {
			os.WriteFile(path, good(strings.Replace(config, "4500", "4501", 1), time.Now()), 0o600)
		}, "another configuration"},
		{"readable by others", func(t *testing.T, path, config string) {
			os.WriteFile(path, good(config, time.Now()), 0o644)
			os.Chmod(path, 0o644)
		}, "readable by others"},
		{"unreadable", func(t *testing.T, path, config string) {
			os.Mkdir(path, 0o700)
		}, "state file ignored"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			config := "rfc9329://" + ln.Addr().String() + " -> " + backendAddr.String()
			path := filepath.Join(t.TempDir(), "state")
			c.write(t, path, config)
			logs := new(logBuffer)
			cfg := server.Config{Backend: backendAddr, StatePath: path,
				Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
			srv, stop := runServer(t, cfg, ln)
			relaytest.Eventually(t, "the server's word on the state file", func() bool { return len(logs.lines("state file ignored")) > 0 })
			lines := logs.lines("state file")
			if len(lines) != 1 || !strings.Contains(lines[0], c.want) || !strings.Contains(lines[0], "level=WARN") {
				t.Fatalf("log lines about the state file: %q, want one warning saying %q", lines, c.want)
			}
			if n := len(srv.Status().Sessions); n != 0 {
				t.Fatalf("%d sessions restored from a bad file", n)
			}
			// It serves: a client's IKE_SA_INIT reaches the (absent)
			// backend's socket without trouble, and the server stops
			// cleanly, replacing the bad file with its own table.
			conn, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			conn.Write([]byte(framing.Prefix))
			relaytest.Frame(t, conn, relaytest.Init(0x77))
			relaytest.Eventually(t, "a session", func() bool { return relaytest.Counter(srv.Counters(), "sessions_created") == 1 })
			conn.Close()
			stop()
			if c.name != "unreadable" {
				if _, err := statefile.Read(path); err != nil {
					t.Fatalf("the server's own file: %v", err)
				}
			}
		})
	}
}

// TestStateRestorePortTaken: a session whose old backend port is taken
// meanwhile is not restored, and says why in the one line; the others are.
func TestStateRestorePortTaken(t *testing.T) {
	backendAddr := netip.MustParseAddrPort("127.0.0.1:4500")
	taken, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	free, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	freePort := free.LocalAddr().(*net.UDPAddr).AddrPort()
	free.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "state")
	err = statefile.Write(path, &statefile.Table{
		Config: "rfc9329://" + ln.Addr().String() + " -> " + backendAddr.String(), Written: time.Now(), NextSession: 41,
		Sessions: []statefile.Session{
			{ID: 40, Source: netip.MustParsePrefix("192.0.2.1/32"), Local: taken.LocalAddr().(*net.UDPAddr).AddrPort(), IKE: []statefile.IKERoute{{SPI: 1}}},
			{ID: 41, Source: netip.MustParsePrefix("192.0.2.1/32"), Local: freePort, IKE: []statefile.IKERoute{{SPI: 2}}, ESP: []uint32{0x1000}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	logs := new(logBuffer)
	srv, _ := runServer(t, server.Config{Backend: backendAddr, StatePath: path,
		Logger: slog.New(slog.NewTextHandler(logs, nil))}, ln)
	relaytest.Eventually(t, "the restore", func() bool { return len(logs.lines("restored")) == 1 })
	if l := logs.lines("restored")[0]; !strings.Contains(l, "restored 1 sessions") || !strings.Contains(l, "not_restored=1") {
		t.Fatalf("restore line: %s", l)
	}
	st := srv.Status()
	if len(st.Sessions) != 1 || st.Sessions[0].ID != 41 || st.Sessions[0].Local != freePort.String() || st.Sessions[0].State != "waiting" {
		t.Fatalf("sessions: %+v", st.Sessions)
	}
	// New sessions continue after the file's IDs.
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte(framing.Prefix))
	relaytest.Frame(t, conn, relaytest.Init(0x99))
	relaytest.Eventually(t, "a new session", func() bool { return len(srv.Status().Sessions) == 2 })
	if id := srv.Status().Sessions[1].ID; id != 42 {
		t.Fatalf("new session's ID %d, want 42", id)
	}
}

// TestStateWriteRate: changes are written together, at most once per
// StateInterval, and datagrams on known SPIs write nothing.
func TestStateWriteRate(t *testing.T) {
	const interval = 200 * time.Millisecond
	path := filepath.Join(t.TempDir(), "state")
	r := relaytest.NewRig(t, relaytest.RigOptions{NoCl: true, Server: server.Config{StatePath: path, StateInterval: interval}})
	sc := r.Srv.Counters()
	c := r.RawConn(true)
	d := framing.NewDecoder(c, 0, false)
	start := time.Now()
	const sessions = 30
	for i := range sessions {
		r.OpenSession(c, d, uint64(0x7000+i))
		relaytest.Frame(t, c, relaytest.ESP(uint32(0x9000+i), 1, 100)) // learned: a change
		relaytest.Recv(t, r.Backend)
		time.Sleep(20 * time.Millisecond)
	}
	relaytest.Eventually(t, "every session in the file", func() bool {
		tb, err := statefile.Read(path)
		return err == nil && len(tb.Sessions) == sessions
	})
	// A change marked just before that write (the last SPI learned) is
	// written within the next interval: let it settle before counting.
	time.Sleep(2 * interval)
	took := time.Since(start)
	writes := relaytest.Counter(sc, "state_writes")
	if most := uint64(took/interval) + 2; writes < 1 || writes > most {
		t.Fatalf("%d writes in %v of changes, want 1 to %d", writes, took.Round(time.Millisecond), most)
	}
	// A flood on known SPIs changes nothing.
	var burst [][]byte
	for i := range 2000 {
		burst = append(burst, relaytest.ESP(0x9000+uint32(i%sessions), uint32(i+2), 100))
	}
	relaytest.Frame(t, c, burst...)
	for range burst {
		relaytest.Recv(t, r.Backend)
	}
	time.Sleep(3 * interval)
	if now := relaytest.Counter(sc, "state_writes"); now != writes {
		t.Fatalf("2000 datagrams on known SPIs made %d writes", now-writes)
	}
	t.Logf("%d sessions and their SPIs over %v: %d writes", sessions, took.Round(time.Millisecond), writes)
}

// startSite starts an explicit client toward the server at addr, with
// reconnects from reconnectMin (0: the default), for the test's life, and
// returns the "daemon" socket that talks to it and the client's counters.
func startSite(t *testing.T, addr string, reconnectMin time.Duration) (*net.UDPConn, *relay.Counters) {
	t.Helper()
	counters := new(relay.Counters)
	d := streamlink.NewDialer(streamlink.Config{Counters: counters, Logger: relaytest.Logger(t)})
	_, site := relaytest.ServeExplicit(t, client.Config{Peer: addr, Dialer: d, Counters: counters, ReconnectMin: reconnectMin})
	return site, counters
}
