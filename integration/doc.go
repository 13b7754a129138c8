// Package integration holds iketcp's end-to-end tests: real strongSwan
// daemons in network namespaces (built by package integration/lab), a
// carrier that masquerades and drops UDP, and the iketcp binary carrying
// the tunnel over TCP between them. The interoperability tests
// (interop_test.go, make interop) meet a third-party RFC 9329 peer instead:
// libreswan with the Linux kernel's espintcp in a User-Mode Linux guest
// (package integration/uml). The encapsulation benchmarks run the
// relays in process; package integration/perf (iketcp-lab bench) measures
// them as whole processes, and TestBenchQuick runs its smoke mode.
//
// The tests need root and the tools integration/lab lists; `make deps`
// installs them. Outside CI they skip with the reason when something is
// missing; with CI=true they fail instead.
package integration
