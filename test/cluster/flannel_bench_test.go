package cluster_test

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/netagent/netagent/pkg/lab"
)

// flannelRef is flannel measured the same way in the same lab, in the same run: the bar the
// issue sets is flannel's, and this machine's speed varies from day to day.
type flannelRef struct {
	cold, restart, join time.Duration
}

// flannelPrefix and flannelNet keep flannel's leases and routes apart from netagent's.
const (
	flannelPrefix = "/coreos.com/network"
	flannelNet    = "10.245.0.0/16"
)

// measureFlannel runs flanneld (vxlan backend, --ip-masq) on the lab's nodes, whose agents
// must be stopped and their kernel state removed, and times what BenchmarkClusterLifecycle
// times for netagent: cold start of all nodes to every peer route, restart to ready (the
// subnet file rewritten, which flannel does once it holds its lease and the backend is set
// up; it has no readiness endpoint) and join to the route on every peer.
func measureFlannel(b *testing.B, l *lab.Lab, cli *clientv3.Client, flanneld string, rounds int) flannelRef {
	b.Helper()
	ctx := context.Background()
	if _, err := cli.Put(ctx, flannelPrefix+"/config", `{"Network":"`+flannelNet+`","Backend":{"Type":"vxlan"}}`); err != nil {
		b.Fatal(err)
	}
	procs := map[string]*exec.Cmd{}
	var mu sync.Mutex
	begin := func(n *lab.Node) error {
		log, err := os.OpenFile(filepath.Join(n.Dir, "flanneld.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer log.Close()
		cmd := l.NodeNS(n).Command(ctx, flanneld, "--etcd-endpoints", l.EtcdEndpoint(), "--etcd-prefix", flannelPrefix,
			"--iface", "eth0", "--ip-masq", "--subnet-file", filepath.Join(n.Dir, "flannel.env"))
		cmd.Stdout, cmd.Stderr = log, log
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return err
		}
		mu.Lock()
		procs[n.Name] = cmd
		mu.Unlock()
		return nil
	}
	start := func(n *lab.Node) {
		if err := begin(n); err != nil {
			b.Fatal(err)
		}
	}
	stop := func(n *lab.Node) {
		mu.Lock()
		cmd := procs[n.Name]
		delete(procs, n.Name)
		mu.Unlock()
		if cmd != nil {
			// flanneld sometimes hangs in its shutdown handler after a lease was deleted
			// under it; it gets 5 s.
			_ = cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				_ = cmd.Process.Kill()
				<-done
			}
		}
	}
	defer func() {
		for _, n := range l.Nodes {
			stop(n)
		}
	}()
	handles := make([]*netlink.Handle, len(l.Nodes))
	for i, n := range l.Nodes {
		h, err := l.NodeNS(n).Handle()
		if err != nil {
			b.Fatal(err)
		}
		defer h.Close()
		handles[i] = h
	}
	_, fnet, _ := net.ParseCIDR(flannelNet)
	routes := func(h *netlink.Handle) map[string]bool {
		out := map[string]bool{}
		rs, _ := h.RouteList(nil, netlink.FAMILY_V4)
		for _, r := range rs {
			if r.Dst != nil && fnet.Contains(r.Dst.IP) && r.Dst.String() != fnet.String() && r.Gw != nil {
				out[r.Dst.String()] = true
			}
		}
		return out
	}
	waitRoutes := func(what string, ok func() bool) {
		deadline := time.Now().Add(60 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				b.Fatalf("flannel %s: not programmed in 60s (logs in %s)", what, l.Nodes[0].Dir)
			}
			time.Sleep(200 * time.Microsecond)
		}
	}
	all := func() bool {
		for _, h := range handles {
			if len(routes(h)) != len(l.Nodes)-1 {
				return false
			}
		}
		return true
	}

	var ref flannelRef
	t0 := time.Now()
	errs := make(chan error, len(l.Nodes))
	for _, n := range l.Nodes {
		go func() { errs <- begin(n) }()
	}
	for range l.Nodes {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
	waitRoutes("cold start", all)
	ref.cold = time.Since(t0)

	var restart, join []time.Duration
	n1, n3 := l.Nodes[0], l.Nodes[2]
	env := filepath.Join(n1.Dir, "flannel.env")
	for range rounds {
		stop(n1)
		before, err := os.Stat(env)
		if err != nil {
			b.Fatal(err)
		}
		t := time.Now()
		start(n1)
		for {
			if st, err := os.Stat(env); err == nil && st.ModTime().After(before.ModTime()) {
				break
			}
			if time.Since(t) > 60*time.Second {
				b.Fatal("flannel restart: subnet file not rewritten in 60s")
			}
			time.Sleep(200 * time.Microsecond)
		}
		restart = append(restart, time.Since(t))

		// Join: node3 leaves (its flanneld stopped and its lease deleted, as a decommission
		// would), then comes back; time from its lease appearing in etcd to its route on
		// both peers.
		stop(n3)
		resp, err := cli.Get(ctx, flannelPrefix+"/subnets/", clientv3.WithPrefix())
		if err != nil {
			b.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			var v struct{ PublicIP string }
			if json.Unmarshal(kv.Value, &v) == nil && v.PublicIP == n3.IP.String() {
				if _, err := cli.Delete(ctx, string(kv.Key)); err != nil {
					b.Fatal(err)
				}
			}
		}
		waitRoutes("leave", func() bool { return len(routes(handles[0])) == 1 && len(routes(handles[1])) == 1 })
		watch := cli.Watch(ctx, flannelPrefix+"/subnets/", clientv3.WithPrefix())
		start(n3)
		var seen time.Time
		var sub string
		for sub == "" {
			resp := <-watch
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypePut && ev.IsCreate() {
					seen, sub = time.Now(), string(ev.Kv.Key)
				}
			}
		}
		waitRoutes("join", func() bool { return len(routes(handles[0])) == 2 && len(routes(handles[1])) == 2 })
		join = append(join, time.Since(seen))
	}
	ref.restart, ref.join = median(restart), median(join)
	return ref
}
