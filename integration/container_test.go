package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/iketcp/iketcp/integration/lab"
	"github.com/iketcp/iketcp/relay"
)

// imageConfig is the part of an OCI image's configuration a runtime
// starts a container from.
type imageConfig struct {
	User       string   `json:"User"`
	Env        []string `json:"Env"`
	Entrypoint []string `json:"Entrypoint"`
	Cmd        []string `json:"Cmd"`
}

// TestContainerImageAsSidecar builds the repository's Dockerfile with
// podman (the binary from this checkout, CGO_ENABLED=0, through the
// Dockerfile's context stage), then runs the image itself as a sidecar
// the way a pod would, since podman run cannot run here: the image's root
// filesystem, its entrypoint, command, user and environment from the
// image's configuration, in the hub's network namespace beside strongSwan,
// with mount and PID namespaces of its own and the root changed to the
// image's. A real tunnel comes up through it and pings cross; the process
// runs as the image's user with no capability, as PID 1 of its namespace.
func TestContainerImageAsSidecar(t *testing.T) {
	lab.Require(t)
	for _, tool := range []string{"podman", "unshare", "chroot"} {
		if lab.ToolPath(tool) == "" {
			msg := tool + " not found: run make deps"
			if os.Getenv("CI") == "true" {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// The build context: the Dockerfile, and bin/image/ as make
	// image-context leaves it.
	buildDir := t.TempDir()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	dockerfile, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(buildDir, "Dockerfile"), dockerfile, 0o644); err != nil {
		t.Fatal(err)
	}
	runDir := filepath.Join(buildDir, "bin/image/run/iketcp")
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(runDir, 0o1777); err != nil {
		t.Fatal(err)
	}
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w -X main.version=container-test", "-o", filepath.Join(buildDir, "bin/image/iketcp"), "github.com/iketcp/iketcp/cmd/iketcp")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the static binary: %v\n%s", err, out)
	}
	tag := fmt.Sprintf("localhost/iketcp-test:%d", os.Getpid())
	images := func() map[string]bool {
		out, err := exec.Command("podman", "images", "--all", "--quiet", "--no-trunc").Output()
		if err != nil {
			t.Fatalf("podman images: %v", err)
		}
		ids := map[string]bool{}
		for _, id := range strings.Fields(string(out)) {
			ids[id] = true
		}
		return ids
	}
	before := images()
	start := time.Now()
	out, err := exec.CommandContext(ctx, "podman", "build", "--build-arg", "BINARY_FROM=context", "-t", tag, buildDir).CombinedOutput()
	if err != nil {
		t.Fatalf("podman build: %v\n%s", err, out)
	}
	t.Logf("podman build took %v", time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		// The image and the build's intermediate stages: every image the
		// build added, and only those.
		if out, err := exec.Command("podman", "rmi", "--force", tag).CombinedOutput(); err != nil {
			t.Errorf("podman rmi %s: %v\n%s", tag, err, out)
		}
		for id := range images() {
			if !before[id] {
				if out, err := exec.Command("podman", "rmi", "--force", id).CombinedOutput(); err != nil {
					t.Errorf("podman rmi %s: %v\n%s", id, err, out)
				}
			}
		}
		if left := len(images()) - len(before); left != 0 {
			t.Errorf("%d images more than before the build", left)
		}
	})

	// The image's configuration and root filesystem.
	out, err = exec.CommandContext(ctx, "podman", "image", "inspect", "--format", "{{json .Config}}", tag).Output()
	if err != nil {
		t.Fatal(err)
	}
	var cfg imageConfig
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if cfg.User == "" || strings.HasPrefix(cfg.User, "0") || len(cfg.Entrypoint) == 0 || len(cfg.Cmd) == 0 || cfg.Cmd[0] != "server" {
		t.Fatalf("image configuration %+v: want a non-root user, an entrypoint and the server command", cfg)
	}
	mnt, err := exec.CommandContext(ctx, "podman", "image", "mount", tag).Output()
	if err != nil {
		t.Fatalf("podman image mount: %v", err)
	}
	rootfs := filepath.Join(t.TempDir(), "rootfs")
	cp, err := exec.CommandContext(ctx, "cp", "-a", strings.TrimSpace(string(mnt))+"/.", rootfs+"/").CombinedOutput()
	exec.Command("podman", "image", "unmount", tag).Run()
	if err != nil {
		t.Fatalf("copying the image's root filesystem: %v\n%s", err, cp)
	}
	entries, _ := os.ReadDir(rootfs)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "iketcp run" {
		t.Errorf("the image holds %v, want only the binary and /run", names)
	}
	if fi, err := os.Stat(filepath.Join(rootfs, cfg.Entrypoint[0])); err != nil || fi.Mode()&0o111 == 0 {
		t.Fatalf("the entrypoint %s is not an executable in the image: %v", cfg.Entrypoint[0], err)
	}
	if file, err := exec.Command("file", filepath.Join(rootfs, cfg.Entrypoint[0])).Output(); err == nil && !strings.Contains(string(file), "statically linked") {
		t.Errorf("the binary is not static: %s", file)
	}

	// The pod: the hub's charon, and the image as its sidecar, given the
	// pod's arguments (those of deploy/kubernetes/gateway-sidecar.yaml:
	// the command, then --listen and --backend).
	l := lab.NewForTest(t, lab.Options{})
	if err := l.SetProfile(ctx, lab.ProfileBlockUDP); err != nil {
		t.Fatal(err)
	}
	tun, err := l.StartTunnel(ctx, lab.TunnelOptions{Binary: iketcpBinary, ExternalServer: true})
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"server", "--listen", ":" + strconv.Itoa(lab.ServerPort), "--backend", "127.0.0.1:4500", "--log-level", "debug"}
	env := append([]string{"-i"}, cfg.Env...)
	sidecar := []string{"--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
		"env"}
	sidecar = append(sidecar, env...)
	sidecar = append(sidecar, "chroot", "--userspec="+cfg.User, rootfs)
	sidecar = append(sidecar, cfg.Entrypoint...)
	sidecar = append(sidecar, args...)
	p, err := l.Hub.Start(ctx, filepath.Join(l.Dir, "hub-sidecar.log"), "unshare", sidecar...)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.WaitLog(ctx, "server listening", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// status as `kubectl exec -c iketcp -- /iketcp status` runs it: the
	// image's user, root and environment.
	status := func() *relay.Status {
		t.Helper()
		cmdArgs := append(append([]string{"-i"}, cfg.Env...), "chroot", "--userspec="+cfg.User, rootfs, cfg.Entrypoint[0], "status", "--json")
		out, err := l.Hub.Run(ctx, "env", cmdArgs...)
		if err != nil {
			t.Fatalf("status in the container: %v\n%s", err, out)
		}
		var st relay.Status
		if err := json.Unmarshal(out, &st); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		return &st
	}

	sa, err := tun.Initiate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := tun.PingThrough(ctx, 5, 100*time.Millisecond)
	if err != nil || got != 5 {
		t.Fatalf("%d of 5 pings crossed the tunnel through the container: %v", got, err)
	}
	st := status()
	if len(st.Sessions) != 1 || !strings.HasPrefix(st.Sessions[0].Peer, lab.CarrierHub+":") {
		t.Fatalf("the container's server has sessions %+v, want one from %s", st.Sessions, lab.CarrierHub)
	}
	t.Logf("IKE SA %s/%s through the container; its session from %s", sa.InitiatorSPI, sa.ResponderSPI, st.Sessions[0].Peer)

	// The container's process: the image's user, no capability, PID 1 of
	// a PID namespace of its own, a mount namespace of its own, the hub's
	// network namespace, and the image for its root.
	pid := containerPID(t, p.PID())
	procStatus, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(procStatus), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.TrimSpace(v)
		}
	}
	uid := strings.SplitN(cfg.User, ":", 2)[0]
	if f := strings.Fields(fields["Uid"]); len(f) == 0 || f[0] != uid || f[1] != uid {
		t.Errorf("the container runs as uid %q, want %s", fields["Uid"], uid)
	}
	if fields["CapEff"] != "0000000000000000" || fields["CapPrm"] != "0000000000000000" {
		t.Errorf("the container has capabilities: effective %s, permitted %s", fields["CapEff"], fields["CapPrm"])
	}
	if ns := strings.Fields(fields["NSpid"]); len(ns) != 2 || ns[1] != "1" {
		t.Errorf("NSpid %q: want PID 1 of a PID namespace of its own", fields["NSpid"])
	}
	link := func(pid int, what string) string {
		s, _ := os.Readlink(fmt.Sprintf("/proc/%d/%s", pid, what))
		return s
	}
	if link(pid, "ns/mnt") == link(os.Getpid(), "ns/mnt") {
		t.Error("the container shares the host's mount namespace")
	}
	hubPIDs, _ := l.Hub.PIDs(ctx)
	hubNet := ""
	for _, hp := range hubPIDs {
		if hp == tun.Hub.PID() {
			hubNet = link(hp, "ns/net")
		}
	}
	if hubNet == "" || link(pid, "ns/net") != hubNet {
		t.Errorf("the container's network namespace %s is not the hub charon's %s", link(pid, "ns/net"), hubNet)
	}
	if r := link(pid, "root"); r != rootfs {
		t.Errorf("the container's root is %s, want the image's %s", r, rootfs)
	}
}

// containerPID finds the program that `unshare --fork` started: its only
// child.
func containerPID(t *testing.T, unsharePID int) int {
	t.Helper()
	for range 50 {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", unsharePID, unsharePID))
		if err == nil {
			if f := strings.Fields(string(b)); len(f) == 1 {
				pid, _ := strconv.Atoi(f[0])
				return pid
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("unshare (pid %d) has no child", unsharePID)
	return 0
}
