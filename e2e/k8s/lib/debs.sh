# Debian pieces of the cluster: a private apt state per suite (the system's apt sources are
# never changed; only `apt-get download` + `dpkg-deb -x`), and the node root filesystem made
# with debootstrap. Sourced after common.sh.

debian_mirror() {
  { grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' || true
    grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk '{for(i=2;i<=NF;i++) if ($i ~ /^[a-z+]+:\/\//) {print $i; break}}' || true; } |
    grep -v -- '-security' | head -1
}

# papt SUITE apt-get|apt-cache ARGS...
papt() {
  local suite=$1 tool=$2 A="$KC/apt/$1" mirror; shift 2
  mirror=$(debian_mirror); [ -n "$mirror" ] || die "no Debian mirror configured in /etc/apt"
  mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/parts"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >"$A/sources.list"
  local o=(-o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/parts"
           -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o Dir::State::status=/dev/null
           -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts="$A/parts"
           -o APT::Sandbox::User=root)
  if [ -z "$(find "$A/lists" -name '*_Packages*' 2>/dev/null)" ]; then
    log "apt update ($suite, private state in $A)"
    apt-get "${o[@]}" update -qq >/dev/null || die "apt update for $suite"
  fi
  "$tool" "${o[@]}" "$@"
}

# fetch_deb SUITE PKG -> path of the cached .deb
fetch_deb() {
  local suite=$1 name=$2 f
  mkdir -p "$KC/debs/$suite"
  f=$(ls "$KC/debs/$suite/${name}_"*.deb 2>/dev/null | head -1 || true)
  if [ -z "$f" ]; then
    (cd "$KC/debs/$suite" && papt "$suite" apt-get download -qq "$name" >/dev/null 2>&1) || die "download $name ($suite)"
    f=$(ls "$KC/debs/$suite/${name}_"*.deb | head -1)
  fi
  echo "$f"
}

need_host_pkgs() {  # need_host_pkgs PKG... : apt-get install what is missing on the host
  local miss=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || miss+=("$p"); done
  ((${#miss[@]})) || return 0
  command -v apt-get >/dev/null || die "missing host packages: ${miss[*]} (and no apt-get)"
  log "apt-get install ${miss[*]}"
  { apt-get install -y -qq --no-install-recommends "${miss[@]}" ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${miss[@]}"; }; } >"$KC/apt-host.log" 2>&1 ||
    die "apt-get install ${miss[*]} failed (see $KC/apt-host.log)"
}

# etcd: Debian trixie's etcd-server (>= 3.5.11 as Kubernetes >= 1.31 needs), extracted.
ensure_etcd() {
  [ -x "$KC/etcd/usr/bin/etcd" ] && return 0
  local d; d=$(fetch_deb trixie etcd-server)
  rm -rf "$KC/etcd.tmp"; mkdir -p "$KC/etcd.tmp"; dpkg-deb -x "$d" "$KC/etcd.tmp"
  rm -rf "$KC/etcd"; mv "$KC/etcd.tmp" "$KC/etcd"
  log "etcd $("$KC/etcd/usr/bin/etcd" --version | head -1)"
}

# The node root filesystem: Debian bookworm (same glibc as the host) minbase + what a
# kubelet node needs (iptables for kube-proxy, kmod, runc, CNI plugins, util-linux mount,
# e2fsprogs), trixie's containerd 1.7 on top, and the guest kernel's module tree.
NODE_PKGS=wget,iptables,kmod,runc,containernetworking-plugins,iproute2,e2fsprogs,conntrack,procps,ethtool,util-linux,mount,ca-certificates
ensure_rootfs() {
  local R=$KC/rootfs want
  want=$(printf '%s|%s|%s' "$NODE_PKGS" "$MARS_VM_KVER" 3 | sha256sum | cut -c1-16)
  [ "$(cat "$R.stamp" 2>/dev/null)" = "$want" ] && [ -x "$R/usr/bin/containerd" ] && return 0
  need_host_pkgs debootstrap
  log "debootstrap node root filesystem (bookworm minbase; once, ≈ minutes; log $KC/debootstrap.log)"
  rm -rf "$R.tmp"; mkdir -p "$R.tmp"
  debootstrap --variant=minbase --include="$NODE_PKGS" bookworm "$R.tmp" "$(debian_mirror)" >"$KC/debootstrap.log" 2>&1 ||
    die "debootstrap failed (see $KC/debootstrap.log)"
  dpkg-deb -x "$(fetch_deb trixie containerd)" "$R.tmp"
  mkdir -p "$R.tmp/lib/modules"
  cp -a "$MARS_VM_MODULES" "$R.tmp/lib/modules/$MARS_VM_KVER"
  chroot "$R.tmp" depmod "$MARS_VM_KVER" || die "depmod in the node rootfs"
  # iptables-nft is Debian's default alternative; make sure the plain names point at it
  for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    [ -e "$R.tmp/usr/sbin/$t" ] || ln -sf xtables-nft-multi "$R.tmp/usr/sbin/$t"
  done
  rm -rf "$R.tmp/var/cache/apt/archives/"*.deb "$R.tmp/var/lib/apt/lists/"* 
  rm -rf "$R"; mv "$R.tmp" "$R"; echo "$want" >"$R.stamp"
  log "node rootfs ready ($(du -sh "$R" | cut -f1))"
}
