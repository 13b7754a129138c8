// Package metrics exposes relays to Prometheus: a Collector that reads
// their counters and status when scraped (nothing is counted twice, and
// the data path does no more than it did), and the HTTP endpoint that
// serves it with /healthz and /readyz.
//
// It owns the metric names, which dashboards read: Names lists them.
// Every counter of relay.Counters is exported: the drops by their reason
// as iketcp_dropped_total{reason}, the server's refusals as
// iketcp_refused_total{reason}, and the rest each as iketcp_NAME_total.
package metrics

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/iketcp/iketcp/relay"
	"github.com/iketcp/iketcp/relay/sendq"
)

// Reasons of relay counters exported as iketcp_dropped_total: datagrams
// or frames a relay did not deliver.
var dropReasons = []string{
	"bad_length", "truncated_frames", "oversized_frames", "oversized_datagrams", "malformed", "unknown_spi",
	"stray_frames", "learn_refused", "keepalives_dropped", "no_path", "queue_full", "queue_late",
	"foreign_packets", "port500_refused",
}

// Reasons of relay counters exported as iketcp_refused_total: what a
// server's admission and front door refused or closed.
var refuseReasons = []string{
	"conns_rejected", "conns_evicted", "unconfirmed_closes", "proxy_refused", "unrecognized", "clear_refused",
	"identity_refused", "prefix_timeouts", "bad_prefix", "garbage_closes", "claims_refused", "sessions_rejected",
	"half_open_expired",
}

// frameKinds are the counters of iketcp_frames_total{direction,kind}.
var frameKinds = map[string][2]string{
	"ike_in": {"in", "ike"}, "esp_in": {"in", "esp"}, "keepalives_in": {"in", "keepalive"},
	"ike_out": {"out", "ike"}, "esp_out": {"out", "esp"}, "keepalives_out": {"out", "keepalive"},
}

// Counters exported in another metric: frames by kind, bytes.
var renamed = map[string]bool{"packets_in": true, "packets_out": true, "bytes_in": true, "bytes_out": true,
	"ike_in": true, "ike_out": true, "esp_in": true, "esp_out": true, "keepalives_in": true, "keepalives_out": true}

// Source is one relay the Collector reads.
type Source struct {
	Role     string // relay.RoleServer or relay.RoleClient
	Tunnel   string // the client tunnel's name, or ""
	Counters *relay.Counters
	Status   func() *relay.Status
}

var labels = []string{"role", "tunnel"}

func desc(name, help string, extra ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, append(slices.Clone(labels), extra...), nil)
}

var (
	descInfo       = desc("iketcp_info", "The relay: its version and mode; always 1.", "version", "mode")
	descStart      = desc("iketcp_start_time_seconds", "When the relay started, in seconds since the epoch.")
	descFrames     = desc("iketcp_frames_total", "Datagrams relayed, by direction (in: from the far end to the local daemon; out: from the daemon toward the far end) and kind (ike, esp, keepalive).", "direction", "kind")
	descBytes      = desc("iketcp_bytes_total", "Bytes of the datagrams relayed, by direction as iketcp_frames_total.", "direction")
	descSessions   = desc("iketcp_sessions", "Server sessions (IKE SAs) or client flows, by state: up, connecting, waiting, half-open.", "state")
	descLinks      = desc("iketcp_links", "A client's links to the server (one per IKE SA), by state.", "state")
	descFallbacks  = desc("iketcp_transport_fallbacks_total", "Client flows whose transport went from UDP to TCP.")
	descDropped    = desc("iketcp_dropped_total", "Datagrams and frames not delivered, by reason (the counter names of iketcp status).", "reason")
	descRefused    = desc("iketcp_refused_total", "Connections, sessions and claims a server refused or closed, by reason.", "reason")
	descQueueDelay = desc("iketcp_queue_delay_seconds", "How long datagrams that had to queue for a link waited before they were sent, by lane: esp, or ike (IKE and control messages, which go first).", "lane")

	// An aggregate's members, labelled by the aggregate's location ID and
	// session and the member's name (FortiOS's diagnose sys
	// ipsec-aggregate list, in numbers).
	memberLabels        = []string{"location_id", "session", "member"}
	descMemberUp        = desc("iketcp_aggregate_member_up", "1 while an aggregate's member is in the rotation, else 0.", memberLabels...)
	descMemberRTT       = desc("iketcp_aggregate_member_rtt_seconds", "An aggregate member's round trip, from its probes.", memberLabels...)
	descMemberLoss      = desc("iketcp_aggregate_member_probe_loss_ratio", "The share of an aggregate member's recent probes left unanswered, 0 to 1.", memberLabels...)
	descMemberRate      = desc("iketcp_aggregate_member_rate_bytes", "What an aggregate member carried lately, bytes a second.", memberLabels...)
	descMemberPackets   = desc("iketcp_aggregate_member_packets_total", "Datagrams an aggregate member carried, by direction (in: from the far end).", append(slices.Clone(memberLabels), "direction")...)
	descMemberBytes     = desc("iketcp_aggregate_member_bytes_total", "Bytes an aggregate member carried, by direction (in: from the far end).", append(slices.Clone(memberLabels), "direction")...)
	descReorderOutOrder = desc("iketcp_aggregate_out_of_order_total", "ESP an aggregate's reorder buffer delivered to the daemon behind a higher sequence number of its SPI.", "location_id", "session")
)

