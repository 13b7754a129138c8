// Package uml runs User-Mode Linux guests in the lab's namespaces, so
// that tests can meet peers that need a kernel ours lacks: Linux's own
// ESP and espintcp (RFC 9329 in the kernel), with libreswan's pluto.
//
// It owns the guest's kernel and everything around it: [EnsureKernel]
// builds a UML kernel from Debian's linux-source package with the
// configuration fragment kernel.config and the patch uml-xstate-<series>.patch
// (hosts whose XSAVE area is larger than UML assumes, as with AMX), and
// caches it outside the repository (CacheDir, keyed by the source version
// and a hash of fragment and patch), so later runs only boot it.
// [EnsureLibreswan] unpacks Debian's libreswan package into the same
// cache; it is never installed, because it conflicts with strongSwan's.
//
// [Boot] starts a guest as a process in a lab namespace (integration/lab),
// joined to it by a TAP device, with the host's / as its read-only root
// (hostfs) and its own directory shared read-write. Its PID 1 is
// guestinit (this package's command), which runs the scripts the host
// drops into that directory ([Guest.Run]) and powers off on
// [Guest.Shutdown]. [StartPluto] runs pluto in a guest with a
// configuration this package writes, and [Guest.View] collects the
// guest's own view: ip xfrm state, ss -tanie, whack --trafficstatus.
//
// Nothing here is product code; the tests that use it are in package
// integration (interop_test.go).
package uml
