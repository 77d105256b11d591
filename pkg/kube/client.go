package kube

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// Node is the part of a Kubernetes Node that netagent reads: its name, annotations and
// pod CIDRs. Decoding into this instead of k8s.io/api's Node keeps the agent binary free
// of the generated code and type registrations of the whole core API group (resident
// memory at every start, for types the agent never touches; BENCHMARKS.md, scale); the
// JSON decoder ignores the rest of the object.
type Node struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              NodeSpec `json:"spec,omitempty"`
}

// NodeSpec holds the Node's pod CIDRs (core/v1 NodeSpec's fields of the same names).
type NodeSpec struct {
	PodCIDR  string   `json:"podCIDR,omitempty"`
	PodCIDRs []string `json:"podCIDRs,omitempty"`
}

// NodeList is a list of Nodes.
type NodeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Node `json:"items"`
}

// DeepCopyObject implements runtime.Object.
func (n *Node) DeepCopyObject() runtime.Object { return n.DeepCopy() }

// DeepCopy copies n.
func (n *Node) DeepCopy() *Node {
	if n == nil {
		return nil
	}
	out := &Node{TypeMeta: n.TypeMeta, Spec: NodeSpec{PodCIDR: n.Spec.PodCIDR, PodCIDRs: append([]string(nil), n.Spec.PodCIDRs...)}}
	n.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	return out
}

// DeepCopyObject implements runtime.Object.
func (l *NodeList) DeepCopyObject() runtime.Object {
	out := &NodeList{TypeMeta: l.TypeMeta}
	l.ListMeta.DeepCopyInto(&out.ListMeta)
	for i := range l.Items {
		out.Items = append(out.Items, *l.Items[i].DeepCopy())
	}
	return out
}

// Nodes is the part of the Nodes API the store uses.
type Nodes interface {
	Get(ctx context.Context, name string) (*Node, error)
	List(ctx context.Context, opts metav1.ListOptions) (*NodeList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
	Patch(ctx context.Context, name string, pt types.PatchType, data []byte) (*Node, error)
}

var coreV1 = schema.GroupVersion{Version: "v1"}

// restNodes is Nodes over client-go's REST client with a scheme that knows only Node and
// NodeList (and the meta types every group has), speaking JSON.
type restNodes struct {
	rc    *rest.RESTClient
	codec runtime.ParameterCodec
}

// NewNodes is a Nodes client for cfg.
func NewNodes(cfg *rest.Config) (Nodes, error) {
	scheme := runtime.NewScheme()
	scheme.AddKnownTypes(coreV1, &Node{}, &NodeList{})
	metav1.AddToGroupVersion(scheme, coreV1)
	c := rest.CopyConfig(cfg)
	c.APIPath = "/api"
	c.GroupVersion = &coreV1
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	c.ContentType = runtime.ContentTypeJSON
	c.AcceptContentTypes = runtime.ContentTypeJSON
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return &restNodes{rc: rc, codec: runtime.NewParameterCodec(scheme)}, nil
}

func (r *restNodes) Get(ctx context.Context, name string) (*Node, error) {
	n := &Node{}
	err := r.rc.Get().Resource("nodes").Name(name).Do(ctx).Into(n)
	return n, err
}

func (r *restNodes) List(ctx context.Context, opts metav1.ListOptions) (*NodeList, error) {
	l := &NodeList{}
	err := r.rc.Get().Resource("nodes").VersionedParams(&opts, r.codec).Do(ctx).Into(l)
	return l, err
}

func (r *restNodes) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	req := r.rc.Get().Resource("nodes").VersionedParams(&opts, r.codec)
	if opts.TimeoutSeconds != nil {
		req = req.Timeout(time.Duration(*opts.TimeoutSeconds) * time.Second)
	}
	return req.Watch(ctx)
}

func (r *restNodes) Patch(ctx context.Context, name string, pt types.PatchType, data []byte) (*Node, error) {
	n := &Node{}
	err := r.rc.Patch(pt).Resource("nodes").Name(name).Body(data).Do(ctx).Into(n)
	return n, err
}
