//go:build !unix

package udpbatch

// msgTrunc is zero where recvmsg has no MSG_TRUNC flag: there (Windows) a
// truncated datagram is an error from ReadMsgUDPAddrPort instead.
const msgTrunc = 0
