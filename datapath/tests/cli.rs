//! marsd and marsadm as an operator meets them: bad input gets exit code 1
//! (refused) or 2 (usage, marsd unreachable) and one line on stderr naming
//! the thing that is wrong, marsd survives it; and a resource's lifecycle
//! from create to delete, across a clean restart.

mod support;

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use support::daemon::{self, Daemon, output_within};
use support::nbd_client;

const MIB: u64 = 1 << 20;

/// Asserts a failed marsadm call: exit `code`, nothing on stdout, and one
/// line `marsadm: …` on stderr that contains every `needle`.
fn assert_refused(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status (stderr: {stderr:?}, stdout: {stdout:?})"
    );
    assert!(
        stdout.is_empty(),
        "nothing on stdout on failure: {stdout:?}"
    );
    let line = stderr.strip_suffix('\n').unwrap_or(&stderr);
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "exactly one line on stderr: {stderr:?}"
    );
    assert!(
        line.starts_with("marsadm: "),
        "stderr starts with 'marsadm: ': {line:?}"
    );
    assert!(!line.contains("panicked"), "marsadm panicked: {line:?}");
    for n in needles {
        assert!(line.contains(n), "stderr should mention {n:?}: {line:?}");
    }
}

/// marsd still runs and answers.
fn assert_alive(d: &mut Daemon) {
    assert!(d.is_running(), "marsd died; stderr:\n{}", d.run_stderr());
    d.view_json();
}

fn create(d: &Daemon, name: &str, path: &Path, size: &str) -> String {
    d.marsadm_ok(&[
        "create-resource",
        name,
        path.to_str().expect("UTF-8 temp path"),
        "--size",
        size,
    ])
}

