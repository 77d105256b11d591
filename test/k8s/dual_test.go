package k8s_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab/k8s"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// TestKubernetesDualStack is issue 15's Kubernetes item on a real dual-stack cluster: the
// controller-manager gives each Node an IPv4 and an IPv6 podCIDR, the kubelets register
// both node addresses, and netagent (the DaemonSet, net-conf.json with ipv6Network) leases
// both, publishes both underlay addresses, and carries pods' traffic over each family —
// pod to pod across nodes, and to an IPv6 ClusterIP through kube-proxy's ip6tables rules;
// then the same with routed pods (podInterface routed, set on the DaemonSet).
func TestKubernetesDualStack(t *testing.T) {
	l := newLabWith(t, 2, true)
	l.kubectl("apply", "-k", filepath.Join(testbin.Root(), "manifests/kube"))
	conf := `{"network": "10.244.0.0/16", "ipv6Network": "fd00:10:244::/56", "backend": {"type": "vxlan"}}`
	patch, _ := json.Marshal(map[string]any{"data": map[string]string{"net-conf.json": conf}})
	l.kubectl("-n", "netagent", "patch", "configmap", "netagent-config", "--type=merge", "-p", string(patch))
	l.kubectl("-n", "netagent", "rollout", "restart", "daemonset/netagent")
	l.waitReady() // with the dual-stack config
	for _, n := range l.nodes {
		l.eventually(n.Name+"'s annotations", 30*time.Second, func() (bool, string) {
			out := l.kubectl("get", "node", n.Name, "-o", `jsonpath={.spec.podCIDRs[*]} {.metadata.annotations.netagent\.io/public-ip} {.metadata.annotations.netagent\.io/public-ip6}`)
			f := strings.Fields(out)
			return len(f) == 4 && strings.Contains(f[0], ".") && strings.Contains(f[1], ":") && f[2] == n.IP.String() && f[3] == n.IP6.String(), out
		})
	}
	applyYAML(t, l, k8s.WebManifest(len(l.nodes), 0)+`---
apiVersion: v1
kind: Service
metadata: {name: web6}
spec:
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
`)
	type pod struct{ name, node, ip4, ip6 string }
	check := func(how string) {
		var pods []pod
		l.eventually(how+": web pods with both addresses on every node", 2*time.Minute, func() (bool, string) {
			pods = nil
			nodes := map[string]bool{}
			for _, p := range l.webPods() {
				ips := strings.Fields(l.kubectl("get", "pod", p.Name, "-o", "jsonpath={.status.podIPs[*].ip}"))
				if len(ips) != 2 {
					return false, fmt.Sprintf("%s: podIPs %v", p.Name, ips)
				}
				a4, err4 := netip.ParseAddr(ips[0])
				a6, err6 := netip.ParseAddr(ips[1])
				if err4 != nil || err6 != nil || !a4.Is4() || !a6.Is6() {
					return false, fmt.Sprintf("%s: podIPs %v", p.Name, ips)
				}
				pods = append(pods, pod{p.Name, p.Node, ips[0], ips[1]})
				nodes[p.Node] = true
			}
			return len(nodes) == len(l.nodes), fmt.Sprint(pods)
		})
		for _, a := range pods {
			for _, b := range pods {
				for _, ip := range []string{b.ip4, b.ip6} {
					if _, err := l.c.Kubectl(context.Background(), "exec", a.name, "--", "ping", "-c1", "-W2", ip); err != nil {
						t.Errorf("%s: %s (%s) -> %s (%s) at %s: %v", how, a.name, a.node, b.name, b.node, ip, err)
					}
				}
			}
		}
		svc := l.kubectl("get", "svc", "web6", "-o", "jsonpath={.spec.clusterIP}")
		if !strings.Contains(svc, ":") {
			t.Fatalf("Service web6 has ClusterIP %q, want an IPv6 one", svc)
		}
		for _, a := range pods {
			out, err := l.c.Kubectl(context.Background(), "exec", a.name, "--", "sh", "-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 "+svc+" 80")
			if err != nil || !strings.Contains(out, "200 OK") {
				t.Errorf("%s: %s -> IPv6 ClusterIP [%s]:80 = %q, %v", how, a.name, svc, out, err)
			}
		}
	}
	check("bridged pods")

	// Routed pods, switched as the README says (the DaemonSet's NETAGENT_POD_INTERFACE),
	// then the pods recreated: the same reachability, ClusterIP included (the routed pod's
	// own address may be the Service's backend: kube-proxy's hairpin masquerade), and no
	// pod on a bridge.
	l.kubectl("-n", "netagent", "set", "env", "daemonset/netagent", "NETAGENT_POD_INTERFACE=routed")
	l.waitReady()
	l.kubectl("delete", "pods", "-l", "app=web", "--wait=false")
	time.Sleep(2 * time.Second)
	check("routed pods")
	for _, n := range l.nodes {
		ns, err := netns.Open(n.NS)
		if err != nil {
			t.Fatal(err)
		}
		routes := ns.MustRun(t, "ip", "route", "show", "proto", "181") + ns.MustRun(t, "ip", "-6", "route", "show", "proto", "181")
		if !strings.Contains(routes, "dev na") {
			t.Errorf("%s: no routes to routed pods (proto 181):\n%s", n.Name, routes)
		}
		if out, _ := ns.Run("ip", "link", "show", "master", "cni0"); strings.Contains(out, "na") {
			t.Errorf("%s: pod veths still on cni0 after the pods were recreated routed:\n%s", n.Name, out)
		}
	}
}
