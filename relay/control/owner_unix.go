//go:build unix

package control

import (
	"fmt"
	"io/fs"
	"syscall"
)

// fileOwner is the uid that owns fi.
func fileOwner(fi fs.FileInfo) (int, error) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("no owner in %T", fi.Sys())
	}
	return int(st.Uid), nil
}
