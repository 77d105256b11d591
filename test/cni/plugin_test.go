package cni_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/netagent/netagent/pkg/subnetfile"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// TestHundredPods adds 100 pods, checks and pings them, then deletes them and looks for
// anything left behind.
func TestHundredPods(t *testing.T) {
	n := newNode(t)
	l := n.list("1.0.0", conf{"subnet": "10.244.1.0/24"})
	rulesBefore := n.ruleCount()

	const count = 100
	pods := make([]*pod, count)
	ips := make([]string, count)
	seen := map[string]int{}
	for i := range pods {
		pods[i] = n.newPod(fmt.Sprintf("pod-%03d", i))
		r := n.mustAdd(l, pods[i])
		ips[i] = podIP(t, r)
		if j, dup := seen[ips[i]]; dup {
			t.Fatalf("pod %d got %s, already given to pod %d", i, ips[i], j)
		}
		seen[ips[i]] = i
		if !netip.MustParsePrefix("10.244.1.0/24").Contains(netip.MustParseAddr(ips[i])) || ips[i] == "10.244.1.1" {
			t.Fatalf("pod %d got %s, outside the pool or the gateway", i, ips[i])
		}
		if gw := r.IPs[0].Gateway.String(); gw != "10.244.1.1" {
			t.Errorf("pod %d gateway = %s, want 10.244.1.1", i, gw)
		}
	}
	if got := len(n.allocations()); got != count {
		t.Errorf("store has %d allocations, want %d", got, count)
	}
	for i, p := range pods {
		if err := n.check(l, p); err != nil {
			t.Errorf("CHECK pod %d: %v", i, err)
		}
	}
	// Traffic: every pod to the gateway, and pod 0 to every other pod (and back, via TCP).
	var wg sync.WaitGroup
	errs := make(chan error, 2*count)
	sem := make(chan struct{}, 8)
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := ping(p.ns, "10.244.1.1"); err != nil {
				errs <- fmt.Errorf("pod %d -> gateway: %w", i, err)
			}
			if i > 0 {
				if err := ping(pods[0].ns, ips[i]); err != nil {
					errs <- fmt.Errorf("pod 0 -> pod %d: %w", i, err)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	pods[99].ns.Serve(t, 8080, func(string) string { return "hello from 99" })
	if got, err := pods[0].ns.Fetch(ips[99] + ":8080"); err != nil || got != "hello from 99" {
		t.Errorf("TCP pod 0 -> pod 99 = %q, %v", got, err)
	}
	if got, err := n.ns.Fetch(ips[99] + ":8080"); err != nil || got != "hello from 99" {
		t.Errorf("TCP node -> pod 99 = %q, %v", got, err)
	}

	for i, p := range pods {
		if err := n.del(l, p); err != nil {
			t.Errorf("DEL pod %d: %v", i, err)
		}
	}
	if v := n.veths(); len(v) != 0 {
		t.Errorf("veths left after DEL: %v", v)
	}
	if a := n.allocations(); len(a) != 0 {
		t.Errorf("allocations left after DEL: %v", a)
	}
	if got := n.ruleCount(); got != rulesBefore {
		t.Errorf("iptables rules: %d after, %d before", got, rulesBefore)
	}
}

// TestConcurrentAddsOnSmallPool runs 64 ADDs at once on a /26 (61 usable addresses).
func TestConcurrentAddsOnSmallPool(t *testing.T) {
	n := newNode(t)
	l := n.list("1.0.0", conf{"subnet": "10.244.2.0/26"})
	pods := make([]*pod, 64)
	for i := range pods {
		pods[i] = n.newPod(fmt.Sprintf("c%02d", i))
	}
	type out struct {
		ip  string
		err error
	}
	res := make([]out, len(pods))
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := n.add(l, p)
			if err == nil {
				res[i].ip = r.IPs[0].Address.IP.String()
			}
			res[i].err = err
		}()
	}
	wg.Wait()
	ok, failed := 0, 0
	seen := map[string]bool{}
	for i, r := range res {
		if r.err != nil {
			failed++
			var e *types.Error
			if !errors.As(r.err, &e) || e.Code != types.ErrTryAgainLater || !strings.Contains(e.Msg, "exhausted") {
				t.Errorf("pod %d failed with %v, want code 11 'address pool exhausted'", i, r.err)
			}
			continue
		}
		ok++
		if seen[r.ip] {
			t.Errorf("duplicate address %s", r.ip)
		}
		seen[r.ip] = true
	}
	if ok != 61 || failed != 3 {
		t.Errorf("%d ADDs succeeded and %d failed, want 61 and 3", ok, failed)
	}
	if v := n.veths(); len(v) != 61 {
		t.Errorf("%d veths on the node, want 61 (a failed ADD must leave none)", len(v))
	}
	// The runtime calls DEL after a failed ADD too.
	for _, p := range pods {
		if err := n.del(l, p); err != nil {
			t.Errorf("DEL %s: %v", p.rt.ContainerID, err)
		}
	}
	if v := n.veths(); len(v) != 0 {
		t.Errorf("veths left: %v", v)
	}
	if a := n.allocations(); len(a) != 0 {
		t.Errorf("allocations left: %v", a)
	}
}