fn log_files(d: &Daemon, name: &str) -> Vec<String> {
    let dir = d.root().join(format!("resource-{name}"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.starts_with("log-"))
        .collect();
    names.sort();
    names
}

/// Waits (bounded) until everything appended to `name`'s log is written back.
fn wait_written_back(d: &Daemon, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = d.resource_view(name);
        if v["log"]["written_back"] == v["log"]["appended"] {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "writeback of {name} did not catch up within 15 s: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes that differ with `seed` and with the offset (no short period, so
/// data at a wrong offset shows).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i ^ u64::from(seed) << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect()
}

fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    data[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn unknown_resource_is_refused_with_its_name() {
    let mut d = Daemon::start();
    for args in [
        &["primary", "nosuch"][..],
        &["secondary", "nosuch"],
        &["view", "nosuch"],
        &["view", "nosuch", "--json"],
        &["delete-resource", "nosuch"],
        &["resize", "nosuch", "1G"],
        &["log-rotate", "nosuch"],
        &["log-delete", "nosuch"],
    ] {
        let out = d.marsadm(args);
        assert_refused(&out, 1, &["resource nosuch does not exist"]);
    }
    assert_alive(&mut d);
}

#[test]
fn duplicate_resource_name_is_refused() {
    let mut d = Daemon::start();
    create(&d, "r1", &d.path("a.img"), "1M");
    let other = d.path("b.img");
    let out = d.marsadm(&[
        "create-resource",
        "r1",
        other.to_str().unwrap(),
        "--size",
        "2M",
    ]);
    assert_refused(&out, 1, &["r1", "already exists"]);
    assert!(
        !other.exists(),
        "a refused create must not create {other:?}"
    );
    let v = d.resource_view("r1");
    assert_eq!(v["size"], MIB, "the first r1 is untouched: {v:#}");
    assert_alive(&mut d);
}

#[test]
fn bad_sizes_are_refused_naming_the_size() {
    let mut d = Daemon::start();
    let img = d.path("s.img");
    let path = img.to_str().unwrap();
    // Sizes marsadm cannot parse are usage errors.
    for size in ["10X", "1.5G", "-5", "", "G", "99999999999999999999"] {
        let arg = format!("--size={size}");
        let out = d.marsadm(&["create-resource", "s", path, &arg]);
        assert_refused(&out, 2, &[&format!("invalid size '{size}'")]);
    }
    // As typed without '=', clap takes -5 for an option; still one line.
    let out = d.marsadm(&["create-resource", "s", path, "--size", "-5"]);
    assert_refused(&out, 2, &["-5"]);
    // Zero parses, and marsd refuses it.
    let out = d.marsadm(&["create-resource", "s", path, "--size", "0"]);
    assert_refused(&out, 1, &["invalid size 0"]);
    assert!(!img.exists(), "no backing file for a refused create");
    assert_eq!(d.view_json()["resources"], serde_json::json!([]));

    create(&d, "s", &img, "1M");
    for size in ["10X", "1.5G"] {
        let out = d.marsadm(&["resize", "s", size]);
        assert_refused(&out, 2, &[&format!("invalid size '{size}'")]);
    }
    let out = d.marsadm(&["resize", "s", "--", "-5"]);
    assert_refused(&out, 2, &["invalid size '-5'"]);
    let out = d.marsadm(&["resize", "s", "0"]);
    assert_refused(&out, 1, &["s", "shrinking", "not supported"]);
    assert_eq!(d.resource_view("s")["size"], MIB);
    assert_alive(&mut d);
}

#[test]
fn backing_path_in_a_missing_directory_is_refused() {
    let mut d = Daemon::start();
    let missing = d.path("no/such/dir/x.img");
    let out = d.marsadm(&[
        "create-resource",
        "m",
        missing.to_str().unwrap(),
        "--size",
        "1M",
    ]);
    assert_refused(
        &out,
        1,
        &[
            missing.to_str().unwrap(),
            "resource m",
            "directory does not exist",
        ],
    );
    assert!(!d.root().join("resource-m").exists());
    assert_eq!(d.view_json()["resources"], serde_json::json!([]));
    assert_alive(&mut d);
}

#[test]
fn relative_backing_path_is_resolved_against_the_cwd_of_marsadm() {
    let mut d = Daemon::start();
    let cwd = d.path("work");
    std::fs::create_dir(&cwd).unwrap();
    let out = d.marsadm_in(&cwd, &["create-resource", "rel", "rel.img", "--size", "2M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = cwd.join("rel.img");
    let v = d.resource_view("rel");
    assert_eq!(v["backing"], want.to_str().unwrap(), "{v:#}");
    let meta = std::fs::metadata(&want).expect("backing file created in marsadm's cwd");
    assert_eq!(meta.len(), 2 * MIB);
    assert!(
        !d.root().join("rel.img").exists(),
        "not resolved against marsd's root"
    );
    assert_alive(&mut d);
}

#[test]
fn invalid_resource_names_are_refused() {
    let mut d = Daemon::start();
    let entries = |dir: &Path| std::fs::read_dir(dir).unwrap().count();
    let before = entries(&d.path(""));
    let long = "x".repeat(65);
    for name in [
        "../x",
        "",
        "a/b",
        ".hidden",
        "x y",
        "n\u{e4}me",
        long.as_str(),
    ] {
        let img = d.path("n.img");
        let out = d.marsadm(&[
            "create-resource",
            name,
            img.to_str().unwrap(),
            "--size",
            "1M",
        ]);
        assert_refused(&out, 1, &[&format!("invalid resource name '{name}'")]);
        assert!(
            !img.exists(),
            "no backing file for the refused name {name:?}"
        );
    }
    assert!(!d.path("x").exists() && !d.root().join("x").exists());
    assert_eq!(
        before,
        entries(&d.path("")),
        "nothing created beside the root"
    );
    let root: Vec<String> = std::fs::read_dir(d.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("resource-"))
        .collect();
    assert!(root.is_empty(), "no resource directories: {root:?}");
    assert_alive(&mut d);
}

#[test]
fn unknown_nbd_export_is_refused_with_a_message() {
    let mut d = Daemon::start();
    create(&d, "there", &d.path("t.img"), "1M");
    let err = nbd_client::connect(d.nbd_addr(), "nosuch")
        .err()
        .expect("an unknown export is refused");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("nosuch"), "{err}");
    assert_eq!(
        nbd_client::list_exports(d.nbd_addr()).unwrap(),
        vec!["there".to_string()]
    );
    let c = nbd_client::connect(d.nbd_addr(), "there").expect("the real export");
    assert_eq!(c.size(), MIB);
    c.disconnect().unwrap();
    assert_alive(&mut d);
}

/// Sends `bytes` on a fresh connection to the NBD port (after reading the
/// server's greeting if `greet`), then waits (bounded) for the server to
/// close the connection.
fn nbd_garbage(d: &Daemon, greet: bool, bytes: &[u8], expect_close: bool) {
    let mut s = TcpStream::connect(d.nbd_addr()).expect("connect to the NBD port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if greet {
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("server greeting");
    }
    // The server may close before it read everything: errors are fine.
    let _ = s.write_all(bytes);
    if expect_close {
        let mut rest = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("server did not close after {bytes:02x?}: {e}"),
            }
            assert!(Instant::now() < deadline, "server keeps talking");
        }
    }
}

#[test]
fn malformed_nbd_handshakes_leave_the_server_working() {
    let mut d = Daemon::start();
    create(&d, "hs", &d.path("hs.img"), "1M");
    let mut rng = StdRng::seed_from_u64(0x006e_6264);
    const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    let option = |opt: u32, len: u32, data: &[u8]| {
        let mut m = 3u32.to_be_bytes().to_vec(); // client flags
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        m
    };
    for _ in 0..5 {
        let len = rng.random_range(1..2048);
        let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Random bytes before and after reading the greeting.
        nbd_garbage(&d, false, &junk, false);
        nbd_garbage(&d, true, &junk, true);
    }
    // Connect and hang up at once; half a greeting reply.
    nbd_garbage(&d, false, &[], false);
    nbd_garbage(&d, true, &[0, 0], false);
    // Client flags with unknown bits, or without FIXED_NEWSTYLE.
    nbd_garbage(&d, true, &0xffff_ffffu32.to_be_bytes(), true);
    nbd_garbage(&d, true, &0u32.to_be_bytes(), true);
    // Good flags, then a bad option magic.
    nbd_garbage(
        &d,
        true,
        &[0, 0, 0, 3, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 7, 0, 0, 0, 0],
        true,
    );
    // NBD_OPT_GO announcing 4 GiB of data, then hanging up.
    nbd_garbage(&d, true, &option(7, u32::MAX, &[1, 2, 3]), false);
    // NBD_OPT_EXPORT_NAME with a name longer than the spec allows.
    nbd_garbage(&d, true, &option(1, 1 << 20, &[]), true);
    // NBD_OPT_EXPORT_NAME of an unknown export (no error reply exists: close).
    nbd_garbage(&d, true, &option(1, 6, b"nosuch"), true);
    // NBD_OPT_GO whose name length exceeds the option: an error reply, then
    // a bad magic closes it.
    let mut go = option(7, 8, &[0, 0, 0, 100, b'h', b's', 0, 0]);
    go.extend_from_slice(&[0xde; 16]);
    nbd_garbage(&d, true, &go, true);
    // A good NBD_OPT_GO, then a transmission request with a bad magic.
    let mut go = option(7, 8, &[0, 0, 0, 2, b'h', b's', 0, 0]);
    go.extend_from_slice(&[0xab; 28]);
    nbd_garbage(&d, true, &go, true);
    // A good NBD_OPT_GO, then hanging up in the middle of a write.
    let mut go = option(7, 8, &[0, 0, 0, 2, b'h', b's', 0, 0]);
    go.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    go.extend_from_slice(&[
        0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0,
    ]);
    go.extend_from_slice(&[0x55; 100]);
    nbd_garbage(&d, true, &go, false);

    let mut c = nbd_client::connect(d.nbd_addr(), "hs").expect("a normal client still works");
    let data = pattern(7, 8192);
    c.write(4096, &data, true).unwrap();
    assert_eq!(c.read(4096, 8192).unwrap(), data);
    c.disconnect().unwrap();
    assert_alive(&mut d);
    assert_eq!(d.resource_view("hs")["open_count"], 0);
}

#[test]
fn marsadm_without_marsd_exits_2_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    for root in [dir.path().to_path_buf(), dir.path().join("missing")] {
        let sock = root.join("marsd.sock");
        let out = output_within(
            Command::new(daemon::MARSADM)
                .env_remove("MARS_ROOT")
                .arg("--root")
                .arg(&root)
                .arg("view"),
            daemon::MARSADM_TIMEOUT,
        );
        assert_refused(&out, 2, &[sock.to_str().unwrap(), "cannot reach marsd"]);
        // The same through MARS_ROOT.
        let out = output_within(
            Command::new(daemon::MARSADM)
                .env("MARS_ROOT", &root)
                .args(["primary", "r"]),
            daemon::MARSADM_TIMEOUT,
        );
        assert_refused(&out, 2, &[sock.to_str().unwrap(), "cannot reach marsd"]);
    }
}

#[test]
fn second_marsd_on_the_same_root_is_refused_with_a_lock_message() {
    let mut d = Daemon::start();
    create(&d, "one", &d.path("one.img"), "1M");
    let out = output_within(
        Command::new(daemon::MARSD)
            .env_remove("MARS_ROOT")
            .arg("--root")
            .arg(d.root())
            .args(["--node", d.node()])
            .arg("--listen")
            .arg(daemon::free_addr().to_string())
            .arg("--nbd")
            .arg(daemon::free_addr().to_string()),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second marsd must not run: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("marsd: ")
            && last.contains("lock")
            && last.contains(d.root().to_str().unwrap()),
        "a clear lock message naming the root: {stderr}"
    );
    // The first one keeps its socket and its resource.
    assert_alive(&mut d);
    assert_eq!(d.resource_view("one")["role"], "primary");
}

#[test]
fn restart_with_another_node_name_is_refused() {
    let mut d = Daemon::start();
    assert!(d.term().success());
    let out = output_within(
        Command::new(daemon::MARSD)
            .env_remove("MARS_ROOT")
            .arg("--root")
            .arg(d.root())
            .args(["--node", "other"])
            .arg("--listen")
            .arg(daemon::free_addr().to_string()),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("marsd: ")
            && last.contains("belongs to node 'n1', not 'other'")
            && last.contains("--node n1"),
        "a clear message naming both nodes and the fix: {stderr}"
    );
    d.restart();
    assert_eq!(d.view_json()["node"], "n1");
}

#[test]
fn stale_socket_after_kill9_is_replaced_on_restart() {
    let mut d = Daemon::start();
    create(&d, "st", &d.path("st.img"), "1M");
    assert!(d.kill9().is_none(), "marsd was running");
    let sock = d.root().join("marsd.sock");
    assert!(sock.exists(), "SIGKILL leaves the socket file behind");
    let out = d.marsadm(&["view"]);
    assert_refused(&out, 2, &[sock.to_str().unwrap(), "cannot reach marsd"]);
    d.restart();
    assert_eq!(d.resource_view("st")["role"], "primary");
    // A clean stop removes the socket.
    assert!(d.term().success());
    assert!(!sock.exists(), "SIGTERM removes the socket");
}

#[test]
fn unknown_subcommand_and_missing_arguments_are_usage_errors() {
    let mut d = Daemon::start();
    assert_refused(&d.marsadm(&["frobnicate"]), 2, &["frobnicate"]);
    assert_refused(&d.marsadm(&["create-resource", "x"]), 2, &["--help"]);
    assert_refused(&d.marsadm(&["resize", "x"]), 2, &["--help"]);
    assert_alive(&mut d);
}

/// create → write → secondary (refused while open, then done) → primary →
/// resize → log-rotate → log-delete → SIGTERM → restart → delete.
#[test]
fn resource_lifecycle_from_create_to_delete() {
    let mut d = Daemon::start();
    let img = d.path("life.img");
    let out = create(&d, "life", &img, "4M");
    assert!(out.contains("created resource life"), "{out}");
    let v = d.resource_view("life");
    assert_eq!(v["role"], "primary", "{v:#}");
    assert_eq!(v["primary"], "n1");
    assert_eq!(v["generation"], 1);
    assert_eq!(v["size"], 4 * MIB);
    assert_eq!(v["backing"], img.to_str().unwrap());
    assert_eq!(v["open_count"], 0);

    // Write through NBD.
    let a = pattern(1, 64 << 10);
    let b = pattern(2, 4096);
    let mut c = nbd_client::connect(d.nbd_addr(), "life").unwrap();
    assert_eq!(c.size(), 4 * MIB);
    c.write(0, &a, false).unwrap();
    c.write(3 * MIB, &b, false).unwrap();
    c.flush().unwrap();
    assert_eq!(d.resource_view("life")["open_count"], 1);

    // secondary is refused while a client is attached, and changes nothing.
    let out = d.marsadm(&["secondary", "life"]);
    assert_refused(&out, 1, &["life", "in use"]);
    assert_eq!(d.resource_view("life")["role"], "primary");
    assert_eq!(c.read(0, 4096).unwrap(), a[..4096]);
    c.disconnect().unwrap();

    let out = d.marsadm_ok(&["secondary", "life"]);
    assert!(out.contains("life is secondary"), "{out}");
    let v = d.resource_view("life");
    assert_eq!(v["role"], "secondary", "{v:#}");
    assert_eq!(v["primary"], Value::Null);
    let err = nbd_client::connect(d.nbd_addr(), "life")
        .err()
        .expect("no export while secondary");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(nbd_client::list_exports(d.nbd_addr()).unwrap().is_empty());
    assert_eq!(
        read_file_at(&img, 0, a.len()),
        a,
        "backing file after secondary"
    );
    assert_eq!(read_file_at(&img, 3 * MIB, b.len()), b);
    // Secondary again is a no-op; a secondary refuses primary-only work.
    d.marsadm_ok(&["secondary", "life"]);
    assert_refused(
        &d.marsadm(&["resize", "life", "8M"]),
        1,
        &["life", "not primary"],
    );
    assert_refused(
        &d.marsadm(&["log-rotate", "life"]),
        1,
        &["life", "not primary"],
    );

    // Primary again: a new generation, the data is still there; primary
    // on a primary changes nothing.
    let out = d.marsadm_ok(&["primary", "life"]);
    assert!(out.contains("life is primary on n1"), "{out}");
    let v = d.resource_view("life");
    assert_eq!(v["role"], "primary", "{v:#}");
    assert_eq!(v["generation"], 2);
    d.marsadm_ok(&["primary", "life"]);
    assert_eq!(
        d.resource_view("life")["generation"],
        2,
        "primary is idempotent"
    );
    let mut c = nbd_client::connect(d.nbd_addr(), "life").unwrap();
    assert_eq!(c.read(0, a.len() as u32).unwrap(), a);
    c.disconnect().unwrap();

    // Resize: grow works (view, NBD size, data kept), shrink is refused.
    let out = d.marsadm_ok(&["resize", "life", "8M"]);
    assert!(out.contains("life is now 8.0 MiB"), "{out}");
    assert_eq!(d.resource_view("life")["size"], 8 * MIB);
    let mut c = nbd_client::connect(d.nbd_addr(), "life").unwrap();
    assert_eq!(c.size(), 8 * MIB);
    assert_eq!(c.read(0, a.len() as u32).unwrap(), a);
    assert_eq!(c.read(3 * MIB, 4096).unwrap(), b);
    let e = pattern(3, 8192);
    c.write(8 * MIB - 8192, &e, true).unwrap();
    assert_eq!(c.read(8 * MIB - 8192, 8192).unwrap(), e);
    assert_refused(
        &d.marsadm(&["resize", "life", "6M"]),
        1,
        &["life", "shrinking", "not supported"],
    );
    assert_eq!(d.resource_view("life")["size"], 8 * MIB);
    d.marsadm_ok(&["resize", "life", "8M"]);

    // log-rotate starts a new logfile; log-delete removes written-back ones.
    wait_written_back(&d, "life");
    let before = log_files(&d, "life");
    let out = d.marsadm_ok(&["log-rotate", "life"]);
    assert!(out.contains("started a new logfile"), "{out}");
    let rotated = log_files(&d, "life");
    assert_eq!(
        rotated.len(),
        before.len() + 1,
        "one more logfile: {before:?} -> {rotated:?}"
    );
    let out = d.marsadm_ok(&["log-delete", "life"]);
    assert!(out.contains("life: deleted"), "{out}");
    let after = log_files(&d, "life");
    assert_eq!(
        after,
        rotated[rotated.len() - 1..].to_vec(),
        "only the new logfile is left"
    );
    // The volume still reads the same.
    assert_eq!(c.read(0, a.len() as u32).unwrap(), a);
    c.disconnect().unwrap();

    // SIGTERM exits 0; after a restart (no CLI call) it is primary with its data.
    let status = d.term();
    assert_eq!(status.code(), Some(0), "SIGTERM: {status}");
    d.restart();
    let v = d.resource_view("life");
    assert_eq!(v["role"], "primary", "{v:#}");
    assert_eq!(v["generation"], 2);
    assert_eq!(v["size"], 8 * MIB);
    let mut c = nbd_client::connect(d.nbd_addr(), "life").unwrap();
    assert_eq!(c.size(), 8 * MIB);
    assert_eq!(c.read(0, a.len() as u32).unwrap(), a);
    assert_eq!(c.read(3 * MIB, 4096).unwrap(), b);
    assert_eq!(c.read(8 * MIB - 8192, 8192).unwrap(), e);

    // delete-resource is refused while open; then removes the directory and
    // keeps the backing file with the data.
    assert_refused(
        &d.marsadm(&["delete-resource", "life"]),
        1,
        &["life", "in use"],
    );
    c.disconnect().unwrap();
    let out = d.marsadm_ok(&["delete-resource", "life"]);
    assert!(out.contains("deleted resource life"), "{out}");
    assert!(!d.root().join("resource-life").exists());
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 * MIB);
    assert_eq!(read_file_at(&img, 0, a.len()), a);
    assert_eq!(read_file_at(&img, 3 * MIB, b.len()), b);
    assert_eq!(read_file_at(&img, 8 * MIB - 8192, e.len()), e);
    assert_eq!(d.view_json()["resources"], serde_json::json!([]));
    assert_refused(
        &d.marsadm(&["view", "life"]),
        1,
        &["resource life does not exist"],
    );
    assert!(nbd_client::connect(d.nbd_addr(), "life").is_err());
    // The name is free again.
    create(&d, "life", &d.path("life2.img"), "1M");
    assert_alive(&mut d);
}

