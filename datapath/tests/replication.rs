//! Replication between real marsd processes on loopback: join, planned
//! handover, forced failover with split brain and its resolution. (The
//! network-namespace tier with cut links and loss lives in `e2e/`.)

mod support;

use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::nbd_client;

const MIB: u64 = 1 << 20;

fn block(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i / 4096) as u8).collect()
}

fn write(d: &Daemon, offset: u64, tag: u8, len: usize) {
    let mut c = nbd_client::connect(d.nbd_addr(), "r1").unwrap();
    c.write(offset, &block(tag, len), false).unwrap();
    c.flush().unwrap();
    c.disconnect().unwrap();
}

/// Reads in pieces of at most 16 MiB (NBD requests are limited to 32 MiB).
fn read(d: &Daemon, offset: u64, len: u32) -> Vec<u8> {
    let mut c = nbd_client::connect(d.nbd_addr(), "r1").unwrap();
    let mut data = Vec::with_capacity(len as usize);
    let mut done = 0u32;
    while done < len {
        let n = (len - done).min(16 << 20);
        data.extend_from_slice(&c.read(offset + done as u64, n).unwrap());
        done += n;
    }
    c.disconnect().unwrap();
    data
}

/// Three nodes a, b, c with r1 (8 MiB... 32 MiB) created on a and joined by b and c.
fn cluster() -> (Daemon, Daemon, Daemon) {
    let a = Daemon::start_named("a", &["--startup-wait", "3"]);
    let b = Daemon::start_named("b", &["--startup-wait", "3"]);
    let c = Daemon::start_named("c", &["--startup-wait", "3"]);
    a.marsadm_ok(&[
        "create-resource",
        "r1",
        a.path("r1.img").to_str().unwrap(),
        "--size",
        "32M",
    ]);
    write(&a, 0, 0xa1, 4 * MIB as usize);
    let peer = a.listen_addr().to_string();
    for d in [&b, &c] {
        d.marsadm_ok(&["join-cluster", &peer]);
        d.marsadm_ok(&["join-resource", "r1", d.path("r1.img").to_str().unwrap()]);
    }
    wait(&a);
    (a, b, c)
}

fn wait(d: &Daemon) {
    let out = d.marsadm(&["wait", "r1", "--timeout", "60"]);
    assert!(
        out.status.success(),
        "wait: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
}

fn replica<'a>(view: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    view["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == node)
        .unwrap_or_else(|| panic!("no replica {node} in {view:#}"))
}

fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each replica's raw backing file equals what the primary's device reads
/// (its first `mib` MiB).
fn assert_images_follow(primary: &Daemon, mib: u64, replicas: &[&Daemon]) {
    let device = read(primary, 0, (mib * MIB) as u32);
    for d in replicas {
        let image = std::fs::read(d.path("r1.img")).unwrap();
        assert!(
            image == device,
            "{}'s backing file differs from the device of the primary {}",
            d.node(),
            primary.node()
        );
    }
}

#[test]
fn joined_replicas_become_identical_and_report_positions() {
    let (a, b, c) = cluster();
    write(&a, 8 * MIB, 0xb2, MIB as usize);
    wait(&a);
    let v = a.resource_view("r1");
    let appended = v["log"]["appended"].as_u64().unwrap();
    for n in ["a", "b", "c"] {
        let r = replica(&v, n);
        assert_eq!(r["disk_state"], "UpToDate", "{v:#}");
        assert_eq!(r["connected"], true, "{v:#}");
        assert!(r["applied"].as_u64().unwrap() >= appended, "{v:#}");
    }
    // A resize on the primary grows every replica.
    a.marsadm_ok(&["resize", "r1", "48M"]);
    write(&a, 40 * MIB, 0xe5, MIB as usize);
    wait(&a);
    until("b to record the new size", 10, || {
        b.resource_view("r1")["size"] == 48 * MIB
    });
    assert_eq!(std::fs::metadata(b.path("r1.img")).unwrap().len(), 48 * MIB);
    assert_images_follow(&a, 48, &[&b, &c]);
}

#[test]
fn planned_handover_moves_the_primary_without_losing_a_write() {
    let (a, b, _c) = cluster();
    write(&a, 6 * MIB, 0xc3, MIB as usize);
    // A client still attached to the old primary gets an error after the handover.
    let mut stale = nbd_client::connect(a.nbd_addr(), "r1").unwrap();
    let out = b.marsadm_ok(&["primary", "r1"]);
    assert!(out.contains("handed over from a"), "{out}");
    assert!(
        stale.write(0, &block(0xff, 4096), false).is_err(),
        "the old primary must refuse writes"
    );
    assert_eq!(
        read(&b, 6 * MIB, MIB as u32),
        block(0xc3, MIB as usize),
        "a completed write was lost"
    );
    assert_eq!(read(&b, 0, 4 * MIB as u32), block(0xa1, 4 * MIB as usize));
    write(&b, 12 * MIB, 0xd4, MIB as usize);
    wait(&b);
    let v = a.resource_view("r1");
    assert_eq!(v["role"], "secondary");
    assert_eq!(v["primary"], "b");
    // The old primary follows the new one.
    assert_images_follow(&b, 32, &[&a]);
}