// TestBadInput feeds the binary each kind of bad input and checks the CNI error code, that
// the message names the problem, and that the error carries the config's cniVersion.
func TestBadInput(t *testing.T) {
	n := newNode(t)
	p := netns.New(t, "pod")
	good := func(v string, extra string) string {
		return fmt.Sprintf(`{"cniVersion":%q,"name":"netagent","type":"netagent-cni","subnet":"10.244.3.0/24","dataDir":%q%s}`, v, filepath.Join(n.dataDir, "ipam"), extra)
	}
	env := func(overrides ...string) map[string]string {
		e := map[string]string{"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bad", "CNI_NETNS": p.Path, "CNI_IFNAME": "eth0", "CNI_PATH": n.binDir}
		for i := 0; i < len(overrides); i += 2 {
			if overrides[i+1] == "" {
				delete(e, overrides[i])
			} else {
				e[overrides[i]] = overrides[i+1]
			}
		}
		return e
	}
	tests := []struct {
		name     string
		env      map[string]string
		stdin    string
		code     uint
		contains string
		version  string
	}{
		{"malformed json", env(), `{"cniVersion":"1.0.0",`, 6, "unexpected end of JSON", "1.1.0"},
		{"wrong field type", env(), good("1.0.0", `,"mtu":"big"`), 6, "mtu", "1.0.0"},
		{"missing name", env(), `{"cniVersion":"1.0.0","type":"netagent-cni","subnet":"10.244.3.0/24"}`, 7, "missing network name", "1.0.0"},
		{"unknown cniVersion", env(), good("7.7.7", ""), 1, "incompatible CNI versions", "1.1.0"},
		{"garbage cniVersion", env(), good("one", ""), 1, "", "1.1.0"},
		{"invalid subnet", env(), strings.Replace(good("1.0.0", ""), "10.244.3.0/24", "10.244.3.0/33", 1), 7, "invalid subnet", "1.0.0"},
		{"subnet with host bits", env(), strings.Replace(good("1.0.0", ""), "10.244.3.0/24", "10.244.3.7/24", 1), 7, "host bits", "1.0.0"},
		{"subnet too small", env(), strings.Replace(good("1.0.0", ""), "10.244.3.0/24", "10.244.3.0/31", 1), 7, "too small", "1.0.0"},
		{"mtu too small", env(), good("0.4.0", `,"mtu":100`), 7, "invalid mtu", "0.4.0"},
		{"bridge name too long", env(), good("1.0.0", `,"bridge":"a-very-long-bridge-name"`), 7, "invalid bridge", "1.0.0"},
		{"bridge name with slash", env(), good("0.3.1", `,"bridge":"br/0"`), 7, "invalid bridge", "0.3.1"},
		{"rangeStart outside", env(), good("1.0.0", `,"rangeStart":"10.9.9.9"`), 7, "rangeStart 10.9.9.9 is outside", "1.0.0"},
		{"rangeStart not an IP", env(), good("1.0.0", `,"rangeStart":"x"`), 7, "invalid rangeStart", "1.0.0"},
		{"relative dataDir", env(), `{"cniVersion":"1.0.0","name":"n","type":"netagent-cni","subnet":"10.244.3.0/24","dataDir":"rel"}`, 7, "invalid dataDir", "1.0.0"},
		{"bad port mapping", env(), good("1.0.0", `,"runtimeConfig":{"portMappings":[{"hostPort":0,"containerPort":80,"protocol":"tcp"}]}`), 7, "hostPort 0", "1.0.0"},
		{"bad port protocol", env(), good("1.0.0", `,"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"icmp"}]}`), 7, "protocol", "1.0.0"},
		{"missing CNI_CONTAINERID", env("CNI_CONTAINERID", ""), good("1.0.0", ""), 4, "CNI_CONTAINERID", "1.0.0"},
		{"missing CNI_NETNS", env("CNI_NETNS", ""), good("1.0.0", ""), 4, "CNI_NETNS", "1.0.0"},
		{"missing CNI_IFNAME", env("CNI_IFNAME", ""), good("1.0.0", ""), 4, "CNI_IFNAME", "1.0.0"},
		{"invalid CNI_IFNAME", env("CNI_IFNAME", "eth0/evil"), good("1.0.0", ""), 4, "interface name", "1.0.0"},
		{"missing CNI_COMMAND", env("CNI_COMMAND", ""), good("1.0.0", ""), 4, "CNI_COMMAND", "1.1.0"},
		{"unknown CNI_COMMAND", env("CNI_COMMAND", "FROB"), good("1.0.0", ""), 4, "unknown CNI_COMMAND", "1.0.0"},
		{"netns does not exist", env("CNI_NETNS", "/run/netns/does-not-exist-netagent"), good("1.0.0", ""), 3, "does-not-exist", "1.0.0"},
		{"CHECK on 0.3.1", env("CNI_COMMAND", "CHECK"), good("0.3.1", ""), 1, "does not allow CHECK", "0.3.1"},
		{"STATUS on 1.0.0", env("CNI_COMMAND", "STATUS"), good("1.0.0", ""), 1, "does not allow STATUS", "1.0.0"},
		{"GC on 0.4.0", env("CNI_COMMAND", "GC"), good("0.4.0", ""), 1, "does not allow GC", "0.4.0"},
		{"ipam and subnet both", env(), good("1.0.0", `,"ipam":{"type":"host-local"}`), 7, "either subnet or an ipam", "1.0.0"},
		{"agent not ready", env(), fmt.Sprintf(`{"cniVersion":"1.0.0","name":"n","type":"netagent-cni","dataDir":%q,"subnetFile":"/nonexistent/subnet.env","subnetFileWait":"300ms"}`, n.dataDir), 11, "netagent is not ready", "1.0.0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := n.exec(tt.env, tt.stdin)
			if err == nil {
				if tt.env["CNI_COMMAND"] == "" {
					return // no command: skel prints "about" to stderr and exits 0, as the spec allows
				}
				t.Fatalf("plugin succeeded, want code %d; output %s", tt.code, out)
			}
			var e cniErr
			if jerr := json.Unmarshal(out, &e); jerr != nil {
				t.Fatalf("stdout is not an error object: %v: %q", jerr, out)
			}
			if e.Code != tt.code {
				t.Errorf("code = %d, want %d (%s; %s)", e.Code, tt.code, e.Msg, e.Details)
			}
			if !strings.Contains(e.Msg+"; "+e.Details, tt.contains) {
				t.Errorf("message %q; %q does not mention %q", e.Msg, e.Details, tt.contains)
			}
			if e.CNIVersion != tt.version {
				t.Errorf("error cniVersion = %q, want %q", e.CNIVersion, tt.version)
			}
		})
	}
	if v := n.veths(); len(v) != 0 {
		t.Errorf("bad input left veths: %v", v)
	}
	if a := n.allocations(); len(a) != 0 {
		t.Errorf("bad input left allocations: %v", a)
	}
}

