package main

// The Kubernetes manifests (manifests/), checked the way the API server and the binary
// will see them: every object decodes strictly into its k8s.io/api type (unknown,
// duplicate and wrongly cased fields are errors, as with the API server's strict field
// validation), and every container's command line goes through the real flag parser and
// validation of the subcommand it runs, so a misspelled flag fails here and not in a
// CrashLoopBackOff. The invariants of the DaemonSets are checked in code.

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	iofs "io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	sigsjson "sigs.k8s.io/json"
	ktypes "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/yaml"

	"github.com/netagent/netagent/manifests"
	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/subnetfile"
	"github.com/netagent/netagent/pkg/wireguard/device"
)

const (
	manifestsDir = "../../manifests"
	// Where the Dockerfile puts the binaries.
	netagentBin = "/usr/local/bin/netagent"
	cniBinSrc   = "/usr/local/bin/" + cniBinName
)

// decodeStrict decodes every YAML document in b into its Go type: Kubernetes objects
// into their k8s.io/api types, kustomizations into kustomize's. Unknown fields, fields
// in the wrong case, duplicate keys and unknown kinds are errors.
func decodeStrict(b []byte) ([]any, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	var objs []any
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, err
		}
		j, err := yaml.YAMLToJSONStrict(doc)
		if err != nil {
			return nil, err
		}
		if string(bytes.TrimSpace(j)) == "null" { // only comments
			continue
		}
		var tm metav1.TypeMeta
		if err := sigsjson.UnmarshalCaseSensitivePreserveInts(j, &tm); err != nil {
			return nil, err
		}
		var obj any
		if tm.APIVersion == ktypes.KustomizationVersion && tm.Kind == ktypes.KustomizationKind {
			obj = &ktypes.Kustomization{}
		} else if obj, err = scheme.Scheme.New(schema.FromAPIVersionAndKind(tm.APIVersion, tm.Kind)); err != nil {
			return nil, err
		}
		strict, err := sigsjson.UnmarshalStrict(j, obj)
		if err = errors.Join(append(strict, err)...); err != nil {
			return nil, fmt.Errorf("%s %s: %w", tm.APIVersion, tm.Kind, err)
		}
		objs = append(objs, obj)
	}
}

// build is `kustomize build manifests/<overlay>`, decoded strictly.
func build(t *testing.T, overlay string) []any {
	t.Helper()
	b, err := manifests.Build(filepath.Join(manifestsDir, overlay))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := decodeStrict(b)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", overlay, err)
	}
	return objs
}

