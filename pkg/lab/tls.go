package lab

import (
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/netagent/netagent/pkg/lab/pki"
)

// TLSFiles are the PEM files of a generated etcd PKI.
type TLSFiles struct {
	CA, ServerCert, ServerKey, ClientCert, ClientKey string
}

// GenerateTLS writes a CA, a server certificate for the given IPs and a client
// certificate (all ECDSA P-256, valid one year) into dir; keys are mode 0600.
func GenerateTLS(dir string, serverIPs ...net.IP) (TLSFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return TLSFiles{}, err
	}
	f := TLSFiles{
		CA:         filepath.Join(dir, "ca.pem"),
		ServerCert: filepath.Join(dir, "server.pem"), ServerKey: filepath.Join(dir, "server-key.pem"),
		ClientCert: filepath.Join(dir, "client.pem"), ClientKey: filepath.Join(dir, "client-key.pem"),
	}
	ca, err := pki.New(f.CA, filepath.Join(dir, "ca-key.pem"), "netagent lab CA")
	if err != nil {
		return f, err
	}
	if err := ca.Issue(f.ServerCert, f.ServerKey, pki.Cert{CN: "etcd", Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPs: serverIPs}); err != nil {
		return f, fmt.Errorf("server certificate: %w", err)
	}
	if err := ca.Issue(f.ClientCert, f.ClientKey, pki.Cert{CN: "netagent", Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return f, fmt.Errorf("client certificate: %w", err)
	}
	return f, nil
}
