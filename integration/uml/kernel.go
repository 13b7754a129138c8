package uml

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// kernelConfig is the fragment merged over `make ARCH=um defconfig`.
//
//go:embed kernel.config
var kernelConfig []byte

// xstatePatches fix UML's floating-point register buffer for hosts whose
// XSAVE area is larger than UML assumes (AMX), one per source series.
//
//go:embed uml-xstate-6.1.patch
var xstatePatch61 []byte

//go:embed uml-xstate-6.12.patch
var xstatePatch612 []byte

var xstatePatches = map[string][]byte{"6.1": xstatePatch61, "6.12": xstatePatch612}

// DefaultCacheDir holds built kernels, downloaded sources and the
// unpacked libreswan, outside any checkout, so that later runs only boot.
// The environment variable IKETCP_LAB_CACHE replaces its parent.
const DefaultCacheDir = "/var/cache/iketcp-lab/uml"

// DefaultSeries is the Debian kernel source series the lab builds.
const DefaultSeries = "6.1"

// Series are the Debian kernel source series the interop lab builds:
// Debian 12's own (6.1), and the one bookworm-security carries for newer
// hardware (6.12), whose xfrm route lookup transparent mode relies on.
var Series = []string{"6.1", "6.12"}

// CacheDir returns the cache directory in use.
func CacheDir() string {
	if d := os.Getenv("IKETCP_LAB_CACHE"); d != "" {
		return filepath.Join(d, "uml")
	}
	return DefaultCacheDir
}

// KernelOptions configure EnsureKernel. The zero value builds DefaultSeries
// into CacheDir().
type KernelOptions struct {
	// Series is the Debian source package's series: linux-source-<Series>.
	Series string
	// CacheDir replaces CacheDir().
	CacheDir string
	// Jobs is make's -j; 0 means the number of CPUs.
	Jobs int
	// Logf receives one line per step. Nil discards them.
	Logf func(format string, args ...any)
}

// Kernel is a built UML kernel.
type Kernel struct {
	// Path is the stripped kernel executable.
	Path string
	// Series and Version name the Debian source it was built from, e.g.
	// "6.1" and "6.1.192-3".
	Series, Version string
	// Key is the cache key: the version and a hash of the configuration
	// fragment and the patch.
	Key string
	// Built is true when this call built it, false when it came from the
	// cache; BuildTime is how long building took (download included).
	Built     bool
	BuildTime time.Duration
}

