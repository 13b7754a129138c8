package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRunScript(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		script, rc, out string
		timeout         time.Duration
	}{
		{"echo hello; echo oops >&2", "0", "hello\noops\n", 5 * time.Second},
		{"echo partial; exit 3", "3", "partial\n", 5 * time.Second},
		{"echo before; sleep 5; echo after", "124", "before\n", 200 * time.Millisecond},
	} {
		script := filepath.Join(dir, "0.sh")
		if err := os.WriteFile(script, []byte(tc.script), 0o644); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		runScript(dir, 0, script, tc.timeout)
		took := time.Since(start)
		rc, err := os.ReadFile(filepath.Join(dir, "0.rc"))
		if err != nil {
			t.Fatal(err)
		}
		out, _ := os.ReadFile(filepath.Join(dir, "0.out"))
		if strings.TrimSpace(string(rc)) != tc.rc || !strings.HasPrefix(string(out), tc.out) {
			t.Errorf("%q: rc %q out %q, want rc %s out %q", tc.script, rc, out, tc.rc, tc.out)
		}
		if took > tc.timeout+3*time.Second {
			t.Errorf("%q took %s with a timeout of %s", tc.script, took, tc.timeout)
		}
		if _, err := os.Stat(filepath.Join(dir, "0.rc.tmp")); !os.IsNotExist(err) {
			t.Errorf("0.rc.tmp left behind")
		}
		os.Remove(filepath.Join(dir, "0.rc"))
	}
}

func TestServeStopsOnStopFile(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "0.sh"), []byte("echo one"), 0o644)
	os.WriteFile(filepath.Join(dir, "1.sh"), []byte("echo two"), 0o644)
	os.WriteFile(filepath.Join(dir, "stop"), nil, 0o644)
	start := time.Now()
	serve(dir, 10*time.Second, 5*time.Second)
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("serve took %s after the stop file", took)
	}
	for _, n := range []string{"0", "1"} {
		if out, err := os.ReadFile(filepath.Join(dir, n+".out")); err != nil || strings.TrimSpace(string(out)) == "" {
			t.Errorf("script %s did not run before the stop: %q %v", n, out, err)
		}
	}
}
