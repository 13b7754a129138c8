package upgrade_test

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/relay/upgrade"
)

// childEnv makes the test binary act as the new process.
const childEnv = "IKETCP_UPGRADE_TEST_CHILD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		os.Exit(child(mode))
	}
	goleak.VerifyTestMain(m)
}

// child takes a hand-over: it checks the payload's pattern and that each
// file reads as its index says, and says taken over, or failed with why.
func child(mode string) int {
	p, err := upgrade.Inherited()
	if err != nil || p == nil {
		fmt.Fprintln(os.Stderr, "no hand-over:", err)
		return 2
	}
	if os.Getenv(upgrade.EnvFD) != "" {
		p.Failed(fmt.Errorf("%s still set", upgrade.EnvFD))
		return 2
	}
	if mode == "exit" {
		return 3
	}
	if err := p.Ready(); err != nil {
		return 2
	}
	payload, files, err := p.Receive(10 * time.Second)
	if err != nil {
		p.Failed(err)
		return 2
	}
	if !bytes.Equal(payload, pattern(len(payload))) {
		p.Failed(fmt.Errorf("payload of %d bytes differs", len(payload)))
		return 2
	}
	for i, f := range files {
		b, err := io.ReadAll(f)
		if err != nil || string(b) != fmt.Sprint(i) {
			p.Failed(fmt.Errorf("file %d reads %q (%v)", i, b, err))
			return 2
		}
	}
	if mode == "refuse" {
		p.Failed(fmt.Errorf("refused %d files", len(files)))
		return 0
	}
	if err := p.TakenOver(); err != nil {
		return 2
	}
	return 0
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i * 7)
	}
	return b
}

// start starts the test binary as the new process in mode.
func start(t *testing.T, mode string) *upgrade.Successor {
	t.Helper()
	t.Setenv(childEnv, mode)
	s, err := upgrade.Start(os.Args[0], []string{"-test.run=^$"}, os.Stdout, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestHandOver: a payload of several chunks and more files than one
// message carries reach the new process intact, which says taken over.
func TestHandOver(t *testing.T) {
	dir := t.TempDir()
	var files []*os.File
	for i := range 450 {
		path := filepath.Join(dir, fmt.Sprint(i))
		if err := os.WriteFile(path, []byte(fmt.Sprint(i)), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	s := start(t, "take")
	if err := s.WaitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := s.Send(pattern(100_000), files); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitTakenOver(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	s.Kill() // it has exited already; this reaps it
}

// TestRefusedAndExited: the new process's refusal and its early exit are
// errors that say so.
func TestRefusedAndExited(t *testing.T) {
	s := start(t, "refuse")
	if err := s.WaitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := s.Send([]byte{}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitTakenOver(10 * time.Second); err == nil || !strings.Contains(err.Error(), "refused 0 files") {
		t.Fatalf("refusal: %v", err)
	}
	s.Kill()

	s = start(t, "exit")
	if err := s.WaitReady(10 * time.Second); err == nil || !strings.Contains(err.Error(), "exited") {
		t.Fatalf("early exit: %v", err)
	}
	s.Kill()
}
