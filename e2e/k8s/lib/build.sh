# Builds (once, cached under $KC) what the cluster runs. Sourced after common.sh.

# build_kube: the multicall binary (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubelet, kube-proxy, kubectl) of $K8S_VERSION from the wrapper module in e2e/k8s/go/kube.
build_kube() {
  local src=$K8S_DIR/go/kube stamp want out=$KBIN/kube
  want=$(cat "$src/go.mod" "$src/main.go" "$K8S_DIR/lib/build.sh" | sha256sum | cut -c1-16)
  if [ -x "$out" ] && [ "$(cat "$KBIN/.stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
  command -v go >/dev/null || die "go not found on PATH (Go >= 1.26 is required)"
  local w=$KC/src/kube-$K8S_VERSION
  log "building Kubernetes $K8S_VERSION (multicall binary; cold ≈ tens of minutes, log: $KC/build-kube.log)"
  mkdir -p "$w" "$KBIN"
  cp "$src/go.mod" "$src/main.go" "$w/"
  (
    set -e
    cd "$w"
    # The release's go.mod maps every staging module k8s.io/X to ./staging/src/k8s.io/X;
    # map each to its published v0.MINOR.PATCH instead (the list drifts between releases).
    gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
    [ -f "$gomod" ] || { echo "cannot download k8s.io/kubernetes@$K8S_VERSION"; exit 1; }
    staging_v=v0.${K8S_VERSION#v1.}
    reps=$(sed -n 's#^[[:space:]]*\(replace[[:space:]]\+\)\?\(k8s.io/[^ ]*\) => ./staging/src/.*#\2#p' "$gomod")
    [ -n "$reps" ] || { echo "no staging replaces found in $gomod"; exit 1; }
    args=(); for m in $reps; do args+=("-replace=$m=$m@$staging_v"); done
    go mod edit "${args[@]}"
    echo "generated ${#args[@]} replaces to $staging_v"
    go mod tidy
    date_=$(date -u +%Y-%m-%dT%H:%M:%SZ); major=1; minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
    ld="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
      ld+=" -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.gitTreeState=clean -X $p.buildDate=$date_"
    done
    s=$(date +%s)
    CGO_ENABLED=0 nice -n 10 go build ${KUBE_BUILD_P:+-p $KUBE_BUILD_P} -trimpath -ldflags "$ld" -o "$out.tmp" .
    echo "go build took $(( $(date +%s) - s ))s"
  ) >>"$KC/build-kube.log" 2>&1 || die "Kubernetes build failed (see $KC/build-kube.log)"
  mv "$out.tmp" "$out"
  for n in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do ln -sf kube "$KBIN/$n"; done
  echo "$want" > "$KBIN/.stamp"
  log "Kubernetes $("$KBIN/kubectl" version --client 2>/dev/null | head -1) built"
}
