package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
)

// TestUserLab runs `iketcp-lab up`, `test` and `down` as a user would:
// the lab stays up between commands, test brings a real tunnel up
// through the block-udp carrier with the probe's verdict, and down leaves
// the host's namespaces, processes and /run as they were. Then the same
// after the lab's holder was killed: down removes what the state file
// records.
func TestUserLab(t *testing.T) {
	lab.Require(t)
	dir := t.TempDir()
	labBin := filepath.Join(dir, "iketcp-lab")
	if out, err := exec.Command("go", "build", "-o", labBin, "github.com/iketcp/iketcp/cmd/iketcp-lab").CombinedOutput(); err != nil {
		t.Fatalf("building iketcp-lab: %v\n%s", err, out)
	}
	name := fmt.Sprintf("t%d", os.Getpid()%100000)
	run := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, labBin, append(args, "--name", name)...)
		cmd.WaitDelay = 5 * time.Second
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	netns := func() string {
		out, err := exec.Command("ip", "netns", "list").Output()
		if err != nil {
			t.Fatal(err)
		}
		var own []string // other tests' labs come and go meanwhile
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, "ikl-") {
				own = append(own, strings.Fields(l)[0])
			}
		}
		return strings.Join(own, " ")
	}
	statePath := filepath.Join(lab.RunRoot, "user-"+name+".json")
	t.Cleanup(func() {
		if _, err := os.Stat(statePath); err == nil {
			out, err := run("down")
			t.Logf("cleanup: iketcp-lab down: %v\n%s", err, out)
		}
	})
	before := netns()

	out, err := run("up", "--profile", lab.ProfileBlockUDP, "--iketcp", iketcpBinary)
	t.Logf("iketcp-lab up:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Holder     string   `json:"holder"`
		Namespaces []string `json:"namespaces"`
		Processes  []string `json:"processes"`
		Dirs       []string `json:"dirs"`
	}
	readState := func() {
		b, err := os.ReadFile(statePath)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &st); err != nil {
			t.Fatal(err)
		}
		if len(st.Namespaces) != 3 || len(st.Processes) != 4 || !lab.StampAlive(st.Holder) {
			t.Fatalf("state: %+v, want 3 namespaces, 4 processes (two charons, server, client) and a live holder", st)
		}
	}
	readState()
	if _, err := run("up", "--profile", lab.ProfileOpen, "--iketcp", iketcpBinary); err == nil {
		t.Error("a second up with the same name succeeded")
	}

	out, err = run("test")
	t.Logf("iketcp-lab test:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"UDP 4500 is blocked here (no answer to 3 IKE_SA_INIT probes); use --transport tcp",
		"ESTABLISHED in",
		"5 of 5 replies",
		"result: the tunnel is up and pings cross",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("test output lacks %q", want)
		}
	}

	gone := func(when string) {
		t.Helper()
		if after := netns(); after != before {
			t.Errorf("%s: namespaces %q, before up %q", when, after, before)
		}
		for _, p := range append(st.Processes, st.Holder) {
			if lab.StampAlive(p) {
				t.Errorf("%s: process %s still runs", when, p)
			}
		}
		for _, d := range append(st.Dirs, statePath) {
			if _, err := os.Stat(d); err == nil {
				t.Errorf("%s: %s is still there", when, d)
			}
		}
	}
	out, err = run("down")
	t.Logf("iketcp-lab down:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	gone("after down")

	// The holder killed: down removes what the state file records.
	if out, err := run("up", "--profile", lab.ProfileCGNAT, "--iketcp", iketcpBinary); err != nil {
		t.Fatalf("up again: %v\n%s", err, out)
	}
	readState()
	var pid int
	fmt.Sscan(st.Holder, &pid)
	p, err := os.FindProcess(pid)
	if err != nil {
		t.Fatal(err)
	}
	p.Kill()
	p.Release()
	for range 50 {
		if !lab.StampAlive(st.Holder) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := run("test"); err == nil {
		t.Errorf("test with the holder gone succeeded:\n%s", out)
	}
	out, err = run("down")
	t.Logf("iketcp-lab down after the holder was killed:\n%s", out)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "deleted namespace") || !strings.Contains(out, "killed process") {
		t.Errorf("down did not say what it removed")
	}
	gone("after down with the holder killed")
}
