//go:build !unix

package control

import (
	"errors"
	"io/fs"
)

// errNeedsUnix refuses the control socket where its owner and mode checks
// mean nothing.
var errNeedsUnix = errors.New("the control socket needs a Unix system, where its owner and mode can be checked")

// fileOwner returns errNeedsUnix: without Unix owners and modes nothing
// tells a private directory from one that others can write.
func fileOwner(fs.FileInfo) (int, error) { return 0, errNeedsUnix }