// EnsureKernel returns the UML kernel for the options, building it first
// unless the cache holds one for the same source version, configuration
// fragment and patch. Building needs root (the cache), apt-get (the
// source package) and a C toolchain (HostPackages); about 5 to 10
// minutes on two cores.
func EnsureKernel(ctx context.Context, opts KernelOptions) (*Kernel, error) {
	if opts.Series == "" {
		opts.Series = DefaultSeries
	}
	if opts.CacheDir == "" {
		opts.CacheDir = CacheDir()
	}
	if opts.Jobs <= 0 {
		opts.Jobs = runtime.NumCPU()
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	patch, ok := xstatePatches[opts.Series]
	if !ok {
		return nil, fmt.Errorf("no UML xstate patch for linux-source-%s (have one for %s)", opts.Series, strings.Join(seriesList(), ", "))
	}
	pkg := "linux-source-" + opts.Series
	version, err := candidateVersion(ctx, pkg)
	if err != nil {
		return nil, err
	}
	sum := sha256.New()
	sum.Write(kernelConfig)
	sum.Write([]byte{0})
	sum.Write(patch)
	k := &Kernel{
		Series:  opts.Series,
		Version: version,
		Key:     version + "-" + hex.EncodeToString(sum.Sum(nil))[:12],
	}
	dir := filepath.Join(opts.CacheDir, "kernel-"+k.Key)
	k.Path = filepath.Join(dir, "linux")
	if isFile(k.Path) {
		return k, nil
	}
	if err := os.MkdirAll(opts.CacheDir, 0o755); err != nil {
		return nil, fmt.Errorf("create the UML cache: %w", err)
	}
	unlock, err := lockDir(ctx, opts.CacheDir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if isFile(k.Path) { // built by another process meanwhile
		return k, nil
	}
	start := time.Now()
	logf("uml: building the kernel from %s %s (cache %s); this takes several minutes", pkg, version, dir)
	if err := buildKernel(ctx, opts, pkg, version, patch, dir, logf); err != nil {
		return nil, err
	}
	k.Built, k.BuildTime = true, time.Since(start)
	logf("uml: kernel %s built in %s", k.Path, k.BuildTime.Round(time.Second))
	return k, nil
}

func seriesList() []string {
	var s []string
	for k := range xstatePatches {
		s = append(s, k)
	}
	return s
}

// buildKernel downloads, unpacks, patches, configures and builds the
// source, and installs the stripped kernel in dir.
func buildKernel(ctx context.Context, opts KernelOptions, pkg, version string, patch []byte, dir string, logf func(string, ...any)) error {
	deb, err := downloadDeb(ctx, filepath.Join(opts.CacheDir, "src"), pkg, version)
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp(opts.CacheDir, "build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	logPath := dir + ".build.log"
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	src := filepath.Join(work, pkg)
	step := func(name string, cmdDir string, argv ...string) error {
		t0 := time.Now()
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		cmd.Dir = cmdDir
		cmd.Stdout, cmd.Stderr = logFile, logFile
		cmd.Env = append(os.Environ(), "LC_ALL=C")
		cmd.WaitDelay = 5 * time.Second
		fmt.Fprintf(logFile, "### %s: %s\n", name, strings.Join(argv, " "))
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("uml kernel build, %s: %w (log %s):\n%s", name, err, logPath, tailFile(logPath, 2000))
		}
		logf("uml: %s done in %s", name, time.Since(t0).Round(100*time.Millisecond))
		return nil
	}
	tarball := "usr/src/" + pkg + ".tar.xz"
	if err := step("unpack", work, "sh", "-c",
		`dpkg-deb --fsys-tarfile "$1" | tar -x "./$2" && tar -xJf "$2" && rm -f "$2"`, "sh", deb, tarball); err != nil {
		return err
	}
	patchPath := filepath.Join(work, "uml-xstate.patch")
	fragment := filepath.Join(work, "kernel.config")
	if err := os.WriteFile(patchPath, patch, 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(fragment, kernelConfig, 0o644); err != nil {
		return err
	}
	jobs := fmt.Sprintf("-j%d", opts.Jobs)
	for _, s := range []struct {
		name string
		argv []string
	}{
		{"patch", []string{"patch", "-p1", "--forward", "--batch", "-i", patchPath}},
		{"defconfig", []string{"make", "ARCH=um", "defconfig"}},
		{"merge config", []string{"scripts/kconfig/merge_config.sh", "-m", ".config", fragment}},
		{"olddefconfig", []string{"make", "ARCH=um", "olddefconfig"}},
	} {
		if err := step(s.name, src, s.argv...); err != nil {
			return err
		}
	}
	config, err := os.ReadFile(filepath.Join(src, ".config"))
	if err != nil {
		return err
	}
	if missing := missingOptions(string(kernelConfig), string(config)); len(missing) > 0 {
		return fmt.Errorf("uml kernel config: the fragment asks for %s, but linux-source %s's Kconfig gave otherwise", strings.Join(missing, ", "), version)
	}
	if err := step("make linux", src, "nice", "make", "ARCH=um", jobs, "linux"); err != nil {
		return err
	}
	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	if err := step("strip", src, "strip", "-o", filepath.Join(tmp, "linux"), "linux"); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "config"), config, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, dir)
}

// missingOptions lists the fragment's CONFIG_X=v lines that the final
// configuration does not hold as given ("=n" means not set).
func missingOptions(fragment, config string) []string {
	have := map[string]string{}
	for _, line := range strings.Split(config, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && strings.HasPrefix(k, "CONFIG_") {
			have[k] = v
		}
	}
	var missing []string
	for _, line := range strings.Split(fragment, "\n") {
		line = strings.TrimSpace(line)
		k, v, ok := strings.Cut(line, "=")
		if !ok || !strings.HasPrefix(k, "CONFIG_") {
			continue
		}
		got, set := have[k]
		if v == "n" {
			if set && got != "n" {
				missing = append(missing, line)
			}
			continue
		}
		if got != v {
			missing = append(missing, line)
		}
	}
	return missing
}

// candidateVersion is the version apt would install of pkg.
func candidateVersion(ctx context.Context, pkg string) (string, error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "policy", pkg).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("apt-cache policy %s: %w: %s", pkg, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Candidate:"); ok {
			v = strings.TrimSpace(v)
			if v != "" && v != "(none)" {
				return v, nil
			}
		}
	}
	return "", fmt.Errorf("%s is not in this machine's apt sources (run apt-get update; Debian 12 has it in bookworm and bookworm-security)", pkg)
}

// downloadDeb fetches pkg=version into dir with apt-get download, unless
// it is there already, and returns the file's path.
func downloadDeb(ctx context.Context, dir, pkg, version string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	match := func() string {
		files, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
		for _, f := range files {
			out, err := exec.CommandContext(ctx, "dpkg-deb", "-f", f, "Version").Output()
			if err == nil && strings.TrimSpace(string(out)) == version {
				return f
			}
		}
		return ""
	}
	if f := match(); f != "" {
		return f, nil
	}
	cmd := exec.CommandContext(ctx, "apt-get", "-o", "DPkg::Lock::Timeout=120", "download", pkg+"="+version)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get download %s=%s: %w: %s", pkg, version, err, out)
	}
	if f := match(); f != "" {
		return f, nil
	}
	return "", fmt.Errorf("apt-get download %s=%s left no matching .deb in %s", pkg, version, dir)
}

// lockDir takes an exclusive lock on dir/.lock, polling until ctx ends,
// so that two test processes never build at once.
func lockDir(ctx context.Context, dir string) (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	// A build takes minutes; an hour of polling is the outer bound.
	for range 3600 {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for another build in %s: %w", dir, ctx.Err())
		case <-time.After(time.Second):
		}
	}
	f.Close()
	return nil, fmt.Errorf("another build in %s held the lock for an hour", dir)
}

func isFile(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}

func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
