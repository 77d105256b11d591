package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/netagent/netagent/pkg/dataplane"
)

// Metrics are the agent's Prometheus metrics, on their own registry.
type Metrics struct {
	Registry         *prometheus.Registry
	LeaseHeld        prometheus.Gauge
	LeaseTTL         prometheus.Gauge
	StoreConnected   prometheus.Gauge
	IPForward        prometheus.Gauge
	Peers            *prometheus.GaugeVec
	ReconcileSeconds prometheus.Histogram
	Changes          *prometheus.CounterVec
	Repairs          *prometheus.CounterVec
	WatchRestarts    *prometheus.CounterVec
	Errors           *prometheus.CounterVec
	IgnoredLeases    prometheus.Gauge
	IgnoredTotal     prometheus.Counter
}

// NewMetrics registers the metrics.
func NewMetrics() *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{
		Registry:  r,
		LeaseHeld: prometheus.NewGauge(prometheus.GaugeOpts{Name: "netagent_lease_held", Help: "1 while this node holds a live subnet lease."}),
		LeaseTTL:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "netagent_lease_ttl_seconds", Help: "TTL of the subnet lease."}),
		Peers:     prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "netagent_peers", Help: "Peers by how they are reached."}, []string{"mode"}),
		ReconcileSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "netagent_reconcile_duration_seconds", Help: "Time of one reconcile pass.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)}),
		Changes:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: "netagent_dataplane_changes_total", Help: "Kernel objects changed after the first reconcile, by kind."}, []string{"kind"}),
		Repairs:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: "netagent_drift_repairs_total", Help: "Kernel objects put back although the plan had not changed (drift), by kind."}, []string{"kind"}),
		WatchRestarts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "netagent_etcd_watch_restarts_total", Help: "Lease watch restarts, by reason."}, []string{"reason"}),
		Errors:        prometheus.NewCounterVec(prometheus.CounterOpts{Name: "netagent_errors_total", Help: "Errors, by kind."}, []string{"kind"}),
		IgnoredLeases: prometheus.NewGauge(prometheus.GaugeOpts{Name: "netagent_ignored_leases", Help: "Leases in the store that are not used (invalid, outside the network, overlapping, claiming this node's address)."}),
		IgnoredTotal:  prometheus.NewCounter(prometheus.CounterOpts{Name: "netagent_ignored_leases_total", Help: "Leases found unusable (counted once per key and reason)."}),
	}
	m.StoreConnected = prometheus.NewGauge(prometheus.GaugeOpts{Name: "netagent_store_connected",
		Help: "1 while the lease store (etcd) answers, 0 while it does not (not set for stores that cannot tell)."})
	m.IPForward = prometheus.NewGauge(prometheus.GaugeOpts{Name: "netagent_ip_forward",
		Help: "1 while net.ipv4.ip_forward is on in the agent's network namespace."})
	// Known label values start at zero, so dashboards see the series before the first event.
	for _, k := range []string{"config", "lease", "store", "reconcile", "files", "forwarding"} {
		m.Errors.WithLabelValues(k)
	}
	for _, k := range []string{"route", "neigh", "fdb", "vxlan-device", "nat", "vxlan-allowlist", "antispoof", "ip-forward", "wireguard"} {
		m.Repairs.WithLabelValues(k)
		m.Changes.WithLabelValues(k)
	}
	r.MustRegister(m.LeaseHeld, m.LeaseTTL, m.StoreConnected, m.IPForward, m.Peers, m.ReconcileSeconds, m.Changes, m.Repairs, m.WatchRestarts, m.Errors, m.IgnoredLeases, m.IgnoredTotal,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// guardDrops exports the VXLAN allow-list's drop counter (read from the kernel on scrape).
func (m *Metrics) guardDrops(read func() uint64) {
	_ = m.Registry.Register(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "netagent_vxlan_dropped_packets_total",
		Help: "VXLAN packets dropped: from addresses that are not peers, or encapsulated by pods.",
	}, func() float64 { return float64(read()) }))
}

// wireGuard exports the WireGuard device's peers, read from the device on scrape: how many,
// and per peer the age of its last handshake and its byte counters.
func (m *Metrics) wireGuard(read func() (dataplane.WGStatus, bool)) {
	_ = m.Registry.Register(wgCollector{read})
}

var (
	wgPeersDesc     = prometheus.NewDesc("netagent_wireguard_peers", "Peers configured on the WireGuard device.", nil, nil)
	wgHandshakeDesc = prometheus.NewDesc("netagent_wireguard_peer_last_handshake_age_seconds", "Seconds since the last handshake with a WireGuard peer (absent: never).", []string{"peer"}, nil)
	wgRxDesc        = prometheus.NewDesc("netagent_wireguard_peer_receive_bytes_total", "Bytes received from a WireGuard peer.", []string{"peer"}, nil)
	wgTxDesc        = prometheus.NewDesc("netagent_wireguard_peer_transmit_bytes_total", "Bytes sent to a WireGuard peer.", []string{"peer"}, nil)
)

type wgCollector struct {
	read func() (dataplane.WGStatus, bool)
}

func (c wgCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{wgPeersDesc, wgHandshakeDesc, wgRxDesc, wgTxDesc} {
		ch <- d
	}
}

func (c wgCollector) Collect(ch chan<- prometheus.Metric) {
	st, ok := c.read()
	if !ok {
		return
	}
	ch <- prometheus.MustNewConstMetric(wgPeersDesc, prometheus.GaugeValue, float64(len(st.Peers)))
	now := time.Now()
	for _, p := range st.Peers {
		name := p.Node
		if name == "" {
			continue // not (or no longer) a planned peer: removed within a pass; keys stay out of metrics
		}
		if !p.LastHandshake.IsZero() {
			ch <- prometheus.MustNewConstMetric(wgHandshakeDesc, prometheus.GaugeValue, now.Sub(p.LastHandshake).Seconds(), name)
		}
		ch <- prometheus.MustNewConstMetric(wgRxDesc, prometheus.CounterValue, float64(p.RxBytes), name)
		ch <- prometheus.MustNewConstMetric(wgTxDesc, prometheus.CounterValue, float64(p.TxBytes), name)
	}
}

// podSpoofDrops exports the pod anti-spoofing drop counter (read on scrape).
func (m *Metrics) podSpoofDrops(read func() uint64) {
	_ = m.Registry.Register(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "netagent_pod_spoofed_dropped_packets_total",
		Help: "Frames from pods dropped for a source IPv4 address or MAC that is not the pod's (IPv4 and ARP).",
	}, func() float64 { return float64(read()) }))
}

// WatchRestart implements lease.WatchStats.
func (m *Metrics) WatchRestart(reason string) {
	if len(reason) > 40 {
		reason = "error" // keep label cardinality bounded
	}
	m.WatchRestarts.WithLabelValues(reason).Inc()
}
