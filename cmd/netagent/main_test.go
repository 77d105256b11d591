package main

import (
	"strings"
	"testing"
	"time"
)

func TestRunFlagsFromEnvironment(t *testing.T) {
	t.Setenv("NETAGENT_NODE_NAME", "from-env")
	t.Setenv("NETAGENT_LEASE_TTL", "45s")
	t.Setenv("NETAGENT_ETCD_ENDPOINTS", "https://192.0.2.1:2379,https://192.0.2.2:2379")
	fs, f := newRunFlags()
	if err := parse(fs, []string{"--lease-ttl", "20s"}); err != nil {
		t.Fatal(err)
	}
	if f.node != "from-env" || f.leaseTTL != 20*time.Second || !strings.Contains(f.etcd.endpoints, "192.0.2.2") {
		t.Errorf("flags = node %q ttl %s endpoints %q; want the environment's, the command line winning", f.node, f.leaseTTL, f.etcd.endpoints)
	}
	if err := f.validate(); err != nil {
		t.Error(err)
	}
}

func TestRunFlagErrorsNameTheFlag(t *testing.T) {
	for _, c := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"--public-ip", "nope"}, nil, "--public-ip"},
		{[]string{"--lease-ttl", "1s"}, nil, "--lease-ttl"},
		{[]string{"--resync", "10ms"}, nil, "--resync"},
		{nil, map[string]string{"NETAGENT_LEASE_TTL": "soon"}, "NETAGENT_LEASE_TTL"},
	} {
		for k, v := range c.env {
			t.Setenv(k, v)
		}
		fs, f := newRunFlags()
		err := parse(fs, c.args)
		if err == nil {
			err = f.validate()
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v %v: error %v, want one naming %s", c.args, c.env, err, c.want)
		}
	}
}
