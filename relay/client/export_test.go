package client

// DaemonGRO reports whether explicit mode's daemon socket has receive
// offload on.
func DaemonGRO(cl *Client) bool {
	cl.mu.Lock()
	side, _ := cl.side.(*udpSide)
	cl.mu.Unlock()
	return side != nil && side.bc.GRO()
}