#[test]
fn sigterm_with_an_attached_idle_client_exits_0() {
    let mut d = Daemon::start();
    create(&d, "idle", &d.path("idle.img"), "1M");
    let mut c = nbd_client::connect(d.nbd_addr(), "idle").unwrap();
    c.write(0, &pattern(5, 4096), false).unwrap();
    let t = Instant::now();
    let status = d.term();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM with a client attached: {status}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    // The client sees the connection end instead of hanging.
    assert!(c.read(0, 4096).is_err());
    d.restart();
    let mut c = nbd_client::connect(d.nbd_addr(), "idle").unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), pattern(5, 4096));
    c.disconnect().unwrap();
}

// Regression tests for bugs found while writing these tests (each failed
// until the bug it names was fixed).

/// Regression: `Resource::create` (resource.rs) accepts any backing path, also
/// marsd's own files: `create-resource x ROOT/node --size 1M` extends the
/// node-identity file with zeroes, and marsd then refuses to start on its
/// own root ("belongs to node 'n1\n\0\0…'"); a logfile of another
/// resource as backing file destroys that resource's log.
#[test]
fn backing_file_inside_the_state_root_is_refused() {
    let mut d = Daemon::start();
    create(&d, "first", &d.path("first.img"), "1M");
    let root = d.root().to_path_buf();
    for target in [
        root.join("node"),
        root.join("marsd.lock"),
        root.join("resource-first/resource.json"),
        root.join("resource-first/log-000000001-n1"),
    ] {
        let before = std::fs::read(&target).unwrap();
        let out = d.marsadm(&[
            "create-resource",
            "intruder",
            target.to_str().unwrap(),
            "--size",
            "1M",
        ]);
        let after = std::fs::read(&target).unwrap();
        assert!(
            !out.status.success() && after == before,
            "create-resource accepted marsd's own file {} as backing file (exit {}, the file went from {} to {} bytes)",
            target.display(),
            out.status,
            before.len(),
            after.len()
        );
        assert_refused(&out, 1, &[target.to_str().unwrap()]);
    }
    // The root still works.
    assert!(d.term().success());
    d.restart();
    assert_eq!(d.resource_view("first")["role"], "primary");
}

