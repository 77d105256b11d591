package cluster_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/netagent/netagent/pkg/lab"
)

// TestEtcdTLS: agents talk to a real etcd (Debian's 3.4) that requires client
// certificates, with the PKI of the documented example (docs/etcd-tls.md, made by
// scripts/etcd-tls-example.sh); plaintext, a missing client certificate and an untrusted
// server are each refused with a message that says so; no key material reaches the logs.
func TestEtcdTLS(t *testing.T) {
	if _, err := os.Stat("/usr/bin/etcd"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("Debian's etcd-server is missing (scripts/deps.sh installs it)")
		}
		t.Skip("no /usr/bin/etcd")
	}
	pki := t.TempDir()
	if out, err := exec.Command("../../scripts/etcd-tls-example.sh", pki, "192.0.2.250").CombinedOutput(); err != nil {
		t.Fatalf("the documented PKI example failed: %v\n%s", err, out)
	}
	for _, key := range []string{"ca.key", "server.key", "client.key"} {
		fi, err := os.Stat(filepath.Join(pki, key))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", key, fi.Mode().Perm())
		}
	}
	files := &lab.TLSFiles{CA: filepath.Join(pki, "ca.crt"), ServerCert: filepath.Join(pki, "server.crt"), ServerKey: filepath.Join(pki, "server.key"),
		ClientCert: filepath.Join(pki, "client.crt"), ClientKey: filepath.Join(pki, "client.key")}
	l := newLabWith(t, lab.Options{Nodes: 2, Backend: "vxlan", PodsPerNode: 1, EtcdBinary: "/usr/bin/etcd", EtcdTLS: true, EtcdTLSFiles: files})
	if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
		t.Errorf("connectivity with a TLS etcd: %v", f)
	}
	tlsFiles := l.EtcdTLS
	other, err := lab.GenerateTLS(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	etcdNS := l.NodeNS(&lab.Node{NS: l.Prefix + "etcd"})
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"plaintext with TLS configured", []string{"--etcd-endpoints", "http://192.0.2.250:2379", "--etcd-ca", tlsFiles.CA, "--etcd-cert", tlsFiles.ClientCert, "--etcd-key", tlsFiles.ClientKey}, "plaintext but TLS is configured"},
		{"no client certificate", []string{"--etcd-endpoints", "https://192.0.2.250:2379", "--etcd-ca", tlsFiles.CA}, "certificate"},
		{"server not trusted", []string{"--etcd-endpoints", "https://192.0.2.250:2379", "--etcd-ca", other.CA, "--etcd-cert", tlsFiles.ClientCert, "--etcd-key", tlsFiles.ClientKey}, "certificate"},
		{"client certificate of another CA", []string{"--etcd-endpoints", "https://192.0.2.250:2379", "--etcd-ca", tlsFiles.CA, "--etcd-cert", other.ClientCert, "--etcd-key", other.ClientKey}, "certificate"},
		{"cert without key", []string{"--etcd-endpoints", "https://192.0.2.250:2379", "--etcd-ca", tlsFiles.CA, "--etcd-cert", tlsFiles.ClientCert}, "go together"},
	} {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{"config", "get", "--etcd-timeout", "2s"}, c.args...)
			out, err := etcdNS.Command(context.Background(), l.Opt.Netagent, args...).CombinedOutput()
			if err == nil || !strings.Contains(string(out), c.want) {
				t.Errorf("netagent %v = %v:\n%s\nwant an error mentioning %q", args, err, out, c.want)
			}
		})
	}
	for _, n := range l.Nodes {
		b, _ := os.ReadFile(filepath.Join(n.Dir, "agent.log"))
		if strings.Contains(string(b), "PRIVATE KEY") || strings.Contains(string(b), "BEGIN") {
			t.Errorf("%s's log contains key material", n.Name)
		}
	}
}
