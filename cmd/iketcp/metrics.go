package main

import (
	"log/slog"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/metrics"
)

// metricsServer is --metrics: the process's relays in Prometheus text.
type metricsServer struct{ s *metrics.Server }

func startMetrics(addr string, log *slog.Logger) (*metricsServer, error) {
	s, err := metrics.Listen(addr, log)
	if err != nil {
		return nil, err
	}
	return &metricsServer{s}, nil
}

func (m *metricsServer) add(role, tunnel string, counters *relay.Counters, status func() *relay.Status) {
	m.s.Collector.Add(metrics.Source{Role: role, Tunnel: tunnel, Counters: counters, Status: status})
}

func (m *metricsServer) setReady(r bool) { m.s.SetReady(r) }
func (m *metricsServer) close()          { m.s.Close() }