// Collector is a prometheus.Collector over relays, read when scraped.
type Collector struct {
	mu      sync.Mutex // guards sources
	sources []Source
}

// Add adds a relay to what c reports.
func (c *Collector) Add(s Source) {
	c.mu.Lock()
	c.sources = append(c.sources, s)
	c.mu.Unlock()
}

// Describe sends nothing: the per-counter metrics follow relay.Counters,
// so c is an unchecked collector.
func (c *Collector) Describe(chan<- *prometheus.Desc) {}

// Collect reads every relay's counters and status.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	sources := slices.Clone(c.sources)
	c.mu.Unlock()
	for _, s := range sources {
		collect(ch, s)
	}
}

func collect(ch chan<- prometheus.Metric, s Source) {
	lv := []string{s.Role, s.Tunnel}
	with := func(extra ...string) []string { return append(slices.Clone(lv), extra...) }
	st := s.Status()
	ch <- prometheus.MustNewConstMetric(descInfo, prometheus.GaugeValue, 1, with(st.Version, st.Mode)...)
	ch <- prometheus.MustNewConstMetric(descStart, prometheus.GaugeValue, float64(st.Started.UnixNano())/1e9, lv...)

	states := map[string]float64{"up": 0, "waiting": 0}
	if s.Role == relay.RoleServer {
		states["half-open"] = 0
	} else {
		states["connecting"] = 0
	}
	links := map[string]float64{}
	for _, ss := range st.Sessions {
		states[ss.State]++
		for _, l := range ss.Links {
			links[l.State]++
		}
	}
	for state, n := range states {
		ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, n, with(state)...)
	}
	if s.Role == relay.RoleClient {
		for _, state := range []string{"up", "connecting", "waiting"} {
			ch <- prometheus.MustNewConstMetric(descLinks, prometheus.GaugeValue, links[state], with(state)...)
		}
	}

	for _, ctr := range s.Counters.Snapshot(s.Role) {
		v := float64(ctr.Value)
		kind, isKind := frameKinds[ctr.Name]
		switch {
		case isKind:
			ch <- prometheus.MustNewConstMetric(descFrames, prometheus.CounterValue, v, with(kind[0], kind[1])...)
		case ctr.Name == "packets_in" || ctr.Name == "packets_out":
			continue // the sum of the kinds
		case ctr.Name == "bytes_in":
			ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, v, with("in")...)
		case ctr.Name == "bytes_out":
			ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, v, with("out")...)
		case ctr.Name == "transport_fallbacks":
			ch <- prometheus.MustNewConstMetric(descFallbacks, prometheus.CounterValue, v, lv...)
		case slices.Contains(dropReasons, ctr.Name):
			ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, v, with(ctr.Name)...)
		case slices.Contains(refuseReasons, ctr.Name):
			ch <- prometheus.MustNewConstMetric(descRefused, prometheus.CounterValue, v, with(ctr.Name)...)
		default:
			ch <- prometheus.MustNewConstMetric(counterDesc(ctr.Name), prometheus.CounterValue, v, lv...)
		}
	}

	for _, a := range st.Aggregates {
		session := strconv.FormatUint(a.Session, 10)
		ch <- prometheus.MustNewConstMetric(descReorderOutOrder, prometheus.CounterValue, float64(a.Reorder.OutOfOrder), with(a.LocationID, session)...)
		for _, m := range a.Members {
			ml := with(a.LocationID, session, m.Name)
			up := 0.0
			if m.State == "up" {
				up = 1
			}
			ch <- prometheus.MustNewConstMetric(descMemberUp, prometheus.GaugeValue, up, ml...)
			ch <- prometheus.MustNewConstMetric(descMemberRTT, prometheus.GaugeValue, m.RTTms/1000, ml...)
			ch <- prometheus.MustNewConstMetric(descMemberLoss, prometheus.GaugeValue, m.Loss, ml...)
			ch <- prometheus.MustNewConstMetric(descMemberRate, prometheus.GaugeValue, float64(m.Rate), ml...)
			for dir, v := range map[string][2]uint64{"in": {m.PacketsIn, m.BytesIn}, "out": {m.PacketsOut, m.BytesOut}} {
				ch <- prometheus.MustNewConstMetric(descMemberPackets, prometheus.CounterValue, float64(v[0]), append(slices.Clone(ml), dir)...)
				ch <- prometheus.MustNewConstMetric(descMemberBytes, prometheus.CounterValue, float64(v[1]), append(slices.Clone(ml), dir)...)
			}
		}
	}

	for lane, name := range map[sendq.Lane]string{sendq.Bulk: "esp", sendq.Priority: "ike"} {
		buckets, count, sum := s.Counters.QueueDelay[lane].Snapshot()
		cum := map[float64]uint64{}
		var acc uint64
		for i, b := range sendq.DelayBounds {
			acc += buckets[i]
			cum[b.Seconds()] = acc
		}
		ch <- prometheus.MustNewConstHistogram(descQueueDelay, count, sum.Seconds(), cum, with(name)...)
	}
}

