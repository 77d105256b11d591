// Package pki issues the lab's certificates: one CA per use (etcd's, the Kubernetes
// cluster's), ECDSA P-256 keys, certificates valid a year, keys written mode 0600.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"time"
)

// CA is a certificate authority whose certificate and key are files.
type CA struct {
	CertPath string
	cert     *x509.Certificate
	key      *ecdsa.PrivateKey
}

// New makes a CA named cn and writes its certificate to certPath and its key to keyPath.
func New(certPath, keyPath, cn string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	if err := WritePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return nil, err
	}
	if err := writeKey(keyPath, key); err != nil {
		return nil, err
	}
	return &CA{CertPath: certPath, cert: cert, key: key}, nil
}

// Load reads a CA New wrote (to issue certificates for a node that joins later).
func Load(certPath, keyPath string) (*CA, error) {
	c := &CA{CertPath: certPath}
	for _, f := range []struct {
		path string
		do   func([]byte) error
	}{
		{certPath, func(der []byte) (err error) { c.cert, err = x509.ParseCertificate(der); return err }},
		{keyPath, func(der []byte) (err error) { c.key, err = x509.ParseECPrivateKey(der); return err }},
	} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			return nil, err
		}
		block, _ := pem.Decode(b)
		if block == nil {
			return nil, fmt.Errorf("%s: no PEM block", f.path)
		}
		if err := f.do(block.Bytes); err != nil {
			return nil, fmt.Errorf("%s: %w", f.path, err)
		}
	}
	return c, nil
}

// Cert is what a certificate names and may be used for.
type Cert struct {
	CN     string
	Orgs   []string
	Usages []x509.ExtKeyUsage
	IPs    []net.IP
	DNS    []string
}

// Issue writes a certificate for want to certPath and its key to keyPath.
func (c *CA) Issue(certPath, keyPath string, want Cert) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	// Random serials: a CA loaded again later must not repeat one.
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: want.CN, Organization: want.Orgs},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(365 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: want.Usages,
		IPAddresses: want.IPs, DNSNames: want.DNS,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		return fmt.Errorf("certificate %s: %w", want.CN, err)
	}
	if err := WritePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	return writeKey(keyPath, key)
}

// NewKey writes a fresh private key to keyPath and its public key to pubPath (a
// service-account signing key).
func NewKey(keyPath, pubPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	if err := writeKey(keyPath, key); err != nil {
		return err
	}
	return WritePEM(pubPath, "PUBLIC KEY", pub, 0o644)
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return WritePEM(path, "EC PRIVATE KEY", kb, 0o600)
}

// WritePEM writes der as one PEM block of type typ.
func WritePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

// Kubeconfig writes a kubeconfig to path for user, who authenticates to server with the
// client certificate cert and key, trusting ca.
func Kubeconfig(path, server, ca, user, cert, key string) error {
	data := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: %s
  user:
    client-certificate: %s
    client-key: %s
contexts:
- name: lab
  context:
    cluster: lab
    user: %s
current-context: lab
`, server, ca, user, cert, key, user)
	return os.WriteFile(path, []byte(data), 0o600)
}
