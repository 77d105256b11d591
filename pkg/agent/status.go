package agent

import (
	"encoding/json"
	"fmt"
	"net/http"
	httppprof "net/http/pprof"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/dataplane"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/nldump"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/route"
)

// Status is what `netagent status` shows.
type Status struct {
	Node     string `json:"node"`
	Ready    bool   `json:"ready"`
	Subnet   string `json:"subnet,omitempty"`
	Network  string `json:"network,omitempty"`
	Backend  string `json:"backend,omitempty"`
	PublicIP string `json:"publicIP,omitempty"`
	// Subnet6, Network6 and PublicIP6 are the IPv6 ones (dual-stack and IPv6-only).
	Subnet6   string `json:"subnet6,omitempty"`
	Network6  string `json:"network6,omitempty"`
	PublicIP6 string `json:"publicIP6,omitempty"`
	PodMTU    int    `json:"podMTU,omitempty"`
	// PodInterface is how the conflist the agent wrote wires pods: routed or bridge.
	PodInterface string `json:"podInterface,omitempty"`
	// Docker is route mode's bridge ("docker0") or "network NAME".
	Docker string            `json:"docker,omitempty"`
	Errors map[string]string `json:"errors,omitempty"`
	Store  *StoreStatus      `json:"store,omitempty"` // reachability (stores that can tell: etcd)
	Peers  []PeerStatus      `json:"peers"`
	// WireGuard is the node's WireGuard device (wireguard backend).
	WireGuard *WireGuardStatus `json:"wireguard,omitempty"`
	// IgnoredLeases are the store keys whose leases are not used, with why (invalid,
	// outside the network, overlapping another lease, claiming this node's address).
	IgnoredLeases map[string]string `json:"ignoredLeases,omitempty"`
}

// PeerStatus is one peer with what the kernel has for it.
type PeerStatus struct {
	Node      string `json:"node"`
	Subnet    string `json:"subnet"`
	PublicIP  string `json:"publicIP"`
	Subnet6   string `json:"subnet6,omitempty"`
	PublicIP6 string `json:"publicIP6,omitempty"`
	Mode      string `json:"mode"`
	Reason    string `json:"reason,omitempty"`
	Route     bool   `json:"route"`
	FDB       *bool  `json:"fdb,omitempty"`
	Neigh     *bool  `json:"neigh,omitempty"`
	// WG says whether the WireGuard device has the peer with its planned endpoint and
	// allowed IPs; the rest is the device's view of it.
	WG *bool `json:"wg,omitempty"`
	// WGHandshakeAge is the seconds since the last handshake (-1: none yet).
	WGHandshakeAge *float64 `json:"wgHandshakeAgeSeconds,omitempty"`
	WGRxBytes      int64    `json:"wgRxBytes,omitempty"`
	WGTxBytes      int64    `json:"wgTxBytes,omitempty"`
}

// WireGuardStatus is the node's WireGuard device and why it uses the implementation it does.
type WireGuardStatus struct {
	Device         string `json:"device"`
	Implementation string `json:"implementation"`
	Reason         string `json:"reason"`
	PublicKey      string `json:"publicKey"`
	Port           int    `json:"port"`
}

// peerCount is how many other nodes the current plan has (the lease list also holds
// this node's own lease).
func (a *Agent) peerCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	if a.planner != nil {
		for _, c := range a.planner.Count() {
			n += c
		}
	}
	return n
}

// text is v's text form, empty when v is unset (IPv6 or IPv4 off).
func text[T interface {
	IsValid() bool
	String() string
}](v T) string {
	if !v.IsValid() {
		return ""
	}
	return v.String()
}

func (a *Agent) setLease(l lease.Lease, cfg config.Network) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.status.Node = l.Node
	a.status.Subnet = text(l.Subnet)
	a.status.Network = text(cfg.Network)
	a.status.Backend = cfg.Backend.Type
	a.status.PublicIP = text(l.PublicIP)
	a.status.Subnet6, a.status.Network6, a.status.PublicIP6 = text(l.Subnet6), text(cfg.IPv6Network), text(l.PublicIP6)
	if d := a.opt.Docker; d != nil {
		a.status.Docker = d.Bridge
		if d.Network != "" {
			a.status.Docker = "network " + d.Network
		}
	}
}

func (a *Agent) setError(kind string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.status.Errors == nil {
		a.status.Errors = map[string]string{}
	}
	a.status.Errors[kind] = err.Error()
}

func (a *Agent) clearError(kind string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.status.Errors, kind)
}

func (a *Agent) forwardingError() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status.Errors["forwarding"]
}

func (a *Agent) setReady() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.status.Ready = true
}

func (a *Agent) ready() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status.Ready
}

