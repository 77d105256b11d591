package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/netagent/netagent/pkg/lease/etcdstore"
)

// etcdFlags are the flags every etcd-using command shares.
type etcdFlags struct {
	endpoints string
	ca        string
	cert      string
	key       string
	prefix    string
	timeout   time.Duration
}

// etcdFlagNames are the flags register adds, for help groups.
var etcdFlagNames = []string{"etcd-endpoints", "etcd-ca", "etcd-cert", "etcd-key", "etcd-prefix", "etcd-timeout"}

func (e *etcdFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&e.endpoints, "etcd-endpoints", "unix:///run/netagent/etcd/etcd.sock:2379", "comma-separated etcd endpoints (http://, https:// or unix://)")
	fs.StringVar(&e.ca, "etcd-ca", "", "CA bundle to verify etcd's certificate")
	fs.StringVar(&e.cert, "etcd-cert", "", "client certificate for etcd")
	fs.StringVar(&e.key, "etcd-key", "", "client key for etcd")
	fs.StringVar(&e.prefix, "etcd-prefix", "/netagent", "key prefix of netagent's data in etcd")
	fs.DurationVar(&e.timeout, "etcd-timeout", 5*time.Second, "etcd dial timeout")
}

func (e *etcdFlags) client() (*clientv3.Client, error) {
	eps := strings.Split(e.endpoints, ",")
	var tlsCfg *tls.Config
	if e.ca != "" || e.cert != "" || e.key != "" {
		if (e.cert == "") != (e.key == "") {
			return nil, fmt.Errorf("--etcd-cert and --etcd-key go together")
		}
		for _, ep := range eps {
			if u, err := url.Parse(ep); err == nil && (u.Scheme == "http" || u.Scheme == "unix") {
				return nil, fmt.Errorf("--etcd-endpoints %s is plaintext but TLS is configured: use https:// (or unixs://)", ep)
			}
		}
		info := transport.TLSInfo{TrustedCAFile: e.ca, CertFile: e.cert, KeyFile: e.key}
		var err error
		if tlsCfg, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("etcd TLS: %w", err)
		}
	}
	if tlsCfg != nil {
		if err := probeTLS(eps, tlsCfg, e.timeout); err != nil {
			return nil, err
		}
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   eps,
		DialTimeout: e.timeout,
		TLS:         tlsCfg,
		Logger:      zap.NewNop(),
		// Keep the connection checked so a dead member is noticed and another used.
		// (not below 5 s: etcd's default --grpc-keepalive-min-time rejects faster pings).
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
		DialOptions:          etcdstore.DialOptions(e.timeout),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	return cli, nil
}

func (e *etcdFlags) store(cli *clientv3.Client, ttl time.Duration, log *slog.Logger) *etcdstore.Store {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return etcdstore.New(cli, e.prefix, ttl, log)
}

// oneShot is the deadline of the one-shot commands' etcd requests.
const oneShot = 10 * time.Second

// with runs fn against the store with the one-shot deadline.
func (e *etcdFlags) with(ctx context.Context, fn func(context.Context, *etcdstore.Store) error) error {
	cli, err := e.client()
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, oneShot)
	defer cancel()
	return e.explain(ctx, fn(ctx, e.store(cli, time.Minute, nil)))
}

// explain names the endpoints when a one-shot request ran out of time: the client itself
// says only "context deadline exceeded".
func (e *etcdFlags) explain(ctx context.Context, err error) error {
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("etcd at %s did not answer within %s (is it running, and reachable from here? see --etcd-endpoints): %w", e.endpoints, oneShot, err)
	}
	return err
}

// cmdEtcd becomes netagent-etcd (found beside this binary, else on PATH): the etcd
// server lives in its own binary so the agent does not carry it.
func cmdEtcd(ctx context.Context, args []string, stdout io.Writer) error {
	bin, err := etcdBinary()
	if err != nil {
		return err
	}
	return syscall.Exec(bin, append([]string{bin}, args...), os.Environ())
}

func etcdBinary() (string, error) {
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "netagent-etcd")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath("netagent-etcd")
	if err != nil {
		return "", errors.New("netagent-etcd not found beside netagent or on PATH (go build ./cmd/netagent-etcd)")
	}
	return p, nil
}

// probeTLS makes one TLS handshake with each https endpoint that answers, so that a
// certificate problem is reported as what it is; through the gRPC client it would only
// show as a timeout. Endpoints that do not answer are left to the client's retries.
func probeTLS(eps []string, cfg *tls.Config, timeout time.Duration) error {
	for _, ep := range eps {
		u, err := url.Parse(ep)
		if err != nil || u.Scheme != "https" {
			continue
		}
		c := cfg.Clone()
		c.NextProtos = []string{"h2"}
		if c.ServerName == "" {
			c.ServerName = u.Hostname()
		}
		d := &net.Dialer{Timeout: timeout}
		conn, err := tls.DialWithDialer(d, "tcp", u.Host, c)
		if err != nil {
			if isTLSError(err) {
				return fmt.Errorf("etcd %s: TLS handshake failed: %w", ep, err)
			}
			continue
		}
		// TLS 1.3 servers reject a client certificate after the handshake: the alert
		// arrives on the first read. A healthy gRPC server sends its settings at once.
		_ = conn.SetReadDeadline(time.Now().Add(timeout))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
		if err != nil && isTLSError(err) {
			return fmt.Errorf("etcd %s rejected the client certificate: %w", ep, err)
		}
	}
	return nil
}

func isTLSError(err error) bool {
	var alert tls.AlertError
	var unknown x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var invalid x509.CertificateInvalidError
	var verify *tls.CertificateVerificationError
	return errors.As(err, &alert) || errors.As(err, &unknown) || errors.As(err, &hostname) || errors.As(err, &invalid) ||
		errors.As(err, &verify) || strings.Contains(err.Error(), "remote error: tls")
}
