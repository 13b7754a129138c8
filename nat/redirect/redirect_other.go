//go:build !linux

package redirect

import "os"

// Redirect is a running port redirect; on this system there is none.
type Redirect struct {
	cfg Config
}

// Setup returns an error that matches nat.ErrNeedsLinux: the port
// redirect is built on nftables.
func Setup(cfg Config) (*Redirect, error) {
	if _, err := cfg.withDefaults(true); err != nil {
		return nil, err
	}
	return nil, errNeedsLinux
}

// Cleanup returns an error that matches nat.ErrNeedsLinux: nothing can
// have been left here.
func Cleanup(cfg Config) error { return errNeedsLinux }

func (r *Redirect) Table() string { return r.cfg.Table() }
func (r *Redirect) Close() error  { return nil }

// Adopt returns an error that matches nat.ErrNeedsLinux.
func Adopt(cfg Config, owner *os.File) (*Redirect, error) { return nil, errNeedsLinux }

func (r *Redirect) OwnerFile() (*os.File, error) { return nil, errNeedsLinux }
func (r *Redirect) Release()                     {}
