package main

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// capNumbers are the capabilities iketcp knows by name: those it may keep,
// and those it reports dropping.
var capNumbers = map[string]uint{
	"cap_net_admin":        unix.CAP_NET_ADMIN,
	"cap_net_bind_service": unix.CAP_NET_BIND_SERVICE,
	"cap_net_raw":          unix.CAP_NET_RAW,
}

// limitCapabilities sets the effective and permitted sets to those of
// needs the process has, and empties the inheritable set (and with it the
// ambient set), on every thread of the process: capabilities belong to
// threads, and the Go runtime runs on many (syscall.AllThreadsSyscall,
// which needs a build without cgo). It returns what it kept and, if
// anything went, a description of what.
func limitCapabilities(needs []capNeed) (kept, dropped string, err error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var have [2]unix.CapUserData
	if err := unix.Capget(&hdr, &have[0]); err != nil {
		return "", "", fmt.Errorf("capget: %w", err)
	}
	var want [2]uint32
	var keptNames []string
	for _, n := range needs {
		c, ok := capNumbers[n.name]
		if !ok {
			return "", "", fmt.Errorf("unknown capability %s", n.name)
		}
		if have[c/32].Permitted&(1<<(c%32)) != 0 {
			want[c/32] |= 1 << (c % 32)
			keptNames = append(keptNames, n.name)
		}
	}
	var gone [2]uint32 // what goes: all but want, and every inheritable one
	for i := range have {
		gone[i] = (have[i].Permitted|have[i].Effective)&^want[i] | have[i].Inheritable
	}
	if gone == [2]uint32{} {
		return strings.Join(keptNames, ","), "", nil
	}
	data := [2]unix.CapUserData{
		{Effective: want[0], Permitted: want[0]},
		{Effective: want[1], Permitted: want[1]},
	}
	_, _, errno := syscall.AllThreadsSyscall(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0)
	if errno != 0 {
		if errors.Is(errno, syscall.ENOTSUP) {
			return "", "", errors.New("this build uses cgo, which keeps a process from changing all its threads' capabilities: build with CGO_ENABLED=0 (make build does)")
		}
		return "", "", fmt.Errorf("capset: %w", errno)
	}
	return strings.Join(keptNames, ","), describeCaps(gone), nil
}

// describeCaps names the capabilities in set: those iketcp knows by name,
// and how many others.
func describeCaps(set [2]uint32) string {
	var names []string
	for name, c := range capNumbers {
		if set[c/32]&(1<<(c%32)) != 0 {
			names = append(names, name)
			set[c/32] &^= 1 << (c % 32)
		}
	}
	others := 0
	for _, w := range set {
		for ; w != 0; w &= w - 1 {
			others++
		}
	}
	sort.Strings(names)
	if others > 0 {
		names = append(names, fmt.Sprintf("%d others", others))
	}
	return strings.Join(names, ",")
}
