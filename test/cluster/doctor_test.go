package cluster_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/lab"
)

// doctor finds what breaks a node, with bridged pods and with routed ones (a routed pod's
// host veth with the wrong MTU instead of the bridge's).
func TestDoctor(t *testing.T) {
	for _, podIface := range []string{"bridge", "routed"} {
		t.Run(podIface, func(t *testing.T) { doctorCase(t, podIface) })
	}
}

func doctorCase(t *testing.T, podIface string) {
	l := newLabWith(t, lab.Options{Backend: "vxlan", Nodes: 2, PodsPerNode: 1, PodInterface: podIface})
	n := l.Nodes[0]
	ns := l.NodeNS(n)
	doctor := func() (string, error) {
		return ns.Run(l.Opt.Netagent, "doctor", "--subnet-file", filepath.Join(n.Dir, "subnet.env"),
			"--cni-conf-dir", filepath.Join(n.Dir, "net.d"), "--cni-bin-dir", l.Opt.CNIBinDir, "--iface", "eth0")
	}
	if out, err := doctor(); err != nil || strings.Contains(out, "PROBLEM") {
		t.Fatalf("doctor on a healthy node: %v\n%s", err, out)
	}
	// Break what doctor looks for (with the agent stopped, or it would repair some of it).
	if err := l.StopAgent(n, false); err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "sysctl", "-qw", "net.ipv4.ip_forward=0")
	ns.MustRun(t, "iptables", "-P", "FORWARD", "DROP")
	ns.MustRun(t, "iptables", "-I", "FORWARD", "1", "-s", "203.0.113.1", "-j", "DROP")
	mtuFinding := []string{"bridge cni0 has MTU 1400, lower than the pod MTU 1450", "fix: ip link set cni0 mtu 1450"}
	if podIface == "bridge" {
		ns.MustRun(t, "ip", "link", "set", "cni0", "mtu", "1400")
	} else {
		ns.MustRun(t, "ip", "link", "set", bridge.HostVethName(n.Pods[0].Name, "eth0"), "mtu", "1400")
		mtuFinding = []string{"1 pods' host veths (on cni0, or routed) have an MTU other than the subnet file's 1450"}
	}
	if err := os.WriteFile(filepath.Join(n.Dir, "net.d", "00-other.conf"), []byte(`{"cniVersion":"1.0.0","name":"x","type":"flannel"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := doctor()
	if err == nil {
		t.Fatalf("doctor found nothing on a broken node:\n%s", out)
	}
	for _, want := range append([]string{"ip_forward is 0", "rule 2 in FORWARD", "does not call netagent-cni", "agent did not answer", "fix: sysctl -w net.ipv4.ip_forward=1"}, mtuFinding...) {
		if !strings.Contains(out, want) {
			t.Errorf("doctor output lacks %q:\n%s", want, out)
		}
	}
}
