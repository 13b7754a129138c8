package main

import (
	"log/slog"
	"net"
	"os"
	"sync"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/metrics"
	"github.com/iketcp/iketcp/relay/upgrade"
)

// metricsSpec is the metrics socket's key among the listening sockets an
// upgrade hands over: no --listen spec reads so.
const metricsSpec = "metrics"

// metricsServer is --metrics: the process's relays in Prometheus text.
type metricsServer struct {
	s     *metrics.Server
	addr  string // where to listen once the hand-over is known (a successor's); "" once listening
	close func() // stops serving; once
}

// startMetrics serves --metrics on addr. A process started to take over
// from an upgrading server listens only once it has the hand-over
// (serveInherited), whose socket is its predecessor's: the port stays
// the old process's until then.
func startMetrics(addr string, log *slog.Logger) (*metricsServer, error) {
	if os.Getenv(upgrade.EnvFD) != "" {
		s := metrics.New(log)
		return &metricsServer{s: s, addr: addr, close: sync.OnceFunc(func() { s.Close() })}, nil
	}
	s, err := metrics.Listen(addr, log)
	if err != nil {
		return nil, err
	}
	return &metricsServer{s: s, close: sync.OnceFunc(func() { s.Close() })}, nil
}

// serveInherited starts serving a successor's endpoint: on ln, the
// predecessor's socket, or, when it had none, on the address.
func (m *metricsServer) serveInherited(ln net.Listener) error {
	if m.addr == "" {
		if ln != nil {
			ln.Close()
		}
		return nil
	}
	addr := m.addr
	m.addr = ""
	if ln != nil {
		m.s.Serve(ln)
		return nil
	}
	return m.s.Listen(addr)
}

// listener is the endpoint's socket, for an upgrade to hand over; nil
// before it listens.
func (m *metricsServer) listener() net.Listener { return m.s.Listener() }

func (m *metricsServer) add(role, tunnel string, counters *relay.Counters, status func() *relay.Status) {
	m.s.Collector.Add(metrics.Source{Role: role, Tunnel: tunnel, Counters: counters, Status: status})
}

func (m *metricsServer) setReady(r bool) { m.s.SetReady(r) }
