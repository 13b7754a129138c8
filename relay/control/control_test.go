//go:build unix

package control

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestServeAndFetch(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "server.sock")
	s, err := Listen(path, func() any { return map[string]int{"sessions": 3} }, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := Fetch(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]int
	if err := json.Unmarshal(raw, &got); err != nil || got["sessions"] != 3 {
		t.Fatalf("reply %q: %v", raw, err)
	}
	socks, err := Sockets(filepath.Dir(path))
	if err != nil || len(socks) != 1 || socks[0] != path {
		t.Fatalf("Sockets = %v, %v", socks, err)
	}

	// A second instance on the same path is refused with advice.
	if _, err := Listen(path, func() any { return nil }, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "--control") {
		t.Fatalf("second instance on a live socket: %v", err)
	}
	// Unknown requests get an error reply, not a hang.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("reboot\n"))
	buf := make([]byte, 200)
	n, _ := c.Read(buf)
	c.Close()
	if !strings.Contains(string(buf[:n]), "unknown request") {
		t.Fatalf("unknown request answered %q", buf[:n])
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after Close: %v", err)
	}
	if _, err := Fetch(context.Background(), path); err == nil {
		t.Fatal("Fetch succeeded with no instance")
	}
}

func TestStaleSocketIsReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.sock")
	// A socket file with nobody listening, as a crashed instance leaves.
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("stale socket not in place: %v", err)
	}
	s, err := Listen(path, func() any { return "ok" }, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	defer s.Close()
	if raw, err := Fetch(context.Background(), path); err != nil || !strings.Contains(string(raw), "ok") {
		t.Fatalf("after replacing: %q %v", raw, err)
	}
}

// TestRequest: an instance answers the requests it was given besides
// status, and names them when asked something else.
func TestRequest(t *testing.T) {
	path := filepath.Join(t.TempDir(), "server.sock")
	asked := 0
	s, err := Listen(path, func() any { return "st" }, slog.New(slog.DiscardHandler),
		Request{Name: "upgrade", Answer: func() any { asked++; return map[string]bool{"upgrading": true} }})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	raw, err := Ask(context.Background(), path, "upgrade")
	if err != nil || !strings.Contains(string(raw), `"upgrading": true`) || asked != 1 {
		t.Fatalf("upgrade: %q %v (asked %d)", raw, err, asked)
	}
	raw, err = Ask(context.Background(), path, "other")
	if err != nil || !strings.Contains(string(raw), "this instance answers: status, upgrade") {
		t.Fatalf("unknown request: %q %v", raw, err)
	}
}
