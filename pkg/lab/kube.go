package lab

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lab/pki"
)

// KubeAPI is a Kubernetes API server for the nodes resource (test/kubeapi's stand-in):
// with Options.Kube set, the agents run with --subnet-manager=kube against it.
type KubeAPI interface {
	http.Handler
	// Register adds a Node with its podCIDRs, one per family, IPv4 first (the kubelet's
	// and the controller-manager's parts).
	Register(name string, podCIDRs ...string) error
}

// kubeAPIAddr is where a Kubernetes lab's API server listens (on the underlay).
const kubeAPIAddr = "192.0.2.251"

// KubeServer is the API server's URL in a Kubernetes lab.
func (l *Lab) KubeServer() string { return "https://" + kubeAPIAddr + ":6443" }

// PodCIDR is the podCIDR the lab's "controller-manager" assigns to the i-th node.
func (l *Lab) PodCIDR(i int) string {
	n := config.Network{Network: netip.MustParsePrefix(l.Opt.Network), Backend: config.Backend{Type: config.VXLAN}}
	n.Default()
	return n.SubnetAt(i + 1).String()
}

// PodCIDR6 is node i's IPv6 podCIDR in a kube-mode IPv6 or dual-stack lab.
func (l *Lab) PodCIDR6(i int) string {
	n := config.Network{IPv6Network: netip.MustParsePrefix(l.Opt.IPv6Network), Backend: config.Backend{Type: config.VXLAN}}
	n.Default()
	return n.Subnet6At(uint64(i + 1)).String()
}

// podCIDRs are node i's podCIDRs, one per family of the lab, IPv4 first.
func (l *Lab) podCIDRs(i int) []string {
	var out []string
	if l.IPFamily != "ipv6" {
		out = append(out, l.PodCIDR(i))
	}
	if l.IPFamily != "ipv4" {
		out = append(out, l.PodCIDR6(i))
	}
	return out
}

// startKube serves Opt.Kube over TLS with client certificates (as a real API server
// authenticates kubelets and agents) in its own namespace on the underlay, writes the
// agents' kubeconfig and net-conf.json, and registers the nodes.
func (l *Lab) startKube(ctx context.Context) error {
	files, err := GenerateTLS(filepath.Join(l.Dir, "pki-kube"), net.ParseIP(kubeAPIAddr))
	if err != nil {
		return err
	}
	cert, err := tls.LoadX509KeyPair(files.ServerCert, files.ServerKey)
	if err != nil {
		return err
	}
	caPEM, err := os.ReadFile(files.CA)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	var ln net.Listener
	if err := l.ns("api").Do(func() (err error) {
		ln, err = net.Listen("tcp", kubeAPIAddr+":6443")
		return err
	}); err != nil {
		return fmt.Errorf("API server listener: %w", err)
	}
	l.kubeSrv = &http.Server{
		Handler:           l.Opt.Kube,
		ReadHeaderTimeout: 5 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12},
	}
	go func() { _ = l.kubeSrv.ServeTLS(ln, "", "") }()

	if err := pki.Kubeconfig(l.kubeconfig(), l.KubeServer(), files.CA, "netagent", files.ClientCert, files.ClientKey); err != nil {
		return err
	}
	netConf, err := l.netConfJSON()
	if err != nil {
		return err
	}
	if err := os.WriteFile(l.netConf(), append(netConf, '\n'), 0o644); err != nil {
		return err
	}
	for i, n := range l.Nodes {
		if err := l.Opt.Kube.Register(n.Name, l.podCIDRs(i)...); err != nil {
			return fmt.Errorf("register %s: %w", n.Name, err)
		}
	}
	return nil
}

// netConfJSON is the kube-mode network config (net-conf.json) of the lab's families and
// backend, checked.
func (l *Lab) netConfJSON() ([]byte, error) {
	nc := map[string]any{"backend": map[string]string{"type": l.Opt.Backend}}
	if l.IPFamily != "ipv6" {
		nc["network"] = l.Opt.Network
	}
	if l.IPFamily != "ipv4" {
		nc["ipv6Network"] = l.Opt.IPv6Network
		if m := l.Opt.IPv6Masquerade; m != nil {
			nc["ipv6Masquerade"] = *m
		}
	}
	b, err := json.Marshal(nc)
	if err != nil {
		return nil, err
	}
	if _, err := config.Parse(b); err != nil {
		return nil, fmt.Errorf("lab network config: %w", err)
	}
	return b, nil
}

func (l *Lab) stopKube() error {
	if l.kubeSrv == nil {
		return nil
	}
	err := l.kubeSrv.Close()
	l.kubeSrv = nil
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func (l *Lab) kubeconfig() string { return filepath.Join(l.Dir, "kubeconfig") }
func (l *Lab) netConf() string    { return filepath.Join(l.Dir, "net-conf.json") }

// kubeFlags are the agents' subnet-manager flags in a Kubernetes lab.
func (l *Lab) kubeFlags() []string {
	return []string{"--subnet-manager", "kube", "--kubeconfig", l.kubeconfig(), "--net-conf", l.netConf()}
}
