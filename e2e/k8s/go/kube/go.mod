// Wrapper module for the pinned Kubernetes release used by the e2e/k8s test cluster.
// Only the require line is maintained here; the replace list for k8s.io/kubernetes'
// staging modules is generated at build time from the release's own go.mod
// (e2e/k8s/lib/build.sh) in a copy of this directory under $MARS_CACHE.
module mars.test/e2e/k8s/kube

go 1.26.0

require k8s.io/kubernetes v1.36.3
