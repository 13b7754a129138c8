package nat

import "errors"

// Errors that callers may tell apart with errors.Is.
var (
	// ErrNeedsNetAdmin: the process may not create the TUN device or change
	// policy routing, forwarding or nftables. Fake-TCP mode's errors say
	// "fake-TCP mode needs CAP_NET_ADMIN" and match it too.
	ErrNeedsNetAdmin = errors.New("transparent mode needs CAP_NET_ADMIN (run as root, or grant it: setcap cap_net_admin+ep iketcp)")
	// ErrNeedsLinux: transparent mode is built on Linux's TUN driver and
	// policy routing, fake-TCP mode on its TUN driver, forwarding and
	// nftables; fake-TCP mode's error matches it too.
	ErrNeedsLinux = errors.New("transparent mode needs Linux (TUN device and policy routing); on this system use explicit mode")
)
