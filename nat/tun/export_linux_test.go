package tun

// For the tests of package tun_test.
var (
	ErrOffset     = errOffset
	ErrShortSizes = errShortSizes
)