func ofType[T any](objs []any) []T {
	var out []T
	for _, o := range objs {
		if v, ok := o.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

func daemonSet(t *testing.T, objs []any, name string) *appsv1.DaemonSet {
	t.Helper()
	for _, ds := range ofType[*appsv1.DaemonSet](objs) {
		if ds.Name == name {
			return ds
		}
	}
	t.Fatalf("no DaemonSet %s", name)
	return nil
}

func container(t *testing.T, cs []corev1.Container, name string) corev1.Container {
	t.Helper()
	for _, c := range cs {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %s", name)
	return corev1.Container{}
}

// downwardExamples stand in for the values the kubelet fills in.
var downwardExamples = map[string]string{"spec.nodeName": "node-1", "status.hostIP": "192.0.2.10"}

// parseCommand parses a container's command line, `netagent SUB ARGS`, with SUB's real
// flag set, in the container's environment; every NETAGENT_* variable must name one of
// the flags (parse would silently ignore a misspelled one).
func parseCommand(t *testing.T, c corev1.Container, sub string, fs *flag.FlagSet) error {
	argv := slices.Concat(c.Command, c.Args)
	if len(argv) < 2 || argv[0] != netagentBin || argv[1] != sub {
		return fmt.Errorf("container %s runs %q, want %s %s ...", c.Name, argv, netagentBin, sub)
	}
	for _, e := range c.Env {
		name, ok := strings.CutPrefix(e.Name, "NETAGENT_")
		if !ok {
			continue
		}
		if fs.Lookup(strings.ToLower(strings.ReplaceAll(name, "_", "-"))) == nil {
			return fmt.Errorf("container %s: %s is not a flag of netagent %s", c.Name, e.Name, sub)
		}
		v := e.Value
		if e.ValueFrom != nil {
			if e.ValueFrom.FieldRef == nil || downwardExamples[e.ValueFrom.FieldRef.FieldPath] == "" {
				return fmt.Errorf("container %s: %s: no example value for %+v", c.Name, e.Name, e.ValueFrom)
			}
			v = downwardExamples[e.ValueFrom.FieldRef.FieldPath]
		}
		t.Setenv(e.Name, v)
	}
	fs.SetOutput(io.Discard) // the error says it all; no usage dump in the test log
	return parse(fs, argv[2:])
}

func agentFlags(t *testing.T, c corev1.Container) (*runFlags, error) {
	fs, f := newRunFlags()
	if err := parseCommand(t, c, "run", fs); err != nil {
		return nil, err
	}
	return f, f.validate()
}

// volumeAt is the volume that path (in container c) lies on, and path relative to the
// mount point.
func volumeAt(spec corev1.PodSpec, c corev1.Container, path string) (corev1.Volume, corev1.VolumeMount, string, error) {
	var best corev1.VolumeMount
	for _, m := range c.VolumeMounts {
		if (path == m.MountPath || strings.HasPrefix(path, m.MountPath+"/")) && len(m.MountPath) > len(best.MountPath) {
			best = m
		}
	}
	if best.Name == "" {
		return corev1.Volume{}, best, "", fmt.Errorf("container %s: nothing mounted at %s", c.Name, path)
	}
	for _, v := range spec.Volumes {
		if v.Name == best.Name {
			return v, best, strings.TrimPrefix(strings.TrimPrefix(path, best.MountPath), "/"), nil
		}
	}
	return corev1.Volume{}, best, "", fmt.Errorf("container %s mounts volume %s, which the pod does not have", c.Name, best.Name)
}

// hostPathOf is where path in container c lives on the node.
func hostPathOf(spec corev1.PodSpec, c corev1.Container, path string) (string, error) {
	v, _, rel, err := volumeAt(spec, c, path)
	if err != nil {
		return "", err
	}
	if v.HostPath == nil {
		return "", fmt.Errorf("container %s: %s is on volume %s, not a hostPath", c.Name, path, v.Name)
	}
	return filepath.Join(v.HostPath.Path, rel), nil
}

// wantOnHost checks that each container path is the given node path.
func wantOnHost(t *testing.T, spec corev1.PodSpec, c corev1.Container, paths map[string]string) {
	t.Helper()
	for in, want := range paths {
		if got, err := hostPathOf(spec, c, in); err != nil || got != want {
			t.Errorf("container %s: %s is %q on the node (%v), want %s", c.Name, in, got, err, want)
		}
	}
}

// checkNodeWide: host network, every node, critical priority.
func checkNodeWide(t *testing.T, ds *appsv1.DaemonSet) {
	t.Helper()
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork {
		t.Errorf("%s: hostNetwork is false", ds.Name)
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("%s: priorityClassName %q, want system-node-critical", ds.Name, spec.PriorityClassName)
	}
	for _, effect := range []corev1.TaintEffect{corev1.TaintEffectNoSchedule, corev1.TaintEffectNoExecute} {
		if !slices.ContainsFunc(spec.Tolerations, func(tol corev1.Toleration) bool {
			return tol.Operator == corev1.TolerationOpExists && tol.Key == "" && (tol.Effect == effect || tol.Effect == "")
		}) {
			t.Errorf("%s: no toleration of every %s taint (operator Exists, no key)", ds.Name, effect)
		}
	}
	if g := spec.TerminationGracePeriodSeconds; g == nil || *g > 30 {
		t.Errorf("%s: terminationGracePeriodSeconds %v, want a small one", ds.Name, g)
	}
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		if r := c.Resources; r.Requests.Cpu().IsZero() || r.Requests.Memory().IsZero() || r.Limits.Memory().IsZero() ||
			r.Requests.Memory().Cmp(*r.Limits.Memory()) > 0 {
			t.Errorf("%s: container %s resources %v, want cpu and memory requests and a memory limit above them", ds.Name, c.Name, r)
		}
	}
}

// checkNetCaps: not privileged, exactly NET_ADMIN and NET_RAW added.
func checkNetCaps(t *testing.T, c corev1.Container) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Errorf("container %s: no capabilities", c.Name)
		return
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Errorf("container %s is privileged", c.Name)
	}
	var add []string
	for _, cp := range sc.Capabilities.Add {
		add = append(add, string(cp))
	}
	if slices.Sort(add); !slices.Equal(add, []string{"NET_ADMIN", "NET_RAW"}) {
		t.Errorf("container %s adds capabilities %v, want exactly NET_ADMIN and NET_RAW", c.Name, add)
	}
}

