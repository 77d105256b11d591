package main

import (
	"fmt"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/netagent/netagent/pkg/kube"
)

// kubeNodes is a core/v1 client: from kubeconfig, or the pod's service account when empty.
func kubeNodes(kubeconfig, node string) (kube.Nodes, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("--subnet-manager=kube without --kubeconfig needs to run in a pod with a service account: %w", err)
		}
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig %s: %w", kubeconfig, err)
		}
	}
	cfg.UserAgent = "netagent/" + node
	return kube.NewNodes(cfg)
}
