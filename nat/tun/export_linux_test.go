package tun

// For the tests of package tun_test.
var (
	ErrOffset     = errOffset
	ErrShortSizes = errShortSizes
	ErrNoHdrRoom  = errNoHdrRoom
)

// RefuseOffloads makes Create ask TUNSETOFFLOAD for a flag no kernel
// knows, which the kernel refuses with EINVAL, until the returned
// function puts the flags back.
func RefuseOffloads() (restore func()) {
	saved := offloadFlags
	offloadFlags |= 1 << 30
	return func() { offloadFlags = saved }
}
