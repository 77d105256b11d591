package k8s

import (
	"crypto/x509"
	"net"
	"os"
	"path/filepath"

	labpki "github.com/netagent/netagent/pkg/lab/pki"
)

// pki lays the cluster's certificates out as kubeadm does, in one folder: a serving
// certificate for the API server, client certificates whose CN/O are the Kubernetes user
// and groups (system:node:NAME in system:nodes for a kubelet), and the service-account
// signing key.
type pki struct {
	dir string
	ca  *labpki.CA
}

func newPKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{dir: dir}
	// The key is kept: the controller-manager signs with the CA (kubelet serving
	// certificates, CSRs), and a node that joins later gets its certificate from it.
	ca, err := labpki.New(p.path("ca.crt"), p.path("ca.key"), "netagent lab kubernetes CA")
	p.ca = ca
	return p, err
}

// loadPKI reads the CA newPKI wrote (to issue certificates for a node that joins later).
func loadPKI(dir string) (*pki, error) {
	p := &pki{dir: dir}
	ca, err := labpki.Load(p.path("ca.crt"), p.path("ca.key"))
	p.ca = ca
	return p, err
}

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

// issue writes NAME.crt and NAME.key.
func (p *pki) issue(name, cn string, orgs []string, ips []net.IP, dns []string) error {
	return p.ca.Issue(p.path(name+".crt"), p.path(name+".key"), labpki.Cert{
		CN: cn, Orgs: orgs, IPs: ips, DNS: dns,
		Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	})
}

// serviceAccountKey writes sa.key and sa.pub.
func (p *pki) serviceAccountKey() error {
	return labpki.NewKey(p.path("sa.key"), p.path("sa.pub"))
}

// kubeconfig writes NAME.kubeconfig for the client certificate NAME.
func (p *pki) kubeconfig(name, server string) (string, error) {
	path := p.path(name + ".kubeconfig")
	return path, labpki.Kubeconfig(path, server, p.path("ca.crt"), name, p.path(name+".crt"), p.path(name+".key"))
}