// TestDelEdgeCases: DEL must succeed twice, for unknown containers, and when the netns or
// the veth is already gone, and still release what it recorded.
func TestDelEdgeCases(t *testing.T) {
	n := newNode(t)
	l := n.list("1.0.0", conf{"subnet": "10.244.4.0/24"})

	t.Run("twice", func(t *testing.T) {
		p := n.newPod("twice")
		n.mustAdd(l, p)
		for i := range 2 {
			if err := n.del(l, p); err != nil {
				t.Fatalf("DEL #%d: %v", i+1, err)
			}
		}
	})
	t.Run("never added", func(t *testing.T) {
		p := n.newPod("never")
		if err := n.del(l, p); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("netns gone", func(t *testing.T) {
		p := n.newPod("nsgone")
		n.mustAdd(l, p)
		if err := p.ns.Close(); err != nil {
			t.Fatal(err)
		}
		if err := n.del(l, p); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("netns path empty", func(t *testing.T) {
		p := n.newPod("nspath")
		n.mustAdd(l, p)
		_ = p.ns.Close()
		p.rt.NetNS = ""
		if err := n.del(l, p); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("veth gone", func(t *testing.T) {
		p := n.newPod("vethgone")
		n.mustAdd(l, p)
		h, _ := n.ns.Handle()
		defer h.Close()
		for _, v := range n.veths() {
			lk, _ := h.LinkByName(v)
			_ = h.LinkDel(lk)
		}
		if err := n.del(l, p); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("config since made invalid", func(t *testing.T) {
		p := n.newPod("badconf")
		n.mustAdd(l, p)
		bad := n.list("1.0.0", conf{"subnet": "10.244.4.0/33", "mtu": 5})
		if _, err := n.add(bad, n.newPod("refused")); err == nil {
			t.Fatal("ADD accepted an invalid config")
		}
		if err := n.del(bad, p); err != nil {
			t.Fatalf("DEL with a config ADD would refuse: %v", err)
		}
	})
	if v := n.veths(); len(v) != 0 {
		t.Errorf("veths left: %v", v)
	}
	if a := n.allocations(); len(a) != 0 {
		t.Errorf("allocations left: %v", a)
	}
}

// TestCheckDetectsDrift breaks a wired pod in several ways and expects CHECK to say so.
func TestCheckDetectsDrift(t *testing.T) {
	n := newNode(t)
	l := n.list("1.0.0", conf{"subnet": "10.244.5.0/24"})
	cases := []struct {
		name   string
		break_ func(t *testing.T, p *pod)
		want   string
	}{
		{"pod interface deleted", func(t *testing.T, p *pod) { p.ns.MustRun(t, "ip", "link", "del", "eth0") }, "missing"},
		{"pod address removed", func(t *testing.T, p *pod) { p.ns.MustRun(t, "ip", "addr", "flush", "dev", "eth0") }, "does not carry"},
		{"pod default route removed", func(t *testing.T, p *pod) { p.ns.MustRun(t, "ip", "route", "del", "default") }, "no default route"},
		{"pod interface down", func(t *testing.T, p *pod) { p.ns.MustRun(t, "ip", "link", "set", "eth0", "down") }, "down"},
		{"host veth detached", func(t *testing.T, p *pod) {
			for _, v := range n.veths() {
				n.ns.MustRun(t, "ip", "link", "set", v, "nomaster")
			}
		}, "not attached"},
		{"bridge address removed", func(t *testing.T, p *pod) { n.ns.MustRun(t, "ip", "addr", "flush", "dev", "cni0") }, "gateway"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := n.newPod(fmt.Sprint("drift", i))
			n.mustAdd(l, p)
			if err := n.check(l, p); err != nil {
				t.Fatalf("CHECK before drift: %v", err)
			}
			c.break_(t, p)
			err := n.check(l, p)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("CHECK after %s = %v, want error mentioning %q", c.name, err, c.want)
			}
			if err := n.del(l, p); err != nil {
				t.Fatal(err)
			}
			// Repair the bridge for the next case (a later ADD re-adds the address anyway).
		})
	}
	if a := n.allocations(); len(a) != 0 {
		t.Errorf("allocations left: %v", a)
	}
}

// TestStatus covers readiness: ready, pool exhausted, subnet unknown, bridge unusable.
func TestStatus(t *testing.T) {
	n := newNode(t)
	status := func(c conf) error {
		return n.ns.Do(func() error {
			return n.cni.GetStatusNetworkList(t.Context(), n.list("1.1.0", c))
		})
	}
	wantCode := func(err error, code uint, msg string) {
		t.Helper()
		var e *types.Error
		if !errors.As(err, &e) || e.Code != code || !strings.Contains(e.Error(), msg) {
			t.Errorf("STATUS = %v, want code %d mentioning %q", err, code, msg)
		}
	}
	small := conf{"subnet": "10.244.6.0/30"} // exactly one usable address
	if err := status(small); err != nil {
		t.Fatalf("STATUS on an empty pool: %v", err)
	}
	p := n.newPod("only")
	n.mustAdd(n.list("1.1.0", small), p)
	wantCode(status(small), 50, "exhausted")
	if err := n.del(n.list("1.1.0", small), p); err != nil {
		t.Fatal(err)
	}
	if err := status(small); err != nil {
		t.Errorf("STATUS after DEL: %v", err)
	}
	wantCode(status(conf{"subnetFile": "/nonexistent/subnet.env"}), 50, "not ready")
	n.ns.MustRun(t, "ip", "link", "add", "notabridge", "type", "veth", "peer", "name", "notabridge1")
	wantCode(status(conf{"subnet": "10.244.6.0/24", "bridge": "notabridge"}), 50, "not a bridge")
}

// TestGC releases everything not listed in cni.dev/valid-attachments.
func TestGC(t *testing.T) {
	n := newNode(t)
	n.underlay("10.244.7.0/24")
	l := n.list("1.1.0", conf{"subnet": "10.244.7.0/24"})
	rulesBefore := n.ruleCount()
	keep := n.newPod("keep", map[string]any{"hostPort": 9001, "containerPort": 80, "protocol": "tcp"})
	n.mustAdd(l, keep)
	var gone []*pod
	for i := range 3 {
		p := n.newPod(fmt.Sprint("gone", i), map[string]any{"hostPort": 9100 + i, "containerPort": 80, "protocol": "tcp"})
		n.mustAdd(l, p)
		gone = append(gone, p)
	}
	err := n.ns.Do(func() error {
		return n.cni.GCNetworkList(t.Context(), l, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: keep.rt.ContainerID, IfName: "eth0"}}})
	})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	if v := n.veths(); len(v) != 1 {
		t.Errorf("veths after GC = %v, want only keep's", v)
	}
	if a := n.allocations(); len(a) != 1 {
		t.Errorf("allocations after GC = %v, want only keep's", a)
	}
	save := n.ns.MustRun(t, "iptables-save", "-t", "nat")
	if strings.Contains(save, "gone") || !strings.Contains(save, "keep") {
		t.Errorf("host-port rules after GC wrong:\n%s", save)
	}
	if err := n.check(l, keep); err != nil {
		t.Errorf("CHECK of kept pod after GC: %v", err)
	}
	// DEL of a collected pod still succeeds.
	for _, p := range gone {
		if err := n.del(l, p); err != nil {
			t.Error(err)
		}
	}
	if err := n.del(l, keep); err != nil {
		t.Fatal(err)
	}
	if got := n.ruleCount(); got != rulesBefore {
		t.Errorf("iptables rules after all DELs: %d, before %d:\n%s", got, rulesBefore, n.ns.MustRun(t, "iptables-save"))
	}
}

// TestSubnetFromAgent: without "subnet", ADD waits for the agent's subnet file.
func TestSubnetFromAgent(t *testing.T) {
	n := newNode(t)
	path := filepath.Join(t.TempDir(), "run", "subnet.env")
	l := n.list("1.0.0", conf{"subnetFile": path, "subnetFileWait": "5s"})
	p := n.newPod("late")
	go func() {
		time.Sleep(400 * time.Millisecond)
		_ = subnetfile.Write(path, subnetfile.Info{
			Network: netip.MustParsePrefix("10.250.0.0/16"),
			Subnet:  netip.MustParsePrefix("10.250.3.0/24"),
			MTU:     1450,
		})
	}()
	start := time.Now()
	r := n.mustAdd(l, p)
	if ip := podIP(t, r); !strings.HasPrefix(ip, "10.250.3.") {
		t.Errorf("pod got %s, want one from the agent's 10.250.3.0/24", ip)
	}
	if time.Since(start) < 300*time.Millisecond {
		t.Errorf("ADD returned before the subnet file existed")
	}
	h, err := p.ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lk, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if lk.Attrs().MTU != 1450 {
		t.Errorf("pod MTU = %d, want the agent's 1450", lk.Attrs().MTU)
	}
	if err := n.del(l, p); err != nil {
		t.Fatal(err)
	}
}

// TestAddIsAtomic makes ADD fail at different steps and checks nothing is left.
func TestAddIsAtomic(t *testing.T) {
	n := newNode(t)
	sub := "10.244.9.0/24"
	t.Run("interface name taken in pod", func(t *testing.T) {
		l := n.list("1.0.0", conf{"subnet": sub})
		p := n.newPod("taken")
		p.ns.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
		if _, err := n.add(l, p); err == nil || !strings.Contains(err.Error(), "already exists") {
			t.Fatalf("ADD = %v, want 'already exists'", err)
		}
	})
	t.Run("iptables missing", func(t *testing.T) {
		p := netns.New(t, "pod")
		stdin := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"netagent","type":"netagent-cni","subnet":%q,"dataDir":%q,"runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}}`, sub, filepath.Join(n.dataDir, "ipam"))
		cmd := n.ns.Command(t.Context(), n.plugin)
		cmd.Env = []string{"PATH=/nonexistent", "CNI_COMMAND=ADD", "CNI_CONTAINERID=noipt", "CNI_NETNS=" + p.Path, "CNI_IFNAME=eth0", "CNI_PATH=" + n.binDir}
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.Output()
		if err == nil || !strings.Contains(string(out), "iptables") {
			t.Fatalf("ADD without iptables = %v, %s; want an iptables error", err, out)
		}
		h, _ := p.Handle()
		defer h.Close()
		if _, err := h.LinkByName("eth0"); err == nil {
			t.Error("pod interface left behind")
		}
	})
	if v := n.veths(); len(v) != 0 {
		t.Errorf("veths left: %v", v)
	}
	if a := n.allocations(); len(a) != 0 {
		t.Errorf("allocations left: %v", a)
	}
}

// TestRepeatedAdd: a second ADD of the same attachment keeps its address and rewires it.
func TestRepeatedAdd(t *testing.T) {
	n := newNode(t)
	l := n.list("1.0.0", conf{"subnet": "10.244.10.0/24"})
	p := n.newPod("again")
	a := podIP(t, n.mustAdd(l, p))
	p.ns.MustRun(t, "ip", "link", "del", "eth0") // the first wiring is lost
	b := podIP(t, n.mustAdd(l, p))
	if a != b {
		t.Errorf("repeated ADD gave %s, first gave %s", b, a)
	}
	if err := n.check(l, p); err != nil {
		t.Error(err)
	}
	if err := n.del(l, p); err != nil {
		t.Fatal(err)
	}
}

// TestDelegatedIPAM: a standard ipam section is honoured (host-local from the plugins module).
func TestDelegatedIPAM(t *testing.T) {
	n := newNode(t)
	testbin.Build(t, "github.com/containernetworking/plugins/plugins/ipam/host-local", "host-local")
	hlDir := filepath.Join(n.dataDir, "host-local")
	l := n.list("1.0.0", conf{"ipam": map[string]any{"type": "host-local", "subnet": "10.244.11.0/24", "dataDir": hlDir}})
	p := n.newPod("delegated")
	r := n.mustAdd(l, p)
	ip := podIP(t, r)
	if !strings.HasPrefix(ip, "10.244.11.") {
		t.Fatalf("pod got %s, want an address from host-local's 10.244.11.0/24", ip)
	}
	if _, err := os.Stat(filepath.Join(hlDir, "netagent", ip)); err != nil {
		t.Errorf("host-local has no record of %s: %v", ip, err)
	}
	if err := ping(p.ns, "10.244.11.1"); err != nil {
		t.Errorf("ping gateway: %v", err)
	}
	if err := n.check(l, p); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if err := n.del(l, p); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(hlDir, "netagent", ip)); !os.IsNotExist(err) {
		t.Errorf("host-local still holds %s after DEL (err %v)", ip, err)
	}
}

// TestHostPort publishes a pod port and reaches it from outside the node, from the node
// itself, from the pod (hairpin) and from a neighbour pod; DEL removes every rule.
func TestHostPort(t *testing.T) {
	n := newNode(t)
	ext := n.underlay("10.244.12.0/24")
	l := n.list("1.0.0", conf{"subnet": "10.244.12.0/24"})
	rulesBefore := n.ruleCount()
	web := n.newPod("web", map[string]any{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
	other := n.newPod("other")
	webIP := podIP(t, n.mustAdd(l, web))
	otherIP := podIP(t, n.mustAdd(l, other))
	web.ns.Serve(t, 80, func(string) string { return "web" })

	for _, c := range []struct {
		name string
		from *netns.NS
	}{{"outside host", ext}, {"node itself", n.ns}, {"the pod itself (hairpin)", web.ns}, {"a neighbour pod", other.ns}} {
		if got, err := c.from.Fetch("192.0.2.10:8080"); err != nil || got != "web" {
			t.Errorf("host port from %s = %q, %v", c.name, got, err)
		}
	}
	_, _ = webIP, otherIP
	if err := n.check(l, web); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if err := n.del(l, web); err != nil {
		t.Fatal(err)
	}
	if _, err := ext.Fetch("192.0.2.10:8080"); err == nil {
		t.Error("host port still reachable after DEL")
	}
	if err := n.del(l, other); err != nil {
		t.Fatal(err)
	}
	if got := n.ruleCount(); got != rulesBefore {
		t.Errorf("iptables rules after DEL: %d, before %d:\n%s", got, rulesBefore, n.ns.MustRun(t, "iptables-save"))
	}
}
