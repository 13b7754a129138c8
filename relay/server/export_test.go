package server

// What the external tests may see of the server's insides.

const MaxRouteKeys = maxRouteKeys

// RouteCounts returns how many IKE and ESP SPIs route to sessions.
func (s *Server) RouteCounts() (ike, esp int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.routes.ike.m), len(s.routes.esp.m)
}

// CloseConns closes every connection, as a restart of the server's side
// of the path would.
func (s *Server) CloseConns() {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
}

const LearnBurst = learnBurst
