package main

import (
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/agent"
)

func TestPrintStatusStore(t *testing.T) {
	since := time.Now().Add(-time.Minute)
	tests := []struct {
		name  string
		store *agent.StoreStatus
		want  string // "" : no store line
	}{
		{"no health (kube)", nil, ""},
		{"connected", &agent.StoreStatus{State: "connected", Since: since}, ""},
		{"unreachable", &agent.StoreStatus{State: "unreachable", Since: since, Error: "etcd unreachable: context deadline exceeded"},
			"store unreachable since " + since.UTC().Format(time.RFC3339) + " (1m0s ago): etcd unreachable: context deadline exceeded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b strings.Builder
			if err := printStatus(&b, agent.Status{Node: "n1", Store: tt.store}); err != nil {
				t.Fatal(err)
			}
			got := ""
			for _, line := range strings.Split(b.String(), "\n") {
				if strings.HasPrefix(line, "store ") {
					got = line
				}
			}
			if got != tt.want {
				t.Errorf("printStatus store line = %q, want %q", got, tt.want)
			}
		})
	}
}
