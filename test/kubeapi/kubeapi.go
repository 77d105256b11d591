// Package kubeapi is a stand-in Kubernetes API server for the nodes resource, for tests
// that run real agents with --subnet-manager=kube (no kube-apiserver can be installed on
// this machine). It serves what client-go's typed client and informer use: list, watch from
// a resourceVersion (with history, so nothing between a list and its watch is lost), get
// and JSON merge patch; everything else gets a Status error. The test itself plays the
// kubelet and the controller-manager through Create, Register and Delete.
package kubeapi

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

type event struct {
	rv   int64
	typ  string // ADDED, MODIFIED, DELETED
	node []byte // the object's JSON at that revision
}

// Server holds the nodes.
type Server struct {
	mu      sync.Mutex
	rv      int64
	nodes   map[string][]byte // name -> JSON
	history []event
	wake    chan struct{}  // closed and replaced on every change
	breakCh chan struct{}  // closed and replaced by BreakWatches
	patches map[string]int // PATCH requests per node (the agents' annotation writes)
}

// New returns an empty server.
func New() *Server {
	return &Server{nodes: map[string][]byte{}, wake: make(chan struct{}), breakCh: make(chan struct{}), patches: map[string]int{}}
}

func (s *Server) store(typ string, n *corev1.Node) []byte {
	s.rv++
	n.TypeMeta = metav1.TypeMeta{Kind: "Node", APIVersion: "v1"}
	n.ResourceVersion = strconv.FormatInt(s.rv, 10)
	b, _ := json.Marshal(n)
	if typ == "DELETED" {
		delete(s.nodes, n.Name)
	} else {
		s.nodes[n.Name] = b
	}
	s.history = append(s.history, event{rv: s.rv, typ: typ, node: b})
	close(s.wake)
	s.wake = make(chan struct{})
	return b
}

// Create adds a node (the kubelet registering; set Spec.PodCIDR(s) as the
// controller-manager would).
func (s *Server) Create(n *corev1.Node) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.nodes[n.Name]; ok {
		return fmt.Errorf("node %s exists", n.Name)
	}
	n.UID = types.UID("uid-" + n.Name + "-" + strconv.FormatInt(s.rv+1, 10))
	s.store("ADDED", n.DeepCopy())
	return nil
}

// PatchCount is how many PATCH requests node name received.
func (s *Server) PatchCount(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.patches[name]
}

// Register creates a node with its podCIDRs, IPv4 first (lab.KubeAPI); spec.podCIDR is
// the first, as the controller-manager sets it.
func (s *Server) Register(name string, podCIDRs ...string) error {
	if len(podCIDRs) == 0 {
		return fmt.Errorf("node %s: no podCIDR", name)
	}
	return s.Create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDR: podCIDRs[0], PodCIDRs: podCIDRs}})
}

// Get returns a node.
func (s *Server) Get(name string) (*corev1.Node, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.nodes[name]
	if !ok {
		return nil, false
	}
	var n corev1.Node
	_ = json.Unmarshal(b, &n)
	return &n, true
}

// Update changes a node with fn.
func (s *Server) Update(name string, fn func(*corev1.Node)) error {
	return s.change("MODIFIED", name, fn)
}

// Delete removes a node.
func (s *Server) Delete(name string) error { return s.change("DELETED", name, func(*corev1.Node) {}) }

func (s *Server) change(typ, name string, fn func(*corev1.Node)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.nodes[name]
	if !ok {
		return fmt.Errorf("node %s not found", name)
	}
	var n corev1.Node
	_ = json.Unmarshal(b, &n)
	fn(&n)
	s.store(typ, &n)
	return nil
}

// BreakWatches ends every open watch stream (as an API server restart or a load balancer
// timeout would); clients re-watch from their last resourceVersion.
func (s *Server) BreakWatches() {
	s.mu.Lock()
	defer s.mu.Unlock()
	close(s.breakCh)
	s.breakCh = make(chan struct{})
}

func status(w http.ResponseWriter, code int, reason metav1.StatusReason, format string, args ...any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(metav1.Status{
		TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
		Status:   metav1.StatusFailure, Code: int32(code), Reason: reason, Message: fmt.Sprintf(format, args...),
	})
}

