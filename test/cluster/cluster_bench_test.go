package cluster_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/route"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

func median(d []time.Duration) time.Duration {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[len(d)/2]
}

func ourRoutes(h *netlink.Handle) map[string]bool {
	rs, _ := h.RouteListFiltered(unix.AF_INET, &netlink.Route{Protocol: route.Protocol, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	out := map[string]bool{}
	for _, r := range rs {
		out[r.Dst.String()] = true
	}
	return out
}

// BenchmarkClusterLifecycle measures, on a 3-node vxlan lab: the cold start of all three
// agents at once until every node has routes to both peers; restart -> ready of one agent;
// and a node joining until every peer has programmed it (from the moment the joining
// node's lease is visible in etcd). The reference, measured in the same run, is the etcd
// floor: how long a bare watcher takes to see a put (commit + watch delivery), which any
// etcd-based agent pays before it can do anything.
//
//	go test -run '^$' -bench ClusterLifecycle -benchtime 10x ./test/cluster
func BenchmarkClusterLifecycle(b *testing.B) {
	netns.RequireRoot(b)
	bin := testbin.Build(b, "./cmd/netagent", "netagent")
	testbin.Build(b, "./cmd/netagent-etcd", "netagent-etcd")
	testbin.Build(b, "./cmd/cni-plugin", "netagent-cni")
	ctx := context.Background()
	l, err := lab.Up(ctx, lab.Options{
		Prefix: fmt.Sprintf("%s%d-life-", netns.Prefix, os.Getpid()), Dir: b.TempDir(),
		Nodes: 3, Backend: "vxlan", Netagent: bin, CNIBinDir: testbin.Dir(), LeaseTTL: 10 * time.Second,
	})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Down()
	handles := make([]*netlink.Handle, len(l.Nodes))
	for i, n := range l.Nodes {
		if handles[i], err = l.NodeNS(n).Handle(); err != nil {
			b.Fatal(err)
		}
		defer handles[i].Close()
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{l.EtcdEndpoint()}, DialTimeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()

	// etcd floor: put -> a watcher sees it.
	var floor []time.Duration
	wch := cli.Watch(ctx, "/bench/", clientv3.WithPrefix())
	for i := range 20 {
		t := time.Now()
		if _, err := cli.Put(ctx, fmt.Sprintf("/bench/k%d", i), "v"); err != nil {
			b.Fatal(err)
		}
		<-wch
		floor = append(floor, time.Since(t))
	}
	etcdFloor := median(floor)

	// Process floor: the same binary started in the nodes' namespaces doing nothing (its
	// usage text), 3 at once as in the cold start and 1 as in a restart. Page faults make
	// merely starting the binary a large part of a cold start on some machines, and how
	// long varies from day to day (BENCHMARKS.md, lifecycle); every agent pays it first.
	startFloor := func(nodes []*lab.Node) time.Duration {
		var ds []time.Duration
		for range 7 {
			t := time.Now()
			var wg sync.WaitGroup
			for _, n := range nodes {
				wg.Add(1)
				go func() { defer wg.Done(); _ = l.NodeNS(n).Command(ctx, bin, "-h").Run() }()
			}
			wg.Wait()
			ds = append(ds, time.Since(t))
		}
		return median(ds)
	}
	floor3, floor1 := startFloor(l.Nodes), startFloor(l.Nodes[:1])

	allProgrammed := func() bool {
		for _, h := range handles {
			if len(ourRoutes(h)) != len(l.Nodes)-1 {
				return false
			}
		}
		return true
	}
	waitAll := func(what string) {
		deadline := time.Now().Add(30 * time.Second)
		for !allProgrammed() {
			if time.Now().After(deadline) {
				b.Fatalf("%s: not programmed in 30s", what)
			}
			time.Sleep(200 * time.Microsecond)
		}
	}

	// Cold start: all agents stopped, their routes removed (`netagent cleanup`), then all
	// started at once.
	for _, n := range l.Nodes {
		if err := l.StopAgent(n, false); err != nil {
			b.Fatal(err)
		}
		if out, err := l.NodeNS(n).Run(bin, "cleanup", "--subnet-file", n.Dir+"/none", "--cni-conf", n.Dir+"/none"); err != nil {
			b.Fatalf("cleanup: %v: %s", err, out)
		}
	}
	t0 := time.Now()
	for _, n := range l.Nodes {
		if err := l.StartAgent(n); err != nil {
			b.Fatal(err)
		}
	}
	waitAll("cold start")
	cold := time.Since(t0)

	b.ResetTimer()
	var restart, join []time.Duration
	n1, n3 := l.Nodes[0], l.Nodes[2]
	for range b.N {
		// Restart -> ready.
		if err := l.StopAgent(n1, false); err != nil {
			b.Fatal(err)
		}
		t := time.Now()
		if err := l.StartAgent(n1); err != nil {
			b.Fatal(err)
		}
		for {
			if code, _, err := l.Get(n1, "/readyz"); err == nil && code == 200 {
				break
			}
			if time.Since(t) > 30*time.Second {
				b.Fatal("not ready")
			}
			time.Sleep(200 * time.Microsecond)
		}
		restart = append(restart, time.Since(t))

		// Join: node3 leaves for good, then comes back; time from its lease appearing in
		// etcd to its route on both peers.
		if err := l.StopAgent(n3, false); err != nil {
			b.Fatal(err)
		}
		if out, err := exec.Command(bin, "leave", "--node-name", n3.Name, "--etcd-endpoints", l.EtcdEndpoint()).CombinedOutput(); err != nil {
			b.Fatalf("leave: %v %s", err, out)
		}
		for len(ourRoutes(handles[0])) != 1 || len(ourRoutes(handles[1])) != 1 {
			time.Sleep(time.Millisecond)
		}
		watch := cli.Watch(ctx, "/netagent/subnets/", clientv3.WithPrefix())
		if err := l.StartAgent(n3); err != nil {
			b.Fatal(err)
		}
		var seen time.Time
		var sub string
		for sub == "" {
			resp := <-watch
			for _, ev := range resp.Events {
				if lv, err := lease.Decode(ev.Kv.Value); err == nil && lv.Node == n3.Name {
					seen, sub = time.Now(), lv.Subnet.String()
				}
			}
		}
		for !ourRoutes(handles[0])[sub] || !ourRoutes(handles[1])[sub] {
			if time.Since(seen) > 10*time.Second {
				b.Fatal("join not programmed")
			}
			time.Sleep(100 * time.Microsecond)
		}
		join = append(join, time.Since(seen))
		if err := l.WaitReady(ctx, n3, 10*time.Second); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	// flannel in the same lab, when a flanneld binary is given (BENCHMARKS.md says how to
	// build one): netagent's agents and kernel state go first.
	if flanneld := os.Getenv("FLANNELD"); flanneld != "" {
		for _, n := range l.Nodes {
			if err := l.StopAgent(n, false); err != nil {
				b.Fatal(err)
			}
			if out, err := l.NodeNS(n).Run(bin, "cleanup", "--subnet-file", n.Dir+"/none", "--cni-conf", n.Dir+"/none"); err != nil {
				b.Fatalf("cleanup: %v: %s", err, out)
			}
		}
		f := measureFlannel(b, l, cli, flanneld, 5)
		b.ReportMetric(f.cold.Seconds(), "flannel-cold-start-3-nodes-s")
		b.ReportMetric(float64(f.restart.Microseconds())/1000, "flannel-restart-ready-ms")
		b.ReportMetric(float64(f.join.Microseconds())/1000, "flannel-join-programmed-ms")
		b.ReportMetric(float64(cold)/float64(f.cold), "cold/flannel")
		b.ReportMetric(float64(median(restart))/float64(f.restart), "restart/flannel")
		b.ReportMetric(float64(median(join))/float64(f.join), "join/flannel")
		b.Logf("flannel in the same lab: cold start %s, restart -> subnet file %s (p50 of 5), join -> programmed on all peers %s (p50 of 5)",
			f.cold.Round(time.Millisecond), f.restart.Round(time.Millisecond), f.join.Round(100*time.Microsecond))
	} else {
		b.Log("FLANNELD is not set: no flannel reference in this run")
	}
	b.ReportMetric(cold.Seconds(), "cold-start-3-nodes-s")
	b.ReportMetric(float64(median(restart).Microseconds())/1000, "restart-ready-ms")
	b.ReportMetric(float64(median(join).Microseconds())/1000, "join-programmed-ms")
	b.ReportMetric(float64(etcdFloor.Microseconds())/1000, "etcd-put-to-watch-ms")
	b.ReportMetric(float64(median(join))/float64(etcdFloor), "join/etcd-floor")
	b.ReportMetric(float64(floor3.Microseconds())/1000, "start-floor-3-ms")
	b.ReportMetric(float64(floor1.Microseconds())/1000, "start-floor-1-ms")
	b.ReportMetric(float64(cold)/float64(floor3), "cold/start-floor-3")
	b.ReportMetric(float64(median(restart))/float64(floor1), "restart/start-floor-1")
	b.Logf("cold start of 3 agents %s (3 bare starts of the binary %s); restart -> ready %s (p50 of %d; 1 bare start %s); join -> programmed on all peers %s; etcd floor (put -> watch) %s",
		cold.Round(time.Millisecond), floor3.Round(time.Millisecond), median(restart).Round(time.Millisecond), len(restart), floor1.Round(time.Millisecond),
		median(join).Round(100*time.Microsecond), etcdFloor.Round(100*time.Microsecond))
}
