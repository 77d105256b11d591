package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/netagent/netagent/pkg/lab/k8s"
)

// KubernetesOptions make a lab a real Kubernetes cluster (pkg/lab/k8s) with netagent
// installed as its DaemonSet, the way the README tells a user to.
type KubernetesOptions struct {
	KubeBin     string // the binaries scripts/k8s-build.sh caches
	Etcd        string // netagent-etcd, the API server's store
	CNI         string // netagent-cni, put into the netagent image
	Loopback    string // the loopback CNI plugin
	ImageScript string // scripts/image-rootfs.sh
	Manifests   string // a kustomize directory, e.g. manifests/kube
}

// upKubernetes builds the cluster on the lab's nodes, imports the netagent image, applies
// the manifests, waits for the rollout and for every node to be Ready, then runs a
// Deployment of PodsPerNode pods per node behind a NodePort Service.
func (l *Lab) upKubernetes(ctx context.Context) error {
	ko := l.Opt.Kubernetes
	t0 := time.Now()
	dir := filepath.Join(l.Dir, "kubernetes")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	img, err := k8s.BuildNetagentImage(ctx, ko.ImageScript, l.Opt.Netagent, ko.CNI, dir)
	if err != nil {
		return err
	}
	l.logf("netagent image assembled from Debian's iptables and the static binaries (%s)", time.Since(t0).Round(time.Millisecond))
	var nodes []*k8s.Node
	for _, n := range l.Nodes {
		// kube-proxy and the kubelet look for a default route; the outside host is the
		// underlay's gateway (nodes behind the router have theirs already).
		if n.Net.String() == underlayA && l.Opt.Remote == 0 {
			if _, err := l.NodeNS(n).Run("ip", "route", "replace", "default", "via", extIP); err != nil {
				return err
			}
			if n.IP6.IsValid() {
				if _, err := l.NodeNS(n).Run("ip", "-6", "route", "replace", "default", "via", extIP6); err != nil {
					return err
				}
			}
		}
		nodes = append(nodes, &k8s.Node{Name: n.Name, NS: n.NS, IP: n.IP, IP6: n.IP6, Dir: filepath.Join(n.Dir, "k8s")})
	}
	opt := k8s.Options{
		Dir: dir, KubeBin: ko.KubeBin, Etcd: ko.Etcd, Loopback: ko.Loopback, NetagentImage: img,
		Prefix: l.Prefix, ClusterCIDR: l.Opt.Network, Log: l.Opt.Log,
	}
	if l.IPFamily == "dual" {
		opt.ClusterCIDR += "," + l.Opt.IPv6Network
		opt.ServiceCIDR = "10.96.0.0/16,fd00:10:96::/112"
	}
	c, err := k8s.Up(ctx, opt, nodes)
	l.K8s = c
	if err != nil {
		return err
	}
	t0 = time.Now()
	netConf, err := l.netConfJSON()
	if err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "apply", "-k", ko.Manifests); err != nil {
		return err
	}
	// The lab's backend: the ConfigMap the DaemonSet mounts as net-conf.json.
	patch := fmt.Sprintf(`{"data":{"net-conf.json":%q}}`, netConf)
	if _, err := c.Kubectl(ctx, "-n", "netagent", "patch", "configmap", "netagent-config", "--type", "merge", "-p", patch); err != nil {
		return err
	}
	if l.Opt.PodInterface != "" {
		// The way the README tells an operator to: the agent's flag as an environment variable.
		if _, err := c.Kubectl(ctx, "-n", "netagent", "set", "env", "daemonset/netagent", "NETAGENT_POD_INTERFACE="+l.Opt.PodInterface); err != nil {
			return err
		}
	}
	if _, err := c.Kubectl(ctx, "-n", "netagent", "rollout", "restart", "daemonset/netagent"); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "-n", "netagent", "rollout", "status", "daemonset/netagent", "--timeout=180s"); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "wait", "--for=condition=Ready", "node", "--all", "--timeout=120s"); err != nil {
		return err
	}
	l.logf("kubectl apply -k %s: DaemonSet rolled out, every node Ready, backend %s (%s)", ko.Manifests, l.Opt.Backend, time.Since(t0).Round(time.Millisecond))
	if l.Opt.PodsPerNode == 0 {
		return nil
	}
	t0 = time.Now()
	if err := l.kubeApply(ctx, k8s.WebManifest(l.Opt.PodsPerNode*len(l.Nodes), 0)); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "rollout", "status", "deployment/web", "--timeout=180s"); err != nil {
		return err
	}
	l.logf("Deployment web: %d pods made by the kubelets, Service web (NodePort 30080) (%s)", l.Opt.PodsPerNode*len(l.Nodes), time.Since(t0).Round(time.Millisecond))
	return nil
}

func (l *Lab) kubeApply(ctx context.Context, yaml string) error {
	cmd := l.K8s.KubectlCmd(ctx, "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(yaml)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("kubectl apply: %w: %s", err, out)
	}
	return nil
}

// Kubectl runs kubectl against a Kubernetes lab with the caller's standard streams.
func (l *Lab) Kubectl(ctx context.Context, args ...string) *exec.Cmd {
	return l.K8s.KubectlCmd(ctx, args...)
}

// kubePods lists the Running pods the kubelets made for the lab's Deployment.
func (l *Lab) kubePods(ctx context.Context) ([]*Pod, error) {
	out, err := l.K8s.Kubectl(ctx, "get", "pods", "-l", "app=web", "-o", "json")
	if err != nil {
		return nil, err
	}
	var list struct {
		Items []struct {
			Metadata struct{ Name string }
			Spec     struct{ NodeName string }
			Status   struct {
				Phase  string
				PodIPs []struct{ IP string }
			}
		}
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, fmt.Errorf("kubectl get pods: %w", err)
	}
	var pods []*Pod
	for _, it := range list.Items {
		p := &Pod{Name: it.Metadata.Name, Node: it.Spec.NodeName}
		for _, a := range it.Status.PodIPs {
			switch ip, err := netip.ParseAddr(a.IP); {
			case err != nil:
			case ip.Is4():
				p.IP = ip
			default:
				p.IP6 = ip
			}
		}
		if it.Status.Phase != "Running" || !p.IP.IsValid() && !p.IP6.IsValid() {
			continue
		}
		pods = append(pods, p)
	}
	return pods, nil
}
