// Command guestinit is PID 1 of the lab's User-Mode Linux guests
// (package integration/uml). The guest boots with the host's root
// filesystem mounted read-only through hostfs; guestinit mounts what a
// guest needs on top (proc, sysfs, devtmpfs, tmpfs on /run; nothing that
// could hide the lab's cache or directories),
// the lab's directory read-write (UML_DIR, from the kernel command line),
// and, when UML_LIBRESWAN names an unpacked libreswan tree, a tmpfs on
// /usr/libexec in which ipsec points into that tree (pluto runs
// /usr/libexec/ipsec/addconn by that path), with the tree's ipsec command
// first in PATH (its updown script runs `ipsec _updown`).
//
// Then it serves the host: it runs each script UML_DIR/cmd/N.sh in turn
// (N = 0, 1, 2, ...) with /bin/sh, writing its combined output to N.out
// and its exit status to N.rc (written last, by rename, so that the host
// sees a complete result). A script that runs longer than UML_CMD_TIMEOUT
// (seconds, default 60) is killed. When UML_DIR/cmd/stop appears, or after
// UML_LIFETIME seconds (default 600), guestinit stops every process,
// unmounts the lab's directory and powers the guest off.
package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	pollInterval = 20 * time.Millisecond
	// hostLibexec is where the host's /usr/libexec stays visible once a
	// tmpfs covers /usr/libexec.
	hostLibexec = "/run/host-libexec"
)

func main() {
	err := run()
	if err != nil {
		fmt.Fprintln(os.Stderr, "guestinit:", err)
	}
	powerOff()
}

func run() error {
	dir := os.Getenv("UML_DIR")
	if dir == "" {
		return fmt.Errorf("no UML_DIR on the kernel command line")
	}
	os.Setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	for _, m := range []struct{ src, target, fstype, data string }{
		{"proc", "/proc", "proc", ""},
		{"sysfs", "/sys", "sysfs", ""},
		{"devtmpfs", "/dev", "devtmpfs", ""},
		{"tmpfs", "/run", "tmpfs", "mode=755"},
		{"hostfs", dir, "hostfs", dir},
	} {
		err := unix.Mount(m.src, m.target, m.fstype, 0, m.data)
		if err == unix.EBUSY && m.fstype == "devtmpfs" {
			continue // the kernel mounted it (DEVTMPFS_MOUNT)
		}
		if err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	if err := os.MkdirAll("/dev/pts", 0o755); err == nil {
		unix.Mount("devpts", "/dev/pts", "devpts", 0, "")
	}
	if root := os.Getenv("UML_LIBRESWAN"); root != "" {
		if err := libexecFor(root); err != nil {
			return err
		}
		// pluto's updown runs `ipsec _updown` by name.
		os.Setenv("PATH", filepath.Join(root, "usr/sbin")+":"+os.Getenv("PATH"))
	}
	lifetime := envSeconds("UML_LIFETIME", 600)
	cmdTimeout := envSeconds("UML_CMD_TIMEOUT", 60)
	cmdDir := filepath.Join(dir, "cmd")
	if err := os.MkdirAll(cmdDir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "ready"), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return err
	}
	serve(cmdDir, lifetime, cmdTimeout)
	stopAll()
	unix.Sync()
	unix.Unmount(dir, 0)
	return nil
}

// libexecFor covers /usr/libexec with a tmpfs that links every entry of
// the host's /usr/libexec back, except ipsec, which goes to the libreswan
// tree unpacked at root.
func libexecFor(root string) error {
	if err := os.MkdirAll(hostLibexec, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("hostfs", hostLibexec, "hostfs", unix.MS_RDONLY, "/usr/libexec"); err != nil {
		return fmt.Errorf("mount the host's /usr/libexec: %w", err)
	}
	if err := unix.Mount("tmpfs", "/usr/libexec", "tmpfs", 0, "mode=755"); err != nil {
		return fmt.Errorf("mount tmpfs on /usr/libexec: %w", err)
	}
	entries, err := os.ReadDir(hostLibexec)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Name() == "ipsec" {
			continue
		}
		if err := os.Symlink(filepath.Join(hostLibexec, e.Name()), filepath.Join("/usr/libexec", e.Name())); err != nil {
			return err
		}
	}
	return os.Symlink(filepath.Join(root, "usr/libexec/ipsec"), "/usr/libexec/ipsec")
}

// serve runs the host's scripts in order until the stop file appears or
// the lifetime is over.
func serve(cmdDir string, lifetime, cmdTimeout time.Duration) {
	deadline := time.Now().Add(lifetime)
	for n := 0; time.Now().Before(deadline); {
		script := filepath.Join(cmdDir, strconv.Itoa(n)+".sh")
		if _, err := os.Stat(script); err == nil {
			runScript(cmdDir, n, script, cmdTimeout)
			n++
			continue
		}
		if _, err := os.Stat(filepath.Join(cmdDir, "stop")); err == nil {
			return
		}
		time.Sleep(pollInterval)
	}
	fmt.Fprintln(os.Stderr, "guestinit: lifetime over, powering off")
}

func runScript(cmdDir string, n int, script string, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", script)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.Dir = "/"
	// Its own process group: a timeout kills what the script started in
	// the foreground too. Daemons it starts are reparented to us and are
	// stopped at power-off.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	rc := 0
	if err := cmd.Run(); err != nil {
		rc = 255
		if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() >= 0 {
			rc = ee.ExitCode()
		}
		if ctx.Err() != nil {
			fmt.Fprintf(&out, "\nguestinit: killed after %s\n", timeout)
			rc = 124
		}
	}
	base := filepath.Join(cmdDir, strconv.Itoa(n))
	os.WriteFile(base+".out", out.Bytes(), 0o644)
	os.WriteFile(base+".rc.tmp", []byte(strconv.Itoa(rc)+"\n"), 0o644)
	os.Rename(base+".rc.tmp", base+".rc")
}

// stopAll sends SIGTERM to every other process, waits up to 2 s for them
// to go (reaping them, as PID 1 must), then SIGKILLs what is left.
func stopAll() {
	syscall.Kill(-1, syscall.SIGTERM)
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.ECHILD {
			return
		}
		if pid <= 0 {
			time.Sleep(pollInterval)
		}
	}
	syscall.Kill(-1, syscall.SIGKILL)
	for range 100 {
		if _, err := syscall.Wait4(-1, nil, 0, nil); err == syscall.ECHILD {
			return
		}
	}
}

func powerOff() {
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		fmt.Fprintln(os.Stderr, "guestinit: power off:", err)
	}
	// PID 1 must not return.
	for {
		time.Sleep(time.Hour)
	}
}

func envSeconds(name string, def int) time.Duration {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return time.Duration(v) * time.Second
	}
	return time.Duration(def) * time.Second
}
