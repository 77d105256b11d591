package pki

import (
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"testing"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestIssue: certificates from a CA, and from the same CA loaded again, verify against it
// for their usages only, carry their names, and their keys are private to the owner.
func TestIssue(t *testing.T) {
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	ca, err := New(p("ca.crt"), p("ca.key"), "test CA")
	if err != nil {
		t.Fatal(err)
	}
	again, err := Load(p("ca.crt"), p("ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(readCert(t, p("ca.crt")))
	for _, tt := range []struct {
		name  string
		ca    *CA
		want  Cert
		usage x509.ExtKeyUsage
		not   x509.ExtKeyUsage
	}{
		{"server", ca, Cert{CN: "etcd", IPs: []net.IP{net.ParseIP("192.0.2.1")}, Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		{"client", ca, Cert{CN: "netagent", Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		{"kubelet", again, Cert{CN: "system:node:n4", Orgs: []string{"system:nodes"}, Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.ca.Issue(p(tt.name+".crt"), p(tt.name+".key"), tt.want); err != nil {
				t.Fatal(err)
			}
			c := readCert(t, p(tt.name+".crt"))
			if c.Subject.CommonName != tt.want.CN || len(c.Subject.Organization) != len(tt.want.Orgs) {
				t.Errorf("subject %v, want CN %s O %v", c.Subject, tt.want.CN, tt.want.Orgs)
			}
			if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{tt.usage}}); err != nil {
				t.Errorf("does not verify for its usage: %v", err)
			}
			if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{tt.not}}); err == nil {
				t.Errorf("verifies for a usage it was not issued for")
			}
			if fi, err := os.Stat(p(tt.name + ".key")); err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("key mode %v, %v; want 0600", fi.Mode().Perm(), err)
			}
		})
	}
	if fi, err := os.Stat(p("ca.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("CA key mode %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	if _, err := Load(p("ca.crt"), p("client.crt")); err == nil {
		t.Error("Load took a certificate for a key")
	}
}
