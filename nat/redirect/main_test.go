package redirect

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if spec, ok := os.LookupEnv(childEnv); ok {
		os.Exit(runChild(spec))
	}
	goleak.VerifyTestMain(m)
}

// childEnv, in the environment of the test binary, makes it a child that
// a test can crash: it sets up the redirect that the variable describes
// ("FROM TO NAME"), says "ready", and waits for the end of its input
// (or for SIGKILL).
const childEnv = "IKETCP_REDIRECT_TEST_CHILD"

func runChild(spec string) int {
	cfg := Config{Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	if _, err := fmt.Sscan(spec, &cfg.From, &cfg.To, &cfg.Name); err != nil {
		fmt.Fprintf(os.Stderr, "child: %s=%q: %v\n", childEnv, spec, err)
		return 2
	}
	r, err := Setup(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "child: %v\n", err)
		return 1
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	if err := r.Close(); err != nil {
		return 1
	}
	return 0
}
