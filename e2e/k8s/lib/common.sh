# Common settings and helpers for the e2e/k8s test cluster (sourced, bash).
K8S_VERSION=v1.36.3                 # the pinned Kubernetes release (kubelet 1.38 drops the cgroup-driver fallback containerd 1.x needs)
K8S_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MARS_CACHE=${MARS_CACHE:-$HOME/.cache/mars}
KC=$MARS_CACHE/k8s                  # this tier's cache: binaries, debs, images, node disks
KBIN=$KC/bin/$K8S_VERSION           # kube multicall binary + symlinks
export GOMODCACHE=${GOMODCACHE:-$MARS_CACHE/go/mod}
export GOCACHE=${GOCACHE:-$MARS_CACHE/go/build}
export GOFLAGS=${GOFLAGS:--buildvcs=false}
T0=${T0:-$(date +%s)}
log() { printf '[k8s %4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { echo "e2e/k8s: error: $*" >&2; exit 1; }
