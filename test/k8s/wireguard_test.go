package k8s_test

import (
	"bufio"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/netagent/netagent/pkg/kube"
	"github.com/netagent/netagent/pkg/lab/k8s"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/test/testbin"
)

// TestKubernetesWireGuard: the wireguard overlay (manifests/wireguard) on a real cluster,
// with the pre-shared key from the Secret its comment says to create and the pskFile it
// says to set. The userspace devices run in the DaemonSet's wireguard container; every
// node publishes its public key in its Node, every device has every other node as a peer
// with that key and the pre-shared key, handshakes happen, and pods reach each other.
func TestKubernetesWireGuard(t *testing.T) {
	// Beside the agent, so that scripts/image-rootfs.sh puts it in the image.
	testbin.Build(t, "./cmd/netagent-wireguard", "netagent-wireguard")
	l := newLab(t, 2)
	kz, err := os.ReadFile(filepath.Join(testbin.Root(), "manifests/wireguard/kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	backend := regexp.MustCompile(`"type": "wireguard", "pskFile": "[^"]+"`).Find(kz)
	if backend == nil || !strings.Contains(string(kz), "create secret generic netagent-wireguard-psk --from-literal=psk=") {
		t.Fatal("manifests/wireguard/kustomization.yaml no longer says how to set the pre-shared key")
	}
	psk, err := wgtypes.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	l.kubectl("create", "namespace", "netagent")
	l.kubectl("-n", "netagent", "create", "secret", "generic", "netagent-wireguard-psk", "--from-literal=psk="+psk.String())
	rendered := l.kubectl("kustomize", filepath.Join(testbin.Root(), "manifests/wireguard"))
	if !strings.Contains(rendered, `"type": "wireguard"`) {
		t.Fatal("the overlay's net-conf.json has no wireguard backend")
	}
	start := time.Now()
	applyYAML(t, l, strings.Replace(rendered, `"type": "wireguard"`, string(backend), 1))
	l.waitReady()
	t.Logf("wireguard overlay applied -> every agent ready and every node Ready: %s", time.Since(start).Round(time.Millisecond))

	keys := map[string]string{} // node -> public key (base64), from its Node
	for _, n := range l.nodes {
		out := l.kubectl("get", "node", n.Name, "-o", "jsonpath={.metadata.annotations."+strings.ReplaceAll(kube.AnnWGPublicKey, ".", "\\.")+"}")
		k, err := wgtypes.ParseKey(strings.TrimSpace(out))
		if err != nil {
			t.Fatalf("node %s: %s = %q: %v", n.Name, kube.AnnWGPublicKey, out, err)
		}
		keys[n.Name] = k.String()
	}

	pods := l.startWeb()
	l.checkMatrix(t, pods)

	// Each device, read through its UAPI socket (the node's /var/run/wireguard): every
	// other node a peer with the key its Node publishes, the Secret's pre-shared key, and a
	// handshake (the matrix above sent traffic both ways).
	wantPSK := hex.EncodeToString(psk[:])
	for _, n := range l.nodes {
		peers, err := uapiPeers(filepath.Join(k8s.HostPath(n, "/var/run/wireguard"), plan.DefaultWGDev+".sock"))
		if err != nil {
			t.Errorf("node %s: %v", n.Name, err)
			continue
		}
		for _, o := range l.nodes {
			if o == n {
				continue
			}
			raw, _ := base64.StdEncoding.DecodeString(keys[o.Name])
			p, ok := peers[hex.EncodeToString(raw)]
			switch {
			case !ok:
				t.Errorf("node %s: no peer with %s's key %s (peers %v)", n.Name, o.Name, keys[o.Name], peers)
			case p["preshared_key"] != wantPSK:
				t.Errorf("node %s: peer %s has pre-shared key %q, want the Secret's", n.Name, o.Name, p["preshared_key"])
			case p["last_handshake_time_sec"] == "" || p["last_handshake_time_sec"] == "0":
				t.Errorf("node %s: no handshake with %s: %v", n.Name, o.Name, p)
			}
		}
	}
}

// uapiPeers asks a userspace WireGuard device for its configuration (the cross-platform
// UAPI's get operation) and returns each peer's keys and values by its public key (hex).
func uapiPeers(sock string) (map[string]map[string]string, error) {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("get=1\n\n")); err != nil {
		return nil, err
	}
	peers := map[string]map[string]string{}
	var cur map[string]string
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		switch {
		case sc.Text() == "":
			return peers, nil
		case !ok:
			return nil, fmt.Errorf("%s: line %q", sock, sc.Text())
		case k == "errno" && v != "0":
			return nil, fmt.Errorf("%s: errno %s", sock, v)
		case k == "public_key":
			cur = map[string]string{}
			peers[v] = cur
		case cur != nil:
			cur[k] = v
		}
	}
	return nil, fmt.Errorf("%s: %v before the end of the answer", sock, sc.Err())
}