// ServeHTTP serves /api/v1/nodes.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	const prefix = "/api/v1/nodes"
	if !strings.HasPrefix(r.URL.Path, prefix) {
		status(w, http.StatusNotFound, metav1.StatusReasonNotFound, "the server could not find the requested resource %s", r.URL.Path)
		return
	}
	name := strings.TrimPrefix(strings.TrimPrefix(r.URL.Path, prefix), "/")
	q := r.URL.Query()
	switch {
	case name == "" && r.Method == http.MethodGet && (q.Get("watch") == "true" || q.Get("watch") == "1"):
		s.watch(w, r)
	case name == "" && r.Method == http.MethodGet:
		s.list(w)
	case name != "" && !strings.Contains(name, "/") && r.Method == http.MethodGet:
		s.mu.Lock()
		b, ok := s.nodes[name]
		s.mu.Unlock()
		if !ok {
			status(w, http.StatusNotFound, metav1.StatusReasonNotFound, "nodes %q not found", name)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(b)
	case name != "" && !strings.Contains(name, "/") && r.Method == http.MethodPatch:
		s.patch(w, r, name)
	default:
		status(w, http.StatusMethodNotAllowed, metav1.StatusReasonMethodNotAllowed, "%s %s is not supported by this stand-in", r.Method, r.URL.Path)
	}
}

func (s *Server) list(w http.ResponseWriter) {
	s.mu.Lock()
	items := make([]json.RawMessage, 0, len(s.nodes))
	for _, b := range s.nodes {
		items = append(items, b)
	}
	rv := s.rv
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"kind": "NodeList", "apiVersion": "v1",
		"metadata": map[string]string{"resourceVersion": strconv.FormatInt(rv, 10)},
		"items":    items,
	})
}

func (s *Server) watch(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if q.Get("sendInitialEvents") == "true" {
		// Streaming lists are not implemented: client-go then falls back to list + watch,
		// as it does against API servers without the feature.
		status(w, http.StatusBadRequest, metav1.StatusReasonBadRequest, "sendInitialEvents is not supported by this stand-in")
		return
	}
	var from int64
	if v := q.Get("resourceVersion"); v != "" && v != "0" {
		var err error
		if from, err = strconv.ParseInt(v, 10, 64); err != nil {
			status(w, http.StatusBadRequest, metav1.StatusReasonBadRequest, "resourceVersion %q", v)
			return
		}
	} else {
		s.mu.Lock()
		from = s.rv
		s.mu.Unlock()
	}
	timeout := 5 * time.Minute
	if v, err := strconv.Atoi(q.Get("timeoutSeconds")); err == nil && v > 0 {
		timeout = time.Duration(v) * time.Second
	}
	flusher, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	if flusher != nil {
		flusher.Flush()
	}
	end := time.After(timeout)
	enc := json.NewEncoder(w)
	for {
		s.mu.Lock()
		var pending []event
		for _, e := range s.history {
			if e.rv > from {
				pending = append(pending, e)
			}
		}
		wake, brk := s.wake, s.breakCh
		s.mu.Unlock()
		for _, e := range pending {
			if err := enc.Encode(map[string]any{"type": e.typ, "object": json.RawMessage(e.node)}); err != nil {
				return
			}
			from = e.rv
		}
		if flusher != nil && len(pending) > 0 {
			flusher.Flush()
		}
		select {
		case <-wake:
		case <-brk:
			return
		case <-end:
			return
		case <-r.Context().Done():
			return
		}
	}
}

func (s *Server) patch(w http.ResponseWriter, r *http.Request, name string) {
	ct := r.Header.Get("Content-Type")
	if ct != "application/merge-patch+json" && ct != "application/strategic-merge-patch+json" {
		status(w, http.StatusUnsupportedMediaType, metav1.StatusReasonUnsupportedMediaType, "patch type %q is not supported by this stand-in", ct)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		status(w, http.StatusBadRequest, metav1.StatusReasonBadRequest, "read body: %v", err)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.nodes[name]
	if !ok {
		status(w, http.StatusNotFound, metav1.StatusReasonNotFound, "nodes %q not found", name)
		return
	}
	s.patches[name]++
	merged, err := jsonpatch.MergePatch(b, body)
	if err != nil {
		status(w, http.StatusUnprocessableEntity, metav1.StatusReasonInvalid, "patch: %v", err)
		return
	}
	var n corev1.Node
	if err := json.Unmarshal(merged, &n); err != nil {
		status(w, http.StatusUnprocessableEntity, metav1.StatusReasonInvalid, "patched node: %v", err)
		return
	}
	if n.Name != name {
		status(w, http.StatusUnprocessableEntity, metav1.StatusReasonInvalid, "metadata.name is immutable")
		return
	}
	if same, _ := json.Marshal(&n); string(same) == string(b) {
		// A patch that changes nothing is not a new revision (and sends no event).
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(b)
		return
	}
	out := s.store("MODIFIED", &n)
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(out)
}