/// Regression: nothing stops two resources from using one backing file; both
/// write back into it and corrupt each other's data.
#[test]
fn two_resources_cannot_share_one_backing_file() {
    let mut d = Daemon::start();
    let shared = d.path("shared.img");
    create(&d, "first", &shared, "1M");
    let dotted = format!("{}/./shared.img", d.path("").display());
    for path in [shared.to_str().unwrap(), dotted.as_str()] {
        let out = d.marsadm(&["create-resource", "second", path, "--size", "1M"]);
        assert!(
            !out.status.success(),
            "create-resource second {path} succeeded although {} is the backing file of resource first",
            shared.display()
        );
        assert_refused(&out, 1, &["shared.img", "first"]);
    }
    assert_alive(&mut d);
}

/// Regression: a backing path that is a directory (or otherwise unusable) is bad
/// input, but control/mod.rs maps every `Error::Backing` except NotFound to
/// `Code::Internal`, so marsadm exits 2 ("internal") instead of 1.
#[test]
fn a_directory_as_backing_path_is_refused_with_exit_1() {
    let mut d = Daemon::start();
    let dir = d.path("adir");
    std::fs::create_dir(&dir).unwrap();
    let out = d.marsadm(&[
        "create-resource",
        "dir",
        dir.to_str().unwrap(),
        "--size",
        "1M",
    ]);
    assert_refused(&out, 1, &[dir.to_str().unwrap(), "resource dir"]);
    assert_alive(&mut d);
}

