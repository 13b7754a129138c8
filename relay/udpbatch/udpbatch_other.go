//go:build !linux

package udpbatch

// sysConn is empty where there are no batch system calls: every Conn moves
// one datagram per system call.
type sysConn struct{}

func (c *Conn) initSys(Options) *UnsupportedError { return &UnsupportedError{} }

// readBatchSys and writeBatchSys are never reached: initSys always reports
// the fallback.

func (c *Conn) readBatchSys([]Message, bool) (int, error) { return 0, &UnsupportedError{} }

func (c *Conn) waitReadSys() error { return nil }

func (c *Conn) writeBatchSys([]Message) (int, error) { return 0, &UnsupportedError{} }

// GSO reports false: segmentation offload is Linux's.
func (c *Conn) GSO() bool { return false }

// GRO reports false: receive offload is Linux's.
func (c *Conn) GRO() bool { return false }

// Without receive offload there is nothing to stop, and no datagram is
// ever left over.

func (c *Conn) stopGRO() {}

func (c *Conn) takeLeftoversLocked([]Message) int { return 0 }