func TestManifestsAgentDaemonSet(t *testing.T) {
	for _, c := range []struct{ overlay, manager string }{{"kube", "kube"}, {"etcd-tls", "etcd"}, {"wireguard", "kube"}} {
		t.Run(c.overlay, func(t *testing.T) {
			objs := build(t, c.overlay)
			ds := daemonSet(t, objs, "netagent")
			spec := ds.Spec.Template.Spec
			checkNodeWide(t, ds)
			if u := ds.Spec.UpdateStrategy; u.Type != appsv1.RollingUpdateDaemonSetStrategyType ||
				u.RollingUpdate == nil || u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.IntValue() != 1 {
				t.Errorf("updateStrategy %+v, want RollingUpdate with maxUnavailable 1", u)
			}

			agent := container(t, spec.Containers, "agent")
			f, err := agentFlags(t, agent)
			if err != nil {
				t.Fatalf("agent command line: %v", err)
			}
			if f.subnetManager != c.manager {
				t.Errorf("--subnet-manager %s, want %s", f.subnetManager, c.manager)
			}
			checkNetCaps(t, agent)

			// Health on loopback, where the probes look for it.
			host, port, err := net.SplitHostPort(f.listen)
			if err != nil || host != "127.0.0.1" {
				t.Errorf("--listen %q, want 127.0.0.1:PORT", f.listen)
			}
			for path, p := range map[string]*corev1.Probe{"/healthz": agent.LivenessProbe, "/readyz": agent.ReadinessProbe} {
				if p == nil || p.HTTPGet == nil {
					t.Errorf("no httpGet probe for %s", path)
				} else if g := p.HTTPGet; g.Host != host || g.Port.String() != port || g.Path != path {
					t.Errorf("probe for %s gets %s:%s%s, want %s:%s%s", path, g.Host, g.Port.String(), g.Path, host, port, path)
				}
			}

			// The conflist the agent writes names the subnet file by its path in the
			// container, and the plugin reads it on the host: the two must be the same.
			wantOnHost(t, spec, agent, map[string]string{
				f.subnetFile:        f.subnetFile,
				f.cniConfDir:        "/etc/cni/net.d",
				"/run/xtables.lock": "/run/xtables.lock",
				"/lib/modules":      "/lib/modules",
				// The agent syncs the pods' anti-spoofing entries from the plugin's stores.
				ipam.DefaultDataDir: ipam.DefaultDataDir,
			})
			if f.subnetFile != subnetfile.DefaultPath {
				t.Errorf("--subnet-file %s, want the plugin's default %s", f.subnetFile, subnetfile.DefaultPath)
			}
			for _, m := range agent.VolumeMounts {
				v, _, _, _ := volumeAt(spec, agent, m.MountPath)
				if m.MountPath == "/lib/modules" && !m.ReadOnly {
					t.Error("/lib/modules is mounted writable")
				}
				if m.MountPath == "/run/xtables.lock" && (v.HostPath == nil || v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathFileOrCreate) {
					t.Errorf("/run/xtables.lock hostPath type %v, want FileOrCreate", v.HostPath.Type)
				}
				if v.HostPath != nil && v.HostPath.Path == "/opt/cni/bin" {
					t.Error("the agent mounts /opt/cni/bin; only the init container needs it")
				}
			}

			// The network config: mounted from the ConfigMap in both modes (kube reads it,
			// etcd mode keeps it as the file for `netagent config set --file`), valid.
			v, m, key, err := volumeAt(spec, agent, f.netConf)
			if err != nil || v.ConfigMap == nil || !m.ReadOnly {
				t.Fatalf("--net-conf %s: volume %+v mount %+v (%v), want a read-only ConfigMap", f.netConf, v, m, err)
			}
			var cm *corev1.ConfigMap
			for _, o := range ofType[*corev1.ConfigMap](objs) {
				if o.Name == v.ConfigMap.Name && o.Namespace == ds.Namespace {
					cm = o
				}
			}
			if cm == nil {
				t.Fatalf("no ConfigMap %s/%s", ds.Namespace, v.ConfigMap.Name)
			}
			if _, err := config.Parse([]byte(cm.Data[key])); err != nil {
				t.Errorf("ConfigMap %s %s: %v", cm.Name, key, err)
			}

			// The init container installs the plugin into the node's /opt/cni/bin.
			if len(spec.InitContainers) != 1 {
				t.Fatalf("%d init containers, want install-cni only", len(spec.InitContainers))
			}
			install := container(t, spec.InitContainers, "install-cni")
			flags, inf := newInstallFlags()
			err = parseCommand(t, install, "install-cni", flags)
			if err == nil {
				err = inf.validate()
			}
			if err != nil {
				t.Fatalf("install-cni command line: %v", err)
			}
			if inf.src != cniBinSrc {
				t.Errorf("install-cni --src %s, want %s (where the image has it)", inf.src, cniBinSrc)
			}
			wantOnHost(t, spec, install, map[string]string{inf.dstDir: "/opt/cni/bin"})
		})
	}
}

