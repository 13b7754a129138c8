package lab

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ownerFile, in a lab's run directory, holds "PID STARTTIME" of the process
// that created the lab.
const ownerFile = "owner"

// CleanupStale deletes namespaces whose names start with prefix + "-" and
// whose lab is no longer owned by a running process: leftovers of runs that
// crashed or were killed before Lab.Close. Processes still inside such a
// namespace (found with `ip netns pids`) are killed by PID first. Labs of
// live processes, including other test binaries running at the same time,
// are left alone. It returns the names of the deleted namespaces.
func CleanupStale(ctx context.Context, prefix string) ([]string, error) {
	if !prefixPattern.MatchString(prefix) {
		return nil, fmt.Errorf("lab prefix %q: use 1-12 lowercase letters and digits, starting with a letter", prefix)
	}
	ipPath, err := mustTool("ip")
	if err != nil {
		return nil, err
	}
	out, err := runHost(ctx, ipPath, "netns", "list")
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, ns := range parseNetnsList(out) {
		labName, ok := labOfNamespace(prefix, ns)
		if !ok || ownerAlive(filepath.Join(runRoot, labName, ownerFile)) {
			continue
		}
		if _, err := killNamespacePIDs(ctx, ipPath, ns); err != nil {
			errs = append(errs, err)
		}
		if _, err := runHost(ctx, ipPath, "netns", "del", ns); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, ns)
	}
	// Run directories whose lab is gone.
	entries, _ := os.ReadDir(runRoot)
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), prefix+"-") {
			continue
		}
		dir := filepath.Join(runRoot, e.Name())
		if claiming(dir) {
			continue
		}
		if !ownerAlive(filepath.Join(dir, ownerFile)) {
			if err := os.RemoveAll(dir); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return removed, errors.Join(errs...)
}

// parseNetnsList reads `ip netns list` output: "NAME" or "NAME (id: N)"
// per line.
func parseNetnsList(out []byte) []string {
	var names []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	return names
}

// labOfNamespace returns the lab name of a namespace "PREFIX-XXXX-ROLE".
func labOfNamespace(prefix, ns string) (string, bool) {
	if !strings.HasPrefix(ns, prefix+"-") {
		return "", false
	}
	i := strings.LastIndexByte(ns, '-')
	if i <= len(prefix) {
		return "", false
	}
	return ns[:i], true
}

// ownerStamp identifies a process in a way that survives PID reuse.
func ownerStamp(pid int) (string, error) {
	st, err := processStartTime(pid)
	if err != nil {
		return "", fmt.Errorf("read start time of pid %d: %w", pid, err)
	}
	return fmt.Sprintf("%d %s\n", pid, st), nil
}

// processStartTime returns field 22 of /proc/PID/stat (start time in clock
// ticks since boot).
func processStartTime(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// The command name (field 2) is in parentheses and may contain spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return "", fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); start time is field 22.
	if len(f) < 20 {
		return "", fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	return f[19], nil
}

// ownerAlive reports whether the owner file names a process that still
// runs. A missing or unreadable file means no owner.
func ownerAlive(path string) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return false
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil || pid <= 0 {
		return false
	}
	st, err := processStartTime(pid)
	return err == nil && st == f[1]
}

func namespacePIDs(ctx context.Context, ipPath, ns string) ([]int, error) {
	out, err := runHost(ctx, ipPath, "netns", "pids", ns)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 && pid != os.Getpid() {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// killNamespacePIDs sends SIGKILL to every process inside the namespace and
// waits (bounded) until none is left. It returns the PIDs it killed.
func killNamespacePIDs(ctx context.Context, ipPath, ns string) ([]int, error) {
	pids, err := namespacePIDs(ctx, ipPath, ns)
	if err != nil || len(pids) == 0 {
		return nil, err
	}
	for _, pid := range pids {
		// FindProcess holds a pidfd, so the signal cannot reach a process
		// that took over a recycled PID.
		p, err := os.FindProcess(pid)
		if err != nil {
			continue
		}
		_ = p.Signal(syscall.SIGKILL)
		p.Release()
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		left, err := namespacePIDs(ctx, ipPath, ns)
		if err != nil {
			return pids, err
		}
		if len(left) == 0 || allZombies(left) {
			return pids, nil
		}
		select {
		case <-ctx.Done():
			return pids, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return pids, fmt.Errorf("processes still in namespace %s 5 s after SIGKILL", ns)
}

// allZombies reports whether every PID is a zombie: dead, and only waiting
// for a parent outside the lab to reap it.
func allZombies(pids []int) bool {
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) || b[i+2] != 'Z' {
			return false
		}
	}
	return true
}

// ProcessStamp identifies a running process in a way that survives PID
// reuse ("PID STARTTIME"), for records that outlive the process that
// wrote them (`iketcp-lab up`'s state file).
func ProcessStamp(pid int) (string, error) {
	s, err := ownerStamp(pid)
	return strings.TrimSpace(s), err
}

// StampAlive reports whether the process a ProcessStamp named still runs:
// a zombie, dead and waiting to be reaped, does not.
func StampAlive(stamp string) bool {
	f := strings.Fields(stamp)
	if len(f) != 2 {
		return false
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil || pid <= 0 {
		return false
	}
	st, err := processStartTime(pid)
	return err == nil && st == f[1] && !allZombies([]int{pid})
}

// RunRoot is the directory under /run that holds the labs' run
// directories, and `iketcp-lab up`'s state files.
const RunRoot = runRoot

// claiming reports whether dir is a run directory another process is
// claiming right now: created, its owner file not yet written (claimName
// writes it just after). Removing it then would take the name from under
// a live lab.
func claiming(dir string) bool {
	if _, err := os.Stat(filepath.Join(dir, ownerFile)); !errors.Is(err, os.ErrNotExist) {
		return false
	}
	fi, err := os.Stat(dir)
	return err == nil && time.Since(fi.ModTime()) < time.Minute
}
