//! A set of hosts on one switch, the faults the network can have, and the
//! teardown of it all.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::bins;
use crate::cmd::{output_within, run_ok};
use crate::host::{Host, PEER_PORT};
use crate::netns::{self, IP_TIMEOUT, Netns, PREFIX};
use crate::proxy::{PROXY_PORT, Proxy};

/// Host N (from 0) gets 10.213.0.(N+1)/24, inside its namespace only.
pub const SUBNET: [u8; 3] = [10, 213, 0];
/// The veth interface inside every host namespace.
pub const HOST_IF: &str = "eth0";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Options for [`Cluster::start_with`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Extra marsd arguments for every host (e.g. `["--logfile-size", "4M"]`).
    pub marsd_args: Vec<String>,
    /// Extra marsd arguments for one host only (after `marsd_args`), e.g.
    /// `[("a", ["--log-quota", "8M"])]`.
    pub host_args: Vec<(String, Vec<String>)>,
    /// Every host's state root is a tmpfs of this many MiB (so that a test
    /// can fill it: see [`Host::fill_root`]).
    pub tmpfs_root_mib: Option<u64>,
    /// Every host's peers reach it through a delaying proxy
    /// ([`crate::proxy`]; delay 0 until [`Cluster::set_delay`]).
    pub proxy: bool,
}

pub struct Cluster {
    id: String,
    hosts: Vec<Host>,
    host_ns: Vec<Arc<Netns>>,
    switch: Netns,
    dir: Option<tempfile::TempDir>,
    nft: bool,
    /// One per host (same order) with [`Options::proxy`], else none.
    proxies: Vec<Proxy>,
}

/// Starts a cluster of `hosts` (each running marsd), or prints
/// `skipped: <reason>` and returns `None` when this machine cannot run
/// multi-host tests. Panics if the prerequisites are there but the setup
/// fails.
pub fn start_or_skip(hosts: &[&str]) -> Option<Cluster> {
    start_with_or_skip(hosts, Options::default())
}

pub fn start_with_or_skip(hosts: &[&str], opts: Options) -> Option<Cluster> {
    if let Some(reason) = netns::missing_prerequisite() {
        eprintln!("skipped: {reason}");
        return None;
    }
    if let Err(reason) = bins::bins() {
        eprintln!("skipped: no marsd binaries: {reason}");
        return None;
    }
    Some(
        Cluster::start_with(hosts, opts)
            .unwrap_or_else(|e| panic!("setting up the cluster: {e:#}")),
    )
}

/// Runs a test scenario while the cluster is alive, so that a failure
/// panics with the cluster still there: its Drop then prints the tail of
/// every marsd's stderr and keeps the directory. Prints the duration.
#[track_caller]
pub fn run(c: &mut Cluster, scenario: impl FnOnce(&mut Cluster) -> Result<()>) {
    let started = std::time::Instant::now();
    if let Err(e) = scenario(c) {
        panic!("after {:.1} s: {e:#}", started.elapsed().as_secs_f64());
    }
    eprintln!("scenario took {:.1} s", started.elapsed().as_secs_f64());
}

impl Cluster {
    pub fn start(hosts: &[&str]) -> Result<Cluster> {
        Self::start_with(hosts, Options::default())
    }

    /// Builds the network (switch namespace with a bridge, one namespace
    /// per host with a veth to the bridge) and starts marsd on every host.
    pub fn start_with(hosts: &[&str], opts: Options) -> Result<Cluster> {
        let bins = bins::bins().map_err(|e| anyhow!(e))?;
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(netns::sweep_stale);
        if hosts.len() > 200 {
            bail!("at most 200 hosts");
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}{}-{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        let switch = Netns::create(&format!("{id}-switch"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let mut c = Cluster {
            id: id.clone(),
            hosts: Vec::new(),
            host_ns: Vec::new(),
            switch,
            dir: Some(dir),
            nft: netns::have_nft(),
            proxies: Vec::new(),
        };
        for (i, name) in hosts.iter().enumerate() {
            if name.is_empty()
                || name.len() > 12
                || !name.chars().all(|ch| ch.is_ascii_alphanumeric())
            {
                bail!("host name {name:?}: use 1 to 12 letters or digits");
            }
            let ns = Arc::new(Netns::create(&format!("{id}-{name}"))?);
            c.host_ns.push(Arc::clone(&ns));
            let port = format!("p-{name}");
            c.switch.ip(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                HOST_IF,
                "netns",
                ns.name(),
            ])?;
            c.switch.ip(&["link", "set", &port, "master", "br0"])?;
            c.switch.ip(&["link", "set", &port, "up"])?;
            let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], i as u8 + 1);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", HOST_IF])?;
            ns.ip(&["link", "set", HOST_IF, "up"])?;
            ns.ip(&["link", "set", "lo", "up"])?;
            let hdir = c.dir().join(name);
            let mut extra = opts.marsd_args.clone();
            if opts.proxy {
                c.proxies.push(Proxy::start(&ns, addr, PEER_PORT)?);
                extra.extend(["--advertise".into(), format!("{addr}:{PROXY_PORT}")]);
            }
            for (h, args) in &opts.host_args {
                if h == name {
                    extra.extend(args.iter().cloned());
                }
            }
            let mut h = Host::new(name, ns, addr, hdir, extra, bins)?;
            if let Some(mib) = opts.tmpfs_root_mib {
                h.mount_tmpfs_root(mib)?;
            }
            c.hosts.push(h);
        }
        for h in &mut c.hosts {
            h.spawn()?;
        }
        for h in &mut c.hosts {
            h.wait_ready()?;
        }
        Ok(c)
    }

