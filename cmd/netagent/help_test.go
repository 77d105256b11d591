package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestHelp: every command's -h goes to stdout without error (exit status 0), shows only
// that command's flags, and none of the flag package's own usage text.
func TestHelp(t *testing.T) {
	for _, tc := range []struct {
		args      []string
		want, not []string
	}{
		{[]string{"-h"}, []string{"usage: netagent COMMAND", "route-mode", "doctor"}, nil},
		{[]string{"run", "-h"}, []string{"usage: netagent run", "\nNode:\n", "\nCNI files:\n", "  --cni-conf-dir string", "--subnet-manager", "--kubeconfig",
			"same schema as netagent config set --file)", "NETAGENT_<FLAG>"}, nil},
		{[]string{"route-mode", "--help"}, []string{"usage: netagent route-mode", "\nDocker:\n  --write-docker-config FILE", "--docker-network NAME", "--etcd-endpoints", "netagent reserve"},
			[]string{"cni", "CNI", "kube", "subnet-manager", "net-conf"}},
		{[]string{"doctor", "-h"}, []string{"usage: netagent doctor", "--route-mode"}, []string{"--etcd"}},
		{[]string{"config", "-h"}, []string{"usage: netagent config get|set"}, nil},
		{[]string{"config", "set", "-h"}, []string{"--network", "--vni", "--etcd-endpoints"}, nil},
		{[]string{"lab", "-h"}, []string{"usage: netagent lab up|status|check|down"}, nil},
		{[]string{"lab", "up", "-h"}, []string{"--nodes", "--scenario"}, nil},
		{[]string{"status", "-h"}, []string{"usage: netagent status"}, nil},
		{[]string{"leave", "-h"}, []string{"--node-name"}, nil},
		{[]string{"reserve", "-h"}, []string{"--subnet"}, nil},
		{[]string{"cleanup", "-h"}, []string{"usage: netagent cleanup"}, nil},
		{[]string{"install-cni", "-h"}, []string{"usage: netagent install-cni"}, nil},
	} {
		var out bytes.Buffer
		err := dispatch(t.Context(), tc.args, &out)
		if err != nil {
			t.Errorf("%v: %v", tc.args, err)
			continue
		}
		got := out.String()
		for _, w := range tc.want {
			if !strings.Contains(got, w) {
				t.Errorf("%v: help lacks %q:\n%s", tc.args, w, got)
			}
		}
		for _, n := range append(tc.not, "Usage of", "flag: help requested", "-help") {
			if strings.Contains(got, n) {
				t.Errorf("%v: help has %q:\n%s", tc.args, n, got)
			}
		}
	}
}

// TestFlagErrors: a bad flag is an error that says where the flags are listed.
func TestFlagErrors(t *testing.T) {
	var out bytes.Buffer
	err := dispatch(t.Context(), []string{"route-mode", "--cni-conf-dir", "/x"}, &out)
	if err == nil || !strings.Contains(err.Error(), "flag provided but not defined: -cni-conf-dir") || !strings.Contains(err.Error(), "netagent route-mode -h") {
		t.Errorf("route-mode --cni-conf-dir: %v", err)
	}
	if out.Len() != 0 {
		t.Errorf("a flag error wrote to stdout:\n%s", out.String())
	}
}
