// Package embedetcd runs an embedded single-member etcd on unix sockets, the
// single-machine default of netagent (and what tests and the lab use). Unix
// sockets are reached by path, not through a network namespace, so agents in any node
// namespace can use the same etcd without a route to it, and nothing listens on the host's
// network.
package embedetcd

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/netagent/netagent/pkg/etcdsock"
)

// Server is a running embedded etcd.
type Server struct {
	e   *embed.Etcd
	Dir string
	// Endpoint is the client URL (unix://...).
	Endpoint string
}

// Start runs etcd with its data and sockets in dir. etcd names a unix socket after the
// URL's host part, relative to the working directory, so Start changes into dir while the
// listeners are created and changes back after.
func Start(dir string) (*Server, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	cfg := embed.NewConfig()
	cfg.Dir = filepath.Join(dir, "data")
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	client, _ := url.Parse("unix://etcd.sock:2379")
	peer, _ := url.Parse("unix://etcd-peer.sock:2380")
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	cfg.SnapshotCount = 10000
	wd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	if err := os.Chdir(dir); err != nil {
		return nil, err
	}
	e, err := embed.StartEtcd(cfg)
	if cerr := os.Chdir(wd); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd not ready after 30s")
	}
	return &Server{e: e, Dir: dir, Endpoint: "unix://" + filepath.Join(dir, "etcd.sock:2379")}, nil
}

// Close stops etcd.
func (s *Server) Close() { s.e.Close() }

// Member describes one member of a multi-member etcd on unix sockets. All members of a
// cluster share Dir as their working directory (unix socket URLs are relative to it:
// member NAME listens on NAME.sock:2379 for clients and NAME-peer.sock:2380 for peers).
type Member struct {
	Name           string
	Dir            string
	InitialCluster string // "m1=unix://m1-peer.sock:2380,m2=..."; see PeerURL
}

// StartMember runs one member of a cluster. The process's working directory stays in
// m.Dir, because members dial each other's peer sockets by relative name for as long as
// they run: use it in a process of its own (`netagent etcd --name`).
func StartMember(m Member) (*Server, error) {
	if err := os.MkdirAll(m.Dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chdir(m.Dir); err != nil {
		return nil, err
	}
	cfg := embed.NewConfig()
	cfg.Name = m.Name
	cfg.Dir = m.Name + ".data"
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	client, _ := url.Parse(etcdsock.ClientURL(m.Name))
	peer, _ := url.Parse(etcdsock.PeerURL(m.Name))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.InitialCluster = m.InitialCluster
	cfg.InitialClusterToken = "netagent"
	cfg.SnapshotCount = 10000
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start etcd member %s: %w", m.Name, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("etcd member %s not ready after 60s", m.Name)
	}
	return &Server{e: e, Dir: m.Dir, Endpoint: etcdsock.ClientEndpoint(m.Dir, m.Name)}, nil
}
