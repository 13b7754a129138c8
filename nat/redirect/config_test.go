package redirect

import (
	"errors"
	"strings"
	"testing"

	"github.com/iketcp/iketcp/nat"
)

func TestConfigDefaults(t *testing.T) {
	cfg, err := Config{From: 443, To: 11443}.withDefaults(true)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Logger == nil || cfg.Table() != "iketcp_redirect" {
		t.Errorf("defaults: %+v, table %s", cfg, cfg.Table())
	}
	if got := (Config{Name: "b-2"}).Table(); got != "iketcp_redirect_b-2" {
		t.Errorf("table of Name b-2: %s", got)
	}
	// A clean-up needs only the Name.
	if _, err := (Config{}).withDefaults(false); err != nil {
		t.Errorf("clean-up: %v", err)
	}
	if _, err := (Config{Name: "a b"}).withDefaults(false); err == nil {
		t.Error("clean-up with a bad Name: no error")
	}
}

func TestConfigErrors(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{To: 11443}, "From is 0: give the TCP port that clients connect to"},
		{Config{From: 443}, "To is 0: give the TCP port that iketcp listens on"},
		{Config{From: 11443, To: 11443}, "From and To are both 11443"},
		{Config{From: 443, To: 11443, Name: "a.b"}, "use only letters, digits"},
		{Config{From: 443, To: 11443, Name: "ruleset;flush"}, "use only letters, digits"},
		{Config{From: 443, To: 11443, Name: strings.Repeat("x", 33)}, "longer than 32 characters"},
	} {
		_, err := c.cfg.withDefaults(true)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "port redirect: ") {
			t.Errorf("%+v: got %v, want an error about %q", c.cfg, err, c.want)
		}
	}
}

func TestErrors(t *testing.T) {
	if !errors.Is(errNeedsNetAdmin, nat.ErrNeedsNetAdmin) || errors.Is(errNeedsNetAdmin, nat.ErrNeedsLinux) {
		t.Error("errNeedsNetAdmin does not match nat.ErrNeedsNetAdmin alone")
	}
	if !errors.Is(errNeedsLinux, nat.ErrNeedsLinux) || errors.Is(errNeedsLinux, nat.ErrNeedsNetAdmin) {
		t.Error("errNeedsLinux does not match nat.ErrNeedsLinux alone")
	}
	for _, err := range []error{errNeedsNetAdmin, errNeedsLinux} {
		if !strings.Contains(err.Error(), "--redirect none") {
			t.Errorf("%q does not say what to do instead", err)
		}
	}
}