    /// `mars-e2e-<pid>-<n>`: the prefix of this cluster's namespaces.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cluster's temporary directory (host directories inside).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives as long as the cluster")
            .path()
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name() == name)
            .unwrap_or_else(|| panic!("no host {name} in this cluster"))
    }

    pub fn host_mut(&mut self, name: &str) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.name() == name)
            .unwrap_or_else(|| panic!("no host {name} in this cluster"))
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    // ---- steering marsd --------------------------------------------------

    /// `create-resource NAME PATH --size SIZE` on `host`, PATH being
    /// `NAME.img` in the host's directory.
    pub fn create_resource(&self, host: &str, name: &str, size: &str) -> Result<()> {
        let h = self.host(host);
        let path = h.path(&format!("{name}.img"));
        h.marsadm_ok(&[
            "create-resource",
            name,
            &path.to_string_lossy(),
            "--size",
            size,
        ])?;
        Ok(())
    }

    /// `join-cluster` on `host` through `via`.
    pub fn join_cluster(&self, host: &str, via: &str) -> Result<()> {
        let peer = self.host(via).peer_addr();
        self.host(host).marsadm_ok(&["join-cluster", &peer])?;
        Ok(())
    }

    /// `join-resource NAME PATH` on `host`, PATH being `NAME.img` in its directory.
    pub fn join_resource(&self, host: &str, name: &str) -> Result<()> {
        let h = self.host(host);
        let path = h.path(&format!("{name}.img"));
        h.marsadm_ok(&["join-resource", name, &path.to_string_lossy()])?;
        Ok(())
    }

    /// `marsadm wait NAME --timeout SECS` on `host` (the process itself is
    /// bounded by SECS + 15 s).
    pub fn wait(&self, host: &str, name: &str, secs: u64) -> Result<std::process::Output> {
        self.host(host).marsadm_within(
            &["wait", name, "--timeout", &secs.to_string()],
            Duration::from_secs(secs + 15),
        )
    }

    /// `marsadm wait NAME --timeout SECS` on `host`, which must exit 0.
    pub fn wait_ok(&self, host: &str, name: &str, secs: u64) -> Result<Duration> {
        let t = std::time::Instant::now();
        let out = self.wait(host, name, secs)?;
        if !out.status.success() {
            bail!(
                "marsadm wait {name} --timeout {secs} on {host} failed ({}) after {:.1} s: {}",
                out.status,
                t.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(t.elapsed())
    }

    /// The first `size` bytes of resource `name` as `host`'s NBD export
    /// reads them.
    pub fn device(&self, host: &str, name: &str, size: u64) -> Result<Vec<u8>> {
        let mut n = self.host(host).nbd(name)?;
        let data = crate::workload::read_all(&mut n, 0, size)?;
        n.disconnect().context("NBD disconnect")?;
        Ok(data)
    }

    /// The first `size` bytes of `host`'s backing file of `name` (as made
    /// by [`Cluster::create_resource`] / [`Cluster::join_resource`]).
    pub fn backing(&self, host: &str, name: &str, size: u64) -> Result<Vec<u8>> {
        crate::check::read_file(&self.host(host).path(&format!("{name}.img")), size)
    }

    /// A consistent image of `host`'s replica of `name`: its backing file
    /// read with replay paused (between records, never in the middle).
    pub fn replica_image(&self, host: &str, name: &str, size: u64) -> Result<Vec<u8>> {
        self.host(host).marsadm_ok(&["pause-replay", name])?;
        let image = self.backing(host, name, size);
        self.host(host).marsadm_ok(&["resume-replay", name])?;
        image
    }

    /// Writes `len` bytes of `byte` at the start of each of the first
    /// `chunks` MiB of `name` through `host`'s NBD export, then flushes.
    pub fn fill(&self, host: &str, name: &str, chunks: u64, byte: u8, len: usize) -> Result<()> {
        let mut nbd = self.host(host).nbd(name)?;
        let data = vec![byte; len];
        for chunk in 0..chunks {
            nbd.write(chunk << 20, &data, false)
                .with_context(|| format!("NBD write of chunk {chunk} of {name} on {host}"))?;
        }
        nbd.flush().context("NBD flush")?;
        nbd.disconnect().context("NBD disconnect")
    }

    /// Waits up to `secs` until `host` says its replica of `name` is
    /// UpToDate (and, given `primary`, follows that node).
    pub fn wait_up_to_date(
        &self,
        host: &str,
        name: &str,
        primary: Option<&str>,
        secs: u64,
    ) -> Result<()> {
        let what = match primary {
            Some(p) => format!("{host} UpToDate in {name} following {p}"),
            None => format!("{host} UpToDate in {name}"),
        };
        crate::cmd::wait_for(
            &what,
            Duration::from_secs(secs),
            Duration::from_millis(200),
            || {
                let me = self.host(host).resource(name)?;
                Ok(
                    (me["disk_state"] == "UpToDate" && primary.is_none_or(|p| me["primary"] == p))
                        .then_some(()),
                )
            },
        )
    }

    /// Lines of every marsd's stderr (all runs) containing `needle`,
    /// prefixed with the host name.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.hosts
            .iter()
            .flat_map(|h| {
                h.stderr()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| format!("{}: {l}", h.name()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    // ---- faults ------------------------------------------------------------

    /// Pulls `host`'s cable: its bridge port goes down, its eth0 loses
    /// carrier; nothing reaches it or leaves it.
    pub fn cut(&self, host: &str) -> Result<()> {
        self.host(host); // the name must exist
        self.switch
            .ip(&["link", "set", &format!("p-{host}"), "down"])?;
        Ok(())
    }

    /// Plugs `host`'s cable back in.
    pub fn restore(&self, host: &str) -> Result<()> {
        self.host(host);
        self.switch
            .ip(&["link", "set", &format!("p-{host}"), "up"])?;
        Ok(())
    }

    /// Cuts the path between `x` and `y` only (both keep their links to
    /// everyone else): each gets a blackhole route to the other's address,
    /// so what one sends to the other is dropped (new connections fail at
    /// once, open ones go silent). Needs no nftables.
    pub fn cut_between(&self, x: &str, y: &str) -> Result<()> {
        for (from, to) in [(x, y), (y, x)] {
            let to = format!("{}/32", self.host(to).addr());
            self.host(from)
                .netns()
                .ip(&["route", "replace", "blackhole", &to])?;
        }
        Ok(())
    }

    /// Undoes [`Cluster::cut_between`].
    pub fn restore_between(&self, x: &str, y: &str) -> Result<()> {
        for (from, to) in [(x, y), (y, x)] {
            let to = format!("{}/32", self.host(to).addr());
            self.host(from)
                .netns()
                .ip(&["route", "del", "blackhole", &to])?;
        }
        Ok(())
    }

    /// Whether nftables is available ([`Cluster::loss`] and the drops need it).
    pub fn has_nft(&self) -> bool {
        self.nft
    }

    /// Drops `in_pct` % of the packets `host` receives and `out_pct` % of
    /// those it sends (loopback untouched), replacing earlier filters.
    /// Fails when nft is missing (check [`Cluster::has_nft`]).
    pub fn filter(&self, host: &str, in_pct: u32, out_pct: u32) -> Result<()> {
        if !self.nft {
            bail!("nft is not installed (apt-get install nftables)");
        }
        let rule = |pct: u32| match pct {
            0 => String::new(),
            p if p >= 100 => "drop".to_string(),
            p => format!("numgen random mod 100 < {p} drop"),
        };
        // "add, delete, add": works whether or not the table exists.
        let script = format!(
            "table inet mars\n\
             delete table inet mars\n\
             table inet mars {{\n\
             chain in {{\n\
             type filter hook input priority 0; policy accept;\n\
             iifname \"lo\" accept\n\
             {}\n\
             }}\n\
             chain out {{\n\
             type filter hook output priority 0; policy accept;\n\
             oifname \"lo\" accept\n\
             {}\n\
             }}\n\
             }}\n",
            rule(in_pct),
            rule(out_pct)
        );
        let file = self.dir().join(format!("nft-{host}.conf"));
        std::fs::write(&file, script)?;
        self.host(host)
            .netns()
            .exec("nft", &["-f", &file.to_string_lossy()])?;
        Ok(())
    }

    /// Random loss of `pct` % in both directions.
    pub fn loss(&self, host: &str, pct: u32) -> Result<()> {
        self.filter(host, pct, pct)
    }

    /// Drops everything `host` receives (it still sends).
    pub fn drop_inbound(&self, host: &str) -> Result<()> {
        self.filter(host, 100, 0)
    }

    /// Drops everything `host` sends (it still receives).
    pub fn drop_outbound(&self, host: &str) -> Result<()> {
        self.filter(host, 0, 100)
    }

    /// Removes `host`'s packet filters.
    pub fn clear_filter(&self, host: &str) -> Result<()> {
        if !self.nft {
            return Ok(());
        }
        let ns = self.host(host).netns();
        let _ = output_within(
            ns.command("nft").args(["delete", "table", "inet", "mars"]),
            IP_TIMEOUT,
        );
        Ok(())
    }

    /// Limits `host`'s link to `rate` (tc syntax, e.g. `8mbit`) in both
    /// directions: a token bucket on its eth0 and on its bridge port.
    pub fn rate_limit(&self, host: &str, rate: &str) -> Result<()> {
        let tbf = |ns: &Netns, dev: &str| {
            run_ok(
                ns.command("tc").args([
                    "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kb",
                    "latency", "200ms",
                ]),
                IP_TIMEOUT,
            )
        };
        tbf(self.host(host).netns(), HOST_IF)?;
        tbf(&self.switch, &format!("p-{host}"))?;
        Ok(())
    }

    /// Removes `host`'s rate limit.
    pub fn clear_rate_limit(&self, host: &str) -> Result<()> {
        let del = |ns: &Netns, dev: &str| {
            let _ = output_within(
                ns.command("tc").args(["qdisc", "del", "dev", dev, "root"]),
                IP_TIMEOUT,
            );
        };
        del(self.host(host).netns(), HOST_IF);
        del(&self.switch, &format!("p-{host}"));
        Ok(())
    }

    /// Tears everything down now (also done on drop).
    /// Every chunk `host`'s proxy forwards (both ways, every peer
    /// connection to `host`) waits a random 0..=`ms` ms; 0 ends that.
    pub fn set_delay(&self, host: &str, ms: u64) -> Result<()> {
        self.proxy(host)?.set_delay(ms);
        Ok(())
    }

    /// Chunks `host`'s proxy has delayed so far.
    pub fn delayed(&self, host: &str) -> Result<u64> {
        Ok(self.proxy(host)?.delayed())
    }

    fn proxy(&self, host: &str) -> Result<&Proxy> {
        let i = self
            .hosts
            .iter()
            .position(|h| h.name() == host)
            .ok_or_else(|| anyhow!("no host {host}"))?;
        self.proxies
            .get(i)
            .ok_or_else(|| anyhow!("the cluster runs no proxies (Options::proxy)"))
    }

    pub fn shut_down(&mut self) {
        for h in &mut self.hosts {
            h.shut_down();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        self.shut_down();
        if failed {
            for h in &self.hosts {
                eprintln!(
                    "--- {}: last lines of marsd's stderr ---\n{}",
                    h.name(),
                    h.stderr_tail(40)
                );
            }
        }
        self.hosts.clear();
        self.proxies.clear();
        for ns in self.host_ns.drain(..) {
            match Arc::try_unwrap(ns) {
                Ok(mut ns) => ns.delete(),
                Err(ns) => {
                    // Still shared (cannot happen once the hosts are gone):
                    // delete by name.
                    let _ = run_ok(
                        Command::new("ip").args(["netns", "del", ns.name()]),
                        IP_TIMEOUT,
                    );
                }
            }
        }
        self.switch.delete();
        if let Some(dir) = self.dir.take()
            && (failed || std::env::var_os("MARS_E2E_KEEP").is_some())
        {
            let path = dir.keep();
            eprintln!(
                "kept {} (hosts' roots, volumes, marsd stderr)",
                path.display()
            );
        }
    }
}
