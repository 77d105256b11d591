package k8s_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netagent/netagent/test/testbin"
)

// etcdTLS is issue 13's item 5: the cluster moves from kube mode to the etcd-mode overlay
// (manifests/etcd-tls) as its README says: a PKI made with the documented script, a TLS
// etcd that requires client certificates (Debian's, in the first node's namespace), the
// network config put into etcd with `netagent config set`, the Secret, and the overlay
// applied with its endpoint edited in, which rolls the DaemonSet over node by node. The
// agents take their lease from etcd (each keeps its node's subnet: the subnet file is the
// hint) and the pods reach each other.
func (l *lab) etcdTLS(t *testing.T, pods []podInfo) {
	if _, err := os.Stat("/usr/bin/etcd"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("Debian's etcd-server is missing (scripts/deps.sh installs it)")
		}
		t.Skip("no /usr/bin/etcd")
	}
	n1 := l.nodes[0]
	endpoint := "https://" + n1.IP.String() + ":2379"
	pki := filepath.Join(l.dir, "etcd-pki")
	if out, err := exec.Command(filepath.Join(testbin.Root(), "scripts/etcd-tls-example.sh"), pki, n1.IP.String()).CombinedOutput(); err != nil {
		t.Fatalf("scripts/etcd-tls-example.sh: %v: %s", err, out)
	}
	f := func(name string) string { return filepath.Join(pki, name) }
	etcd := exec.Command("nsenter", "--net=/run/netns/"+n1.NS, "/usr/bin/etcd", "--name", "lab", "--data-dir", filepath.Join(l.dir, "etcd-tls-data"),
		"--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
		"--listen-peer-urls", "http://127.0.0.1:2390", "--initial-advertise-peer-urls", "http://127.0.0.1:2390",
		"--initial-cluster", "lab=http://127.0.0.1:2390",
		"--cert-file", f("server.crt"), "--key-file", f("server.key"), "--client-cert-auth", "--trusted-ca-file", f("ca.crt"))
	logf, err := os.Create(filepath.Join(l.dir, "etcd-tls.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	etcd.Stdout, etcd.Stderr = logf, logf
	etcd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := etcd.Start(); err != nil {
		t.Fatal(err)
	}
	// The etcd outlives this subtest: the agents use it until the uninstall.
	l.t.Cleanup(func() { _ = etcd.Process.Kill(); _ = etcd.Wait() })
	tlsFlags := []string{"--etcd-endpoints", endpoint, "--etcd-ca", f("ca.crt"), "--etcd-cert", f("client.crt"), "--etcd-key", f("client.key")}
	// The subnets the controller-manager gave the nodes start at the network's first /24,
	// which subnetMin's default leaves out: the config includes it, so every agent keeps its
	// node's subnet (and the pods their addresses).
	conf := filepath.Join(l.dir, "net-conf-etcd.json")
	if err := os.WriteFile(conf, []byte(`{"network": "10.244.0.0/16", "subnetMin": "10.244.0.0", "backend": {"type": "vxlan"}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	l.eventually("netagent config set into the TLS etcd", 30*time.Second, func() (bool, string) {
		out, err := exec.Command("nsenter", append([]string{"--net=/run/netns/" + n1.NS, l.agentBin, "config", "set", "--file", conf, "--etcd-timeout", "2s"}, tlsFlags...)...).CombinedOutput()
		return err == nil, string(out)
	})

	l.kubectl("-n", "netagent", "create", "secret", "generic", "netagent-etcd-tls",
		"--from-file=ca.crt="+f("ca.crt"), "--from-file=tls.crt="+f("client.crt"), "--from-file=tls.key="+f("client.key"))
	rendered := l.kubectl("kustomize", filepath.Join(testbin.Root(), "manifests/etcd-tls"))
	const placeholder = "https://etcd-0.edit-me.invalid:2379,https://etcd-1.edit-me.invalid:2379,https://etcd-2.edit-me.invalid:2379"
	if !strings.Contains(rendered, placeholder) {
		t.Fatalf("manifests/etcd-tls no longer has the endpoint line the README says to edit")
	}
	applyYAML(t, l, strings.ReplaceAll(rendered, placeholder, endpoint))
	t0 := time.Now()
	l.kubectl("-n", "netagent", "rollout", "status", "daemonset/netagent", "--timeout=300s")
	t.Logf("kube mode -> etcd-tls: rolled out in %s", time.Since(t0).Round(time.Millisecond))

	// Every agent runs on etcd now, on its node's subnet.
	var list struct {
		Items []struct {
			Metadata struct{ Name string }
			Spec     struct {
				NodeName   string
				Containers []struct{ Args []string }
			}
		}
	}
	if err := json.Unmarshal([]byte(l.kubectl("-n", "netagent", "get", "pods", "-l", "app.kubernetes.io/name=netagent", "-o", "json")), &list); err != nil {
		t.Fatal(err)
	}
	for _, it := range list.Items {
		args := strings.Join(it.Spec.Containers[0].Args, " ")
		logs := l.kubectl("-n", "netagent", "logs", it.Metadata.Name)
		cidr := l.nodeCIDR(it.Spec.NodeName)
		if !strings.Contains(args, "--subnet-manager=etcd") || !strings.Contains(args, endpoint) || !strings.Contains(logs, `msg="lease acquired" node=`+it.Spec.NodeName+" subnet="+cidr) {
			t.Errorf("%s on %s: args %q; want an etcd lease on %s:\n%s", it.Metadata.Name, it.Spec.NodeName, args, cidr, logs)
		}
		if strings.Contains(logs, "PRIVATE KEY") {
			t.Errorf("%s logged key material", it.Metadata.Name)
		}
	}
	l.checkMatrix(t, pods)
}