#[test]
fn forced_failover_reports_split_brain_and_invalidate_resolves_it() {
    let (mut a, b, c) = cluster();
    b.marsadm_ok(&["pause-fetch", "r1"]);
    c.marsadm_ok(&["pause-fetch", "r1"]);
    // Written on a only: its divergent tail.
    write(&a, 10 * MIB, 0xdd, 2 * MIB as usize);
    a.kill9();
    // Without --force the unreachable primary blocks a takeover, with a hint.
    until("a to be seen as down", 10, || {
        let out = c.marsadm(&["primary", "r1"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success());
        err.contains("--force")
    });
    c.marsadm_ok(&["resume-fetch", "r1"]);
    let out = c.marsadm_ok(&["primary", "r1", "--force"]);
    assert!(out.contains("by force"), "{out}");
    b.marsadm_ok(&["resume-fetch", "r1"]);
    write(&c, 20 * MIB, 0x33, MIB as usize);
    a.restart();
    until("split brain on a", 20, || {
        a.resource_view("r1")["split_brain"] == true
    });
    let va = a.resource_view("r1");
    assert_eq!(
        va["role"], "secondary",
        "the deposed primary stops taking writes: {va:#}"
    );
    assert!(
        nbd_client::connect(a.nbd_addr(), "r1").is_err(),
        "the deposed primary exports nothing"
    );
    until("c to see a's split brain", 10, || {
        replica(&c.resource_view("r1"), "a")["split_brain"] == true
    });
    let divergent = replica(&c.resource_view("r1"), "a")["divergent_bytes"]
        .as_u64()
        .unwrap();
    assert!(divergent >= 2 * MIB, "divergent tail {divergent}");
    // Nothing of a's divergent writes is on the new primary.
    assert_eq!(
        read(&c, 10 * MIB, 2 * MIB as u32),
        vec![0u8; 2 * MIB as usize]
    );
    a.marsadm_ok(&["invalidate", "r1"]);
    wait(&c);
    let va = a.resource_view("r1");
    assert_eq!(va["split_brain"], false);
    assert_eq!(va["disk_state"], "UpToDate");
    assert_images_follow(&c, 32, &[&a, &b]);
}

#[test]
fn emergency_mode_keeps_the_primary_writing_and_resyncs_the_laggard() {
    let a = Daemon::start_named(
        "a",
        &[
            "--log-quota",
            "4M",
            "--logfile-size",
            "1M",
            "--startup-wait",
            "3",
        ],
    );
    let b = Daemon::start_named("b", &["--startup-wait", "3"]);
    a.marsadm_ok(&[
        "create-resource",
        "r1",
        a.path("r1.img").to_str().unwrap(),
        "--size",
        "32M",
    ]);
    write(&a, 0, 0xa1, 2 * MIB as usize);
    b.marsadm_ok(&["join-cluster", &a.listen_addr().to_string()]);
    b.marsadm_ok(&["join-resource", "r1", b.path("r1.img").to_str().unwrap()]);
    wait(&a);
    b.marsadm_ok(&["pause-fetch", "r1"]);
    // 14 MiB through a 4 MiB log quota while b holds its logfiles: the
    // primary must keep serving writes (bounded in time).
    let started = Instant::now();
    for i in 0..14u64 {
        write(&a, (2 + i) * MIB, 0x40 + i as u8, MIB as usize);
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "writes stalled for {:?}",
        started.elapsed()
    );
    let v = a.resource_view("r1");
    assert_eq!(v["emergency"], true, "{v:#}");
    assert_eq!(replica(&v, "b")["disk_state"], "Outdated", "{v:#}");
    b.marsadm_ok(&["resume-fetch", "r1"]);
    wait(&a);
    assert_eq!(
        replica(&a.resource_view("r1"), "b")["disk_state"],
        "UpToDate"
    );
    // b is identical again after its resync.
    assert_images_follow(&a, 32, &[&b]);
}

/// A resource that never logged a write can be handed over and back: the
/// old primary follows the new one (it got stuck on "record 0 where 1 was
/// due" once).
#[test]
fn handover_of_a_resource_that_never_logged_a_write() {
    let a = Daemon::start_named("a", &["--startup-wait", "3"]);
    let b = Daemon::start_named("b", &["--startup-wait", "3"]);
    a.marsadm_ok(&[
        "create-resource",
        "r1",
        a.path("r1.img").to_str().unwrap(),
        "--size",
        "8M",
    ]);
    b.marsadm_ok(&["join-cluster", &a.listen_addr().to_string()]);
    b.marsadm_ok(&["join-resource", "r1", b.path("r1.img").to_str().unwrap()]);
    wait(&a);
    let out = b.marsadm_ok(&["primary", "r1"]);
    assert!(out.contains("handed over from a"), "{out}");
    write(&b, MIB, 0x5a, MIB as usize);
    wait(&b);
    let v = a.resource_view("r1");
    assert_eq!(v["role"], "secondary", "{v:#}");
    assert_eq!(v["error"], serde_json::Value::Null, "{v:#}");
    assert_images_follow(&b, 8, &[&a]);
    // And back again.
    let out = a.marsadm_ok(&["primary", "r1"]);
    assert!(out.contains("handed over from b"), "{out}");
    write(&a, 2 * MIB, 0x6b, MIB as usize);
    wait(&a);
    assert_images_follow(&a, 8, &[&b]);
    // A replica that joins an idle resource sees no record before it
    // becomes primary: its log must still continue the history's numbering.
    let c = Daemon::start_named("c", &["--startup-wait", "3"]);
    c.marsadm_ok(&["join-cluster", &a.listen_addr().to_string()]);
    c.marsadm_ok(&["join-resource", "r1", c.path("r1.img").to_str().unwrap()]);
    wait(&a);
    let out = c.marsadm_ok(&["primary", "r1"]);
    assert!(out.contains("handed over from a"), "{out}");
    write(&c, 3 * MIB, 0x7c, MIB as usize);
    wait(&c);
    for d in [&a, &b] {
        let v = d.resource_view("r1");
        assert_eq!(v["error"], serde_json::Value::Null, "{v:#}");
    }
    assert_images_follow(&c, 8, &[&a, &b]);
}

/// A primary restored from an old copy of its state goes on in the same
/// generation, with other writes at the log positions of the ones it lost.
/// A replica that fetched the lost writes must not continue its copy with
/// the new ones: the source compares the record before the fetcher's
/// resume point with the fetcher's, refuses, and the replica is Outdated
/// until `invalidate`.
#[test]
fn a_replica_never_continues_its_log_with_another_history() {
    let mut a = Daemon::start_named("a", &["--startup-wait", "1"]);
    let b = Daemon::start_named("b", &["--startup-wait", "1"]);
    let image = a.path("r1.img");
    a.marsadm_ok(&[
        "create-resource",
        "r1",
        image.to_str().unwrap(),
        "--size",
        "32M",
    ]);
    write(&a, 0, 0xa1, MIB as usize);
    b.marsadm_ok(&["join-cluster", &a.listen_addr().to_string()]);
    b.marsadm_ok(&["join-resource", "r1", b.path("r1.img").to_str().unwrap()]);
    wait(&a);
    // The old copy of a's state: its root and its backing file.
    a.term();
    let backup = tempfile::tempdir().unwrap();
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let ok = std::process::Command::new("cp")
            .args(["-a", "-T"])
            .args([from, to])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cp -a {} {}", from.display(), to.display());
    };
    copy(a.root(), &backup.path().join("root"));
    copy(&image, &backup.path().join("r1.img"));
    a.restart();
    write(&a, 4 * MIB, 0xb2, MIB as usize);
    wait(&a);
    a.term();
    std::fs::remove_dir_all(a.root()).unwrap();
    copy(&backup.path().join("root"), a.root());
    copy(&backup.path().join("r1.img"), &image);
    a.restart();
    // The same sizes: these take the lost write's log positions and go on.
    write(&a, 8 * MIB, 0xc3, MIB as usize);
    write(&a, 12 * MIB, 0xd4, MIB as usize);
    until("b to refuse a's log", 30, || {
        b.resource_view("r1")["error"]
            .as_str()
            .is_some_and(|e| e.contains("diverged"))
    });
    let vb = b.resource_view("r1");
    assert_eq!(vb["disk_state"], "Outdated", "{vb:#}");
    let b_image = std::fs::read(b.path("r1.img")).unwrap();
    assert!(
        b_image[12 * MIB as usize..13 * MIB as usize]
            .iter()
            .all(|&x| x == 0),
        "b applied a write of the other history"
    );
    b.marsadm_ok(&["invalidate", "r1"]);
    wait(&a);
    assert_images_follow(&a, 32, &[&b]);
}