func TestManifestsKubeRBAC(t *testing.T) {
	objs := build(t, "kube")
	ds := daemonSet(t, objs, "netagent")
	sa := ds.Spec.Template.Spec.ServiceAccountName
	if a := ds.Spec.Template.Spec.AutomountServiceAccountToken; sa == "" || (a != nil && !*a) {
		t.Errorf("serviceAccountName %q automount %v: the kube agent needs its token", sa, a)
	}
	if !slices.ContainsFunc(ofType[*corev1.ServiceAccount](objs), func(o *corev1.ServiceAccount) bool {
		return o.Name == sa && o.Namespace == ds.Namespace
	}) {
		t.Errorf("no ServiceAccount %s/%s", ds.Namespace, sa)
	}
	roles := ofType[*rbacv1.ClusterRole](objs)
	bindings := ofType[*rbacv1.ClusterRoleBinding](objs)
	if len(roles) != 1 || len(bindings) != 1 || len(ofType[*rbacv1.Role](objs)) != 0 || len(ofType[*rbacv1.RoleBinding](objs)) != 0 {
		t.Fatalf("%d ClusterRoles, %d ClusterRoleBindings (and namespaced ones), want one of each", len(roles), len(bindings))
	}
	want := []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch", "patch"}}}
	if r := roles[0].Rules; len(r) != 1 || !slices.Equal(r[0].APIGroups, want[0].APIGroups) || !slices.Equal(r[0].Resources, want[0].Resources) ||
		!slices.Equal(slices.Sorted(slices.Values(r[0].Verbs)), slices.Sorted(slices.Values(want[0].Verbs))) ||
		len(r[0].ResourceNames) != 0 || len(r[0].NonResourceURLs) != 0 {
		t.Errorf("ClusterRole rules %+v, want exactly %+v", r, want)
	}
	b := bindings[0]
	if b.RoleRef != (rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: roles[0].Name}) ||
		!slices.Equal(b.Subjects, []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: ds.Namespace}}) {
		t.Errorf("ClusterRoleBinding %+v %+v, want ClusterRole %s bound to ServiceAccount %s/%s", b.RoleRef, b.Subjects, roles[0].Name, ds.Namespace, sa)
	}
}