// Snapshot returns the status with each peer's kernel state filled in.
func (a *Agent) Snapshot() (Status, error) {
	a.mu.Lock()
	st := a.status
	if st.Store != nil {
		s := *st.Store
		st.Store = &s
	}
	st.Errors = map[string]string{}
	for k, v := range a.status.Errors {
		st.Errors[k] = v
	}
	var p *plan.Plan
	if a.planner != nil {
		pl := a.planner.Plan()
		p = &pl
		st.PodMTU = pl.PodMTU
	}
	a.mu.Unlock()
	st.Peers = []PeerStatus{}
	if p == nil {
		return st, nil
	}
	h, err := netlink.NewHandle() // its own socket: the loop's handle is not shared
	if err != nil {
		return st, err
	}
	defer h.Close()
	routes, err := route.New(h, a.opt.Log).Current()
	if err != nil {
		return st, err
	}
	neigh := map[netip.Addr]string{}
	fdb := map[string]netip.Addr{}
	if p.VXLAN != nil {
		if l, err := h.LinkByName(p.VXLAN.Name); err == nil {
			ns, _ := nldump.Retry(func() ([]netlink.Neigh, error) { return h.NeighList(l.Attrs().Index, unix.AF_UNSPEC) })
			for _, n := range ns {
				if ip, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 {
					neigh[ip.Unmap()] = strings.ToLower(n.HardwareAddr.String())
				}
			}
			fs, _ := nldump.Retry(func() ([]netlink.Neigh, error) { return h.NeighList(l.Attrs().Index, unix.AF_BRIDGE) })
			for _, f := range fs {
				if ip, ok := netip.AddrFromSlice(f.IP); ok {
					fdb[strings.ToLower(f.HardwareAddr.String())] = ip.Unmap()
				}
			}
		}
	}
	wantRoute := map[netip.Prefix]plan.Route{}
	for _, r := range p.Routes {
		wantRoute[r.Dst] = r
	}
	wantFDB := map[netip.Addr]plan.FDB{}
	for _, f := range p.FDB {
		wantFDB[f.Dst] = f
	}
	vxlan6 := p.VXLAN != nil && p.VXLAN.Local.Is6()
	wgWant := map[string]plan.WGPeer{}
	for _, w := range p.WGPeers {
		wgWant[w.Node] = w
	}
	wgHave := map[string]dataplane.WGPeerStatus{}
	if ws, ok := a.dp.WireGuard(); ok {
		st.WireGuard = &WireGuardStatus{Device: ws.Device, Implementation: string(ws.Impl.Kind), Reason: ws.Impl.Reason, PublicKey: ws.PublicKey, Port: ws.Port}
		for _, wp := range ws.Peers {
			if wp.Node != "" {
				wgHave[wp.Node] = wp
			}
		}
	}
	now := time.Now()
	for _, p := range p.Peers {
		ps := PeerStatus{Node: p.Node, Subnet: text(p.Subnet), PublicIP: text(p.PublicIP), Subnet6: text(p.Subnet6), PublicIP6: text(p.PublicIP6),
			Mode: string(p.Mode), Reason: p.Reason}
		subnets := []netip.Prefix{}
		for _, s := range []netip.Prefix{p.Subnet, p.Subnet6} {
			if s.IsValid() {
				subnets = append(subnets, s)
			}
		}
		// Route: every subnet of the peer has its planned route in the kernel.
		ps.Route = len(subnets) > 0
		for _, s := range subnets {
			w, ok := wantRoute[s]
			c, have := routes[s]
			ps.Route = ps.Route && ok && have && gateway(c) == w.Gw
		}
		if p.Mode == plan.VXLAN {
			dst := p.PublicIP
			if vxlan6 {
				dst = p.PublicIP6
			}
			f := wantFDB[dst]
			hasFDB := fdb[strings.ToLower(f.MAC)] == dst
			hasNeigh := true
			for _, s := range subnets {
				hasNeigh = hasNeigh && neigh[s.Addr()] == strings.ToLower(f.MAC)
			}
			ps.FDB, ps.Neigh = &hasFDB, &hasNeigh
		}
		if w, ok := wgWant[p.Node]; ok {
			h, have := wgHave[p.Node]
			// The device's endpoint is where the peer's packets last came from.
			in := have && h.PublicKey == w.PublicKey && h.Endpoint == w.Endpoint
			ps.WG = &in
			if have {
				age := -1.0
				if !h.LastHandshake.IsZero() {
					age = now.Sub(h.LastHandshake).Seconds()
				}
				ps.WGHandshakeAge, ps.WGRxBytes, ps.WGTxBytes = &age, h.RxBytes, h.TxBytes
			}
		}
		st.Peers = append(st.Peers, ps)
	}
	sort.Slice(st.Peers, func(i, j int) bool { return st.Peers[i].Node < st.Peers[j].Node })
	return st, nil
}

// gateway is a route's next hop, RTA_GATEWAY or RTA_VIA.
func gateway(r netlink.Route) netip.Addr {
	if gw, ok := netip.AddrFromSlice(r.Gw); ok {
		return gw.Unmap()
	}
	if v, ok := r.Via.(*netlink.Via); ok && v != nil {
		gw, _ := netip.AddrFromSlice(v.Addr)
		return gw.Unmap()
	}
	return netip.Addr{}
}

// Handler serves /healthz, /readyz, /metrics and /status (and /debug/pprof/ with pprof).
func (a *Agent) Handler(pprof bool) http.Handler {
	mux := http.NewServeMux()
	if pprof {
		mux.HandleFunc("/debug/pprof/", httppprof.Index)
		mux.HandleFunc("/debug/pprof/profile", httppprof.Profile)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if !a.ready() {
			http.Error(w, "not ready: no lease or first reconcile not done", http.StatusServiceUnavailable)
			return
		}
		if err := a.forwardingError(); err != "" {
			http.Error(w, "not ready: "+err, http.StatusServiceUnavailable)
			return
		}
		if s := a.storeState(); s.State == storeUnreachable {
			// The dataplane is kept as it was, but peers' changes cannot reach this node.
			http.Error(w, fmt.Sprintf("not ready: lease store unreachable since %s (dataplane kept as it was): %s", s.Since.UTC().Format(time.RFC3339), s.Error), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(a.opt.Metrics.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := a.Snapshot()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(st)
	})
	return mux
}
