//go:build unix

package udpbatch

import "syscall"

// msgTrunc is the recvmsg flag for a datagram longer than the buffer.
const msgTrunc = syscall.MSG_TRUNC