/// Regression: `Resource::resize` (resource.rs) checks the capacity of block
/// devices only; for a file it logs the resize record and reports success
/// although the file cannot grow that far. Writeback then fails on that
/// record forever ("writeback failing: … File too large"), nothing after it
/// is ever written back and the overlay fills until writers stall.
/// (16000P exceeds what any file can be; 20T hits the same on ext4.)
#[test]
fn resize_beyond_what_the_backing_file_can_hold_is_refused() {
    let mut d = Daemon::start();
    create(&d, "big", &d.path("big.img"), "1M");
    let out = d.marsadm(&["resize", "big", "16000P"]);
    let v = d.resource_view("big");
    assert!(
        !out.status.success(),
        "resize to 16000P succeeded for a file-backed resource: {:?}; view: size {}, error {}",
        String::from_utf8_lossy(&out.stdout),
        v["size"],
        v["error"]
    );
    assert_refused(&out, 1, &["big"]);
    assert_eq!(v["size"], MIB);
    assert_alive(&mut d);
}

/// Regression: marsd must exit within 20 s of SIGTERM. writeback.rs takes
/// `stopping` once per batch (`(batch, wb.stop.is_some())`) and
/// `apply_with_retry` only gives up when that flag is set, so a record
/// whose batch was taken before SIGTERM is retried forever while the
/// backing device fails: `Logger::stop` never returns and marsd hangs
/// (meanwhile its control socket still takes commands).
#[test]
fn sigterm_exits_within_20_s_while_writeback_keeps_failing() {
    let mut d = Daemon::start();
    let img = d.path("failing.img");
    create(&d, "failing", &img, "4M");
    // The backing file shrinks behind marsd's back, as a failing device
    // would: no record can be written back any more.
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(0)
        .unwrap();
    let mut c = nbd_client::connect(d.nbd_addr(), "failing").unwrap();
    c.write(0, &pattern(3, 4096), false).unwrap();
    c.disconnect().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.resource_view("failing")["error"].is_null() {
        assert!(
            Instant::now() < deadline,
            "writeback error never shown in view"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let status = d.term();
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{status}");
}

/// Regression: `Resource::make_secondary` (resource.rs) takes the logger out of the
/// state and then, without the lock, waits in `Logger::stop` until
/// everything is written back. `make_primary` meanwhile sees "secondary, no
/// logger" and starts a new logger at once, with an empty overlay: its
/// reads go to a backing file that the old writeback has not finished
/// (stale data), and the old writeback may later overwrite newer writes of
/// the new logger (a completed FUA write is lost).
///
/// To hold the window open, the backing device fails while the data is
/// written (it shrinks to nothing, so every record is refused as beyond the
/// device): the data stays in the log and the overlay, and `secondary`
/// waits. A correct `primary` waits for it too, or is refused; either way
/// no read after it may return anything but the data written.
#[test]
fn primary_during_an_unfinished_secondary_serves_current_data_and_keeps_new_writes() {
    const MIBS: u64 = 16;
    let d = Arc::new(Daemon::start());
    let img = d.path("race.img");
    create(&d, "race", &img, "64M");
    let set_backing_len = |len: u64| {
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(len)
            .unwrap()
    };
    set_backing_len(0);
    let data = |i: u64| pattern(i as u8 ^ 0x5a, 1 << 20);
    let mut c = nbd_client::connect(d.nbd_addr(), "race").unwrap();
    for i in 0..MIBS {
        c.write(i << 20, &data(i), false).unwrap();
    }
    c.flush().unwrap();
    c.disconnect().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.resource_view("race")["error"].is_null() {
        assert!(
            Instant::now() < deadline,
            "writeback error never shown in view"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let run = |args: &'static [&'static str]| {
        let d = Arc::clone(&d);
        std::thread::spawn(move || d.marsadm(args))
    };
    let secondary = run(&["secondary", "race"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.resource_view("race")["role"] == "primary" {
        assert!(Instant::now() < deadline, "secondary does not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let primary = run(&["primary", "race"]);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !primary.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // If primary already succeeded, read now, while the old writeback is stuck.
    let mut early: Option<(Vec<u64>, Vec<u8>)> = None;
    if primary.is_finished() && d.resource_view("race")["role"] == "primary" {
        let mut c = nbd_client::connect(d.nbd_addr(), "race").unwrap();
        let stale = (0..MIBS)
            .filter(|&i| c.read(i << 20, 1 << 20).unwrap() != data(i))
            .collect();
        let newer = pattern(0xee, 1 << 20);
        c.write((MIBS - 1) << 20, &newer, true).unwrap();
        c.disconnect().unwrap();
        early = Some((stale, newer));
    }
    // The device recovers: the old writeback finishes, secondary returns.
    set_backing_len(64 * MIB);
    let out = secondary.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = primary.join().unwrap();
    if !out.status.success() {
        assert_refused(&out, 1, &["race"]);
        d.marsadm_ok(&["primary", "race"]);
    }
    let Some((stale, newer)) = early else {
        return; // primary waited or was refused: nothing to see
    };
    // Give the new writeback time to apply the FUA write (the old one has
    // its 16 records and backoff of up to 5 s to get through).
    std::thread::sleep(Duration::from_secs(6));
    let mut c = nbd_client::connect(d.nbd_addr(), "race").unwrap();
    let lost = c.read((MIBS - 1) << 20, 1 << 20).unwrap() != newer;
    c.disconnect().unwrap();
    assert!(
        stale.is_empty() && !lost,
        "`primary` succeeded while `secondary` was still writing back; then {} of {MIBS} MiB read stale data (MiB {stale:?}) and a FUA write made after `primary` was {}",
        stale.len(),
        if lost {
            "LOST (overwritten by the old writeback)"
        } else {
            "kept"
        }
    );
}

/// Regression: a SIGKILL during `delete-resource` can leave the resource directory
/// without its `resource.json` (remove_dir_all goes in directory order).
/// After a restart the resource is listed as failed to load, and then
/// `delete-resource` is refused (`Node::resource` turns a broken resource
/// into InvalidArgument) while `create-resource` says it already exists:
/// only removing the directory by hand gets the name back.
#[test]
fn an_interrupted_delete_resource_can_be_finished_after_restart() {
    let mut d = Daemon::start();
    let img = d.path("half.img");
    create(&d, "half", &img, "1M");
    assert!(d.kill9().is_none());
    let dir = d.root().join("resource-half");
    std::fs::remove_file(dir.join("resource.json")).unwrap();
    d.restart();
    let v = d.resource_view("half");
    assert!(
        !v["error"].is_null(),
        "a broken resource shows its error: {v:#}"
    );
    let out = d.marsadm(&["delete-resource", "half"]);
    assert!(
        out.status.success(),
        "delete-resource of a half-deleted resource was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.exists(), "the resource directory is gone");
    assert!(img.exists(), "the backing file is kept");
    create(&d, "half", &img, "1M");
    assert_alive(&mut d);
}

#[test]
fn ublk_commands_answer_clearly_where_the_kernel_has_no_ublk() {
    let mut d = Daemon::start();
    create(&d, "r1", &d.path("r1.img"), "4M");
    assert!(
        d.resource_view("r1")["device"].is_null(),
        "no device before `up`"
    );
    if !Path::new("/dev/ublk-control").exists() {
        let out = d.marsadm(&["up", "r1"]);
        assert_refused(&out, 1, &["ublk is not available", "modprobe ublk_drv"]);
    }
    assert_refused(&d.marsadm(&["up", "nosuch"]), 1, &["nosuch does not exist"]);
    // down is idempotent: nothing to remove is fine.
    let out = d.marsadm_ok(&["down", "r1"]);
    assert!(out.contains("no ublk device"), "{out}");
    assert_refused(
        &d.marsadm(&["attach", "r1"]),
        2,
        &["--remote", "marsadm up r1"],
    );
    assert_refused(
        &d.marsadm(&["attach", "elsewhere", "--remote"]),
        1,
        &["knows no primary of elsewhere"],
    );
    // The volume still works and nothing is left open.
    assert_eq!(d.resource_view("r1")["open_count"], 0);
    assert_alive(&mut d);
}
