package cni_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// BenchmarkAddFamilies times the plugin's ADD for an IPv4-only and a dual-stack network,
// alternating in ABBA order in one node namespace (each pod in a fresh namespace, its DEL
// untimed), and reports each one's median wall and CPU time and their ratios (dual / IPv4,
// target <= 1.15), for bridged and for routed pods (podInterface).
// The plugin is exec'd from the node namespace as a runtime would, without libcni.
//
//	go test -run '^$' -bench BenchmarkAddFamilies -benchtime 30x ./test/cni/
func BenchmarkAddFamilies(b *testing.B) {
	netns.RequireRoot(b)
	for _, podIface := range []string{"bridge", "routed"} {
		b.Run(podIface, func(b *testing.B) { addFamilies(b, podIface) })
	}
}

func addFamilies(b *testing.B, podIface string) {
	plugin := testbin.Build(b, "./cmd/cni-plugin", "netagent-cni")
	node := netns.New(b, "node")
	dataDir := b.TempDir()
	confs := map[string]string{
		"ipv4": `{"cniVersion":"1.1.0","name":"v4","type":"netagent-cni","bridge":"br4","subnet":"10.244.32.0/22","podInterface":"` + podIface + `","dataDir":"` + dataDir + `"}`,
		"dual": `{"cniVersion":"1.1.0","name":"dual","type":"netagent-cni","bridge":"br6","subnet":"10.244.40.0/22","ipv6Subnet":"fd00:244:40::/64","podInterface":"` + podIface + `","dataDir":"` + dataDir + `"}`,
	}
	took, cpu := map[string][]time.Duration{}, map[string][]time.Duration{}
	// run returns the call's wall time and the CPU time of the plugin process (user and
	// system: less sensitive than wall time to the other load on a shared machine).
	run := func(family, cmd, id string, pod *netns.NS) (time.Duration, time.Duration) {
		c := exec.Command(plugin)
		c.Env = []string{"PATH=" + os.Getenv("PATH"), "CNI_COMMAND=" + cmd, "CNI_CONTAINERID=" + id, "CNI_NETNS=" + pod.Path,
			"CNI_IFNAME=eth0", "CNI_PATH=" + filepath.Dir(plugin)}
		c.Stdin = strings.NewReader(confs[family])
		var out []byte
		var err error
		var d time.Duration
		if derr := node.Do(func() error {
			t0 := time.Now()
			out, err = c.CombinedOutput()
			d = time.Since(t0)
			return nil
		}); derr != nil {
			b.Fatal(derr)
		}
		if err != nil {
			b.Fatalf("%s %s %s: %v: %s", family, cmd, id, err, out)
		}
		return d, c.ProcessState.UserTime() + c.ProcessState.SystemTime()
	}
	one := func(family string, i int) {
		b.StopTimer()
		pod := netns.New(b, "pod")
		id := fmt.Sprintf("%s-%d", family, i)
		b.StartTimer()
		d, c := run(family, "ADD", id, pod)
		b.StopTimer()
		took[family], cpu[family] = append(took[family], d), append(cpu[family], c)
		run(family, "DEL", id, pod)
		_ = pod.Close()
		b.StartTimer()
	}
	for i := range 3 { // warm up: bridges, rule set, page cache
		one("ipv4", -1-i)
		one("dual", -1-i)
	}
	took, cpu = map[string][]time.Duration{}, map[string][]time.Duration{}
	i := 0
	for b.Loop() {
		order := []string{"ipv4", "dual", "dual", "ipv4"}
		if i%2 == 1 {
			order = []string{"dual", "ipv4", "ipv4", "dual"}
		}
		for _, f := range order {
			one(f, i)
			i++
		}
	}
	med := func(ds []time.Duration) time.Duration {
		ds = slices.Clone(ds)
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	m4, m6 := med(took["ipv4"]), med(took["dual"])
	b.ReportMetric(float64(m4.Microseconds()), "ipv4-add-p50-µs")
	b.ReportMetric(float64(m6.Microseconds()), "dual-add-p50-µs")
	b.ReportMetric(float64(m6)/float64(m4), "dual/ipv4")
	c4, c6 := med(cpu["ipv4"]), med(cpu["dual"])
	b.ReportMetric(float64(c4.Microseconds()), "ipv4-add-cpu-p50-µs")
	b.ReportMetric(float64(c6.Microseconds()), "dual-add-cpu-p50-µs")
	b.ReportMetric(float64(c6)/float64(c4), "dual/ipv4-cpu")
	b.ReportMetric(0, "ns/op")
}