func TestManifestsEtcdTLS(t *testing.T) {
	objs := build(t, "etcd-tls")
	if n := len(ofType[*rbacv1.ClusterRole](objs)) + len(ofType[*rbacv1.ClusterRoleBinding](objs)); n != 0 {
		t.Errorf("%d RBAC objects; the etcd agent does not use the Kubernetes API", n)
	}
	ds := daemonSet(t, objs, "netagent")
	spec := ds.Spec.Template.Spec
	if a := spec.AutomountServiceAccountToken; a == nil || *a {
		t.Errorf("automountServiceAccountToken %v, want false", a)
	}
	agent := container(t, spec.Containers, "agent")
	f, err := agentFlags(t, agent)
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range strings.Split(f.etcd.endpoints, ",") {
		if u, err := url.Parse(ep); err != nil || u.Scheme != "https" {
			t.Errorf("--etcd-endpoints %s: want https:// (the agent refuses plaintext with TLS)", ep)
		}
	}
	for flagName, c := range map[string]struct{ path, key string }{
		"--etcd-ca":   {f.etcd.ca, "ca.crt"},
		"--etcd-cert": {f.etcd.cert, "tls.crt"},
		"--etcd-key":  {f.etcd.key, "tls.key"},
	} {
		v, m, rel, err := volumeAt(spec, agent, c.path)
		if err != nil || v.Secret == nil {
			t.Errorf("%s %s: volume %+v (%v), want the Secret", flagName, c.path, v, err)
			continue
		}
		s := v.Secret
		if s.SecretName != "netagent-etcd-tls" || rel != c.key || len(s.Items) != 0 || !m.ReadOnly ||
			s.DefaultMode == nil || *s.DefaultMode != 0o400 {
			mode := "unset"
			if s.DefaultMode != nil {
				mode = fmt.Sprintf("%#o", *s.DefaultMode)
			}
			t.Errorf("%s %s is key %q of Secret %s (items %v, read-only %v, mode %s), want key %s of netagent-etcd-tls, read-only, 0400",
				flagName, c.path, rel, s.SecretName, s.Items, m.ReadOnly, mode, c.key)
		}
	}
}

func TestManifestsCleanup(t *testing.T) {
	objs := build(t, "cleanup")
	ds := daemonSet(t, objs, "netagent-cleanup")
	spec := ds.Spec.Template.Spec
	checkNodeWide(t, ds)
	if a := spec.AutomountServiceAccountToken; a == nil || *a {
		t.Errorf("automountServiceAccountToken %v, want false", a)
	}
	c := container(t, spec.InitContainers, "cleanup")
	checkNetCaps(t, c)
	flags, f := newCleanupFlags()
	if err := parseCommand(t, c, "cleanup", flags); err != nil {
		t.Fatal(err)
	}
	// What the agent DaemonSet put on the node, at the agent's own paths.
	agentDS := daemonSet(t, build(t, "kube"), "netagent")
	agent := container(t, agentDS.Spec.Template.Spec.Containers, "agent")
	af, err := agentFlags(t, agent)
	if err != nil {
		t.Fatal(err)
	}
	confDir, err := hostPathOf(agentDS.Spec.Template.Spec, agent, af.cniConfDir)
	if err != nil {
		t.Fatal(err)
	}
	wantOnHost(t, spec, c, map[string]string{
		f.cniBin:            "/opt/cni/bin/" + cniBinName,
		f.cniConf:           filepath.Join(confDir, "10-netagent.conflist"),
		f.subnetFile:        af.subnetFile,
		"/run/xtables.lock": "/run/xtables.lock",
	})
}