var (
	descsMu sync.Mutex
	descs   = map[string]*prometheus.Desc{}
)

// counterDesc is the Desc of a counter exported under its own name:
// iketcp_NAME_total.
func counterDesc(name string) *prometheus.Desc {
	descsMu.Lock()
	defer descsMu.Unlock()
	if d, ok := descs[name]; ok {
		return d
	}
	d := desc("iketcp_"+name+"_total", "The "+name+" counter of iketcp status.")
	descs[name] = d
	return d
}

// Names lists every metric name the Collector exports for relays of the
// roles given, histograms' series included (_bucket, _sum, _count).
func Names() []string {
	names := []string{"iketcp_info", "iketcp_start_time_seconds", "iketcp_frames_total", "iketcp_bytes_total",
		"iketcp_sessions", "iketcp_links", "iketcp_transport_fallbacks_total", "iketcp_dropped_total", "iketcp_refused_total",
		"iketcp_queue_delay_seconds_bucket", "iketcp_queue_delay_seconds_sum", "iketcp_queue_delay_seconds_count",
		"iketcp_aggregate_member_up", "iketcp_aggregate_member_rtt_seconds", "iketcp_aggregate_member_probe_loss_ratio",
		"iketcp_aggregate_member_rate_bytes", "iketcp_aggregate_member_packets_total", "iketcp_aggregate_member_bytes_total",
		"iketcp_aggregate_out_of_order_total"}
	var c relay.Counters
	for _, role := range []string{relay.RoleServer, relay.RoleClient} {
		for _, ctr := range c.Snapshot(role) {
			if renamed[ctr.Name] || ctr.Name == "transport_fallbacks" ||
				slices.Contains(dropReasons, ctr.Name) || slices.Contains(refuseReasons, ctr.Name) {
				continue
			}
			if n := "iketcp_" + ctr.Name + "_total"; !slices.Contains(names, n) {
				names = append(names, n)
			}
		}
	}
	return names
}

// Server serves /metrics, /healthz and /readyz.
type Server struct {
	Collector *Collector
	srv       *http.Server
	log       *slog.Logger
	ln        net.Listener
	ready     atomic.Bool
	done      chan struct{}
}

// Listen starts serving on addr. /healthz answers 200 while the process
// runs; /readyz answers 200 once SetReady(true), and 503 before and while
// it drains.
func Listen(addr string, log *slog.Logger) (*Server, error) {
	s := New(log)
	if err := s.Listen(addr); err != nil {
		return nil, err
	}
	return s, nil
}

// New returns a Server that collects, and serves once Listen or Serve
// gives it a socket: a server taking over from its predecessor serves on
// the socket it inherits.
func New(log *slog.Logger) *Server {
	s := &Server{Collector: new(Collector), log: log, done: make(chan struct{})}
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.Collector, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !s.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 16 << 10,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
	return s
}

// Listen starts serving on addr.
func (s *Server) Listen(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return relay.ListenHint(err, "another service holds the metrics port: choose another --metrics address")
	}
	s.Serve(ln)
	return nil
}

// Serve starts serving on ln, once.
func (s *Server) Serve(ln net.Listener) {
	s.ln = ln
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("metrics endpoint stopped", "err", err)
		}
	}()
	s.log.Info("metrics endpoint ready", "addr", ln.Addr().String(), "paths", "/metrics /healthz /readyz")
}

// Listener is the socket s serves on, nil before Listen or Serve: what an
// upgrade hands to the new process.
func (s *Server) Listener() net.Listener { return s.ln }

// Addr is the address s serves on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// SetReady says whether /readyz answers ready.
func (s *Server) SetReady(r bool) { s.ready.Store(r) }

// Close stops serving and waits for the server's goroutine.
func (s *Server) Close() error {
	if s.ln == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if err != nil {
		s.srv.Close()
	}
	<-s.done
	return err
}
