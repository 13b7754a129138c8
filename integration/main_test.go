package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"
)

// iketcpBinary is the iketcp executable the tests run, built once by
// TestMain from this checkout.
var iketcpBinary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "iketcp-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	iketcpBinary = filepath.Join(dir, "iketcp")
	// Without cgo, as make build: iketcp then drops its capabilities.
	build := exec.Command("go", "build", "-o", iketcpBinary, "github.com/iketcp/iketcp/cmd/iketcp")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building iketcp: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines leaked: %v\n", err)
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}