// TestManifestsWireGuard: the wireguard overlay configures the wireguard backend and runs
// netagent-wireguard in a container of its own (so an agent container restart leaves the
// tunnel up) for the device the agent configures, on the same socket directory; the agent
// adopts it instead of starting one, and its key lives on the node.
func TestManifestsWireGuard(t *testing.T) {
	objs := build(t, "wireguard")
	ds := daemonSet(t, objs, "netagent")
	spec := ds.Spec.Template.Spec
	agent := container(t, spec.Containers, "agent")
	f, err := agentFlags(t, agent)
	if err != nil {
		t.Fatalf("agent command line: %v", err)
	}
	if f.wg.Daemon != device.External || f.wg.Impl != "userspace" {
		t.Errorf("agent --wireguard-daemon %q --wireguard-impl %q, want %s and userspace", f.wg.Daemon, f.wg.Impl, device.External)
	}
	wantOnHost(t, spec, agent, map[string]string{f.wg.StateDir: "/var/lib/netagent", device.SocketDir: device.SocketDir})
	v, _, key, err := volumeAt(spec, agent, f.netConf)
	if err != nil || v.ConfigMap == nil {
		t.Fatalf("--net-conf %s: %+v, %v", f.netConf, v, err)
	}
	for _, cm := range ofType[*corev1.ConfigMap](objs) {
		if cm.Name != v.ConfigMap.Name {
			continue
		}
		if cfg, err := config.Parse([]byte(cm.Data[key])); err != nil || cfg.Backend.Type != config.WireGuard {
			t.Errorf("ConfigMap %s: backend %q (%v), want wireguard", cm.Name, cfg.Backend.Type, err)
		}
	}

	// The pre-shared key the overlay's comment tells how to set: the Secret is mounted,
	// optional (no key unless the operator makes one), read-only, at that path.
	kz, err := os.ReadFile("../../manifests/wireguard/kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`"backend": (\{"type": "wireguard", "pskFile": "([^"]+)"\})`).FindSubmatch(kz)
	if m == nil {
		t.Fatal("manifests/wireguard/kustomization.yaml does not say how to set backend.pskFile")
	}
	if _, err := config.Parse([]byte(`{"network": "10.244.0.0/16", "backend": ` + string(m[1]) + `}`)); err != nil {
		t.Errorf("the documented backend %s: %v", m[1], err)
	}
	switch v, mnt, key, err := volumeAt(spec, agent, string(m[2])); {
	case err != nil:
		t.Errorf("pskFile %s: %v", m[2], err)
	case v.Secret == nil || v.Secret.SecretName != "netagent-wireguard-psk" || v.Secret.Optional == nil || !*v.Secret.Optional || key != "psk" || !mnt.ReadOnly:
		t.Errorf("pskFile %s: volume %+v, mount %+v, key %q; want key psk of the optional Secret netagent-wireguard-psk, read-only", m[2], v, mnt, key)
	case kz != nil && !strings.Contains(string(kz), "create secret generic netagent-wireguard-psk --from-literal=psk="):
		t.Error("the overlay's comment does not create the Secret the DaemonSet mounts")
	}

	wg := container(t, spec.Containers, "wireguard")
	if !slices.Equal(wg.Command, []string{"/usr/local/bin/netagent-wireguard"}) {
		t.Errorf("wireguard container runs %q, want /usr/local/bin/netagent-wireguard (where the image has it)", wg.Command)
	}
	dev := f.wg.Device
	if dev == "" {
		dev = plan.DefaultWGDev
	}
	if !slices.Equal(wg.Args, []string{"--name=" + dev}) {
		t.Errorf("wireguard container args %q, want --name=%s (the agent's device)", wg.Args, dev)
	}
	if sc := wg.SecurityContext; sc == nil || (sc.Privileged != nil && *sc.Privileged) || sc.Capabilities == nil ||
		!slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN"}) {
		t.Errorf("wireguard container security context %+v, want not privileged, NET_ADMIN only", sc)
	}
	wantOnHost(t, spec, wg, map[string]string{device.SocketDir: device.SocketDir, "/dev/net/tun": "/dev/net/tun"})

	// The image has the binary: the Dockerfile builds it next to the agent, where
	// scripts/image-rootfs.sh takes it from.
	df, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(df), "-o /out/netagent-wireguard ./cmd/netagent-wireguard") {
		t.Error("the Dockerfile does not build ./cmd/netagent-wireguard into /out")
	}
}

// TestManifestsOneImage: the agent, its init container and the cleanup run one image (the
// cleanup's idle container runs the pause image every node has: netagent's image has no
// shell or sleep).
func TestManifestsOneImage(t *testing.T) {
	images := map[string][]string{}
	for _, overlay := range []string{"kube", "etcd-tls", "wireguard", "cleanup"} {
		for _, ds := range ofType[*appsv1.DaemonSet](build(t, overlay)) {
			for _, c := range slices.Concat(ds.Spec.Template.Spec.InitContainers, ds.Spec.Template.Spec.Containers) {
				if overlay == "cleanup" && c.Name == "done" && strings.HasPrefix(c.Image, "registry.k8s.io/pause:") {
					continue
				}
				images[c.Image] = append(images[c.Image], overlay+"/"+ds.Name+"/"+c.Name)
			}
		}
	}
	if len(images) != 1 {
		t.Errorf("images %v, want one (set it in manifests/base and manifests/cleanup alike)", images)
	}
	for img := range images {
		if !strings.Contains(img, ":") || strings.HasSuffix(img, ":latest") {
			t.Errorf("image %s, want a fixed tag", img)
		}
	}
}

// TestManifestFilesDecodeStrictly: every file under manifests/ as written (overlay
// patches, kustomizations, the rendered netagent.yaml) decodes strictly, and JSON files
// are valid network configs.
func TestManifestFilesDecodeStrictly(t *testing.T) {
	n := 0
	err := filepath.WalkDir(manifestsDir, func(path string, d iofs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		switch filepath.Ext(path) {
		case ".yaml", ".yml":
			_, err = decodeStrict(b)
		case ".json":
			_, err = config.Parse(b)
		default:
			return nil
		}
		if err != nil {
			t.Errorf("%s: %v", path, err)
		}
		n++
		return nil
	})
	if err != nil || n < 10 {
		t.Fatalf("walked %d files: %v", n, err)
	}
}

// TestManifestDecodingIsStrict: the decoding above really rejects what the API server
// would reject or silently drop.
func TestManifestDecodingIsStrict(t *testing.T) {
	ds, err := os.ReadFile(filepath.Join(manifestsDir, "base/daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := decodeStrict(ds); err != nil {
		t.Fatalf("base/daemonset.yaml: %v", err)
	}
	const field = "      hostNetwork: true\n"
	if !bytes.Contains(ds, []byte(field)) {
		t.Fatalf("base/daemonset.yaml has no %q", field)
	}
	for _, c := range []struct{ name, replace, want string }{
		{"misspelled field", "      hostNetwrok: true\n", `unknown field "spec.template.spec.hostNetwrok"`},
		{"field in the wrong case", "      hostnetwork: true\n", `unknown field "spec.template.spec.hostnetwork"`},
		{"field at the wrong level", "      hostNetwork: true\n      privileged: true\n", `unknown field "spec.template.spec.privileged"`},
		{"duplicate field", "      hostNetwork: true\n      hostNetwork: false\n", "hostNetwork"},
		{"wrong type", "      hostNetwork: yes please\n", "hostNetwork"},
	} {
		_, err := decodeStrict(bytes.Replace(ds, []byte(field), []byte(c.replace), 1))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %s", c.name, err, c.want)
		}
	}
	if _, err := decodeStrict([]byte("apiVersion: apps/v1\nkind: DeamonSet\n")); err == nil {
		t.Error("unknown kind DeamonSet decoded, want an error")
	}
}

// TestManifestFlagTyposFail: the command-line check catches what would crash the pod.
func TestManifestFlagTyposFail(t *testing.T) {
	agent := container(t, daemonSet(t, build(t, "kube"), "netagent").Spec.Template.Spec.Containers, "agent")
	for _, c := range []struct {
		name string
		edit func(c *corev1.Container)
		want string
	}{
		{"misspelled flag", func(c *corev1.Container) { c.Args = append(c.Args, "--subnet-manger=kube") }, "subnet-manger"},
		{"bad value", func(c *corev1.Container) { c.Args = append(c.Args, "--subnet-manager=k8s") }, "--subnet-manager"},
		{"misspelled variable", func(c *corev1.Container) { c.Env = append(c.Env, corev1.EnvVar{Name: "NETAGENT_NODE_NAM", Value: "x"}) }, "NETAGENT_NODE_NAM"},
		{"bad variable value", func(c *corev1.Container) {
			c.Env = append(c.Env, corev1.EnvVar{Name: "NETAGENT_LEASE_TTL", Value: "long"})
		}, "NETAGENT_LEASE_TTL"},
		{"another subcommand", func(c *corev1.Container) { c.Command = []string{netagentBin, "route-mode"} }, "want " + netagentBin + " run"},
	} {
		t.Run(c.name, func(t *testing.T) {
			a := *agent.DeepCopy()
			c.edit(&a)
			if _, err := agentFlags(t, a); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want one containing %s", err, c.want)
			}
		})
	}
}
