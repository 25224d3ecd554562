//! The NBD server against the real Debian clients: qemu-io, qemu-img,
//! nbdinfo, nbdcopy and the libnbd Python binding. Each test skips (with a
//! note on stderr) when its tool is missing; CI installs them.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datapath::frontend::{BlockIo, ExportTable, IoError};

use support::nbd_client;

/// In-memory volumes; counts open handles. Volumes named `secondary*`
/// refuse writes the way a volume that is not primary here does.
struct MemTable {
    volumes: BTreeMap<String, Arc<Mutex<Vec<u8>>>>,
    open: Arc<AtomicUsize>,
}

impl MemTable {
    fn data(&self, name: &str) -> Vec<u8> {
        self.volumes[name].lock().unwrap().clone()
    }

    fn fill(&self, name: &str, data: &[u8]) {
        self.volumes[name].lock().unwrap()[..data.len()].copy_from_slice(data);
    }
}

struct MemHandle {
    name: String,
    data: Arc<Mutex<Vec<u8>>>,
    open: Arc<AtomicUsize>,
}

impl Drop for MemHandle {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemHandle {
    fn check_writable(&self) -> Result<(), IoError> {
        if self.name.starts_with("secondary") {
            return Err(IoError::NotPrimary(self.name.clone()));
        }
        Ok(())
    }
}

impl BlockIo for MemHandle {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let start = offset as usize;
        Ok(Bytes::copy_from_slice(
            &self.data.lock().unwrap()[start..start + len as usize],
        ))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), IoError> {
        self.check_writable()?;
        let start = offset as usize;
        self.data.lock().unwrap()[start..start + data.len()].copy_from_slice(&data);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), IoError> {
        self.check_writable()?;
        let start = offset as usize;
        self.data.lock().unwrap()[start..start + len as usize].fill(0);
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
}

impl ExportTable for MemTable {
    type Handle = MemHandle;

    fn open(&self, name: &str) -> Option<MemHandle> {
        let data = self.volumes.get(name)?.clone();
        self.open.fetch_add(1, Ordering::SeqCst);
        Some(MemHandle {
            name: name.to_owned(),
            data,
            open: self.open.clone(),
        })
    }

    fn names(&self) -> Vec<String> {
        self.volumes.keys().cloned().collect()
    }
}

const MIB: usize = 1 << 20;

/// Starts a server over fresh zeroed volumes on a background runtime.
fn start(exports: &[(&str, usize)]) -> (SocketAddr, Arc<MemTable>) {
    let volumes = exports
        .iter()
        .map(|&(name, size)| (name.to_owned(), Arc::new(Mutex::new(vec![0; size]))))
        .collect();
    let table = Arc::new(MemTable {
        volumes,
        open: Arc::default(),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let served = table.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            datapath::frontend::nbd::serve(listener, served).await
        })
    });
    (addr, table)
}

fn uri(addr: SocketAddr, export: &str) -> String {
    format!("nbd://{addr}/{export}")
}

/// True if `tool` is installed; otherwise says the test is skipped.
fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    if !found {
        eprintln!("skipped: {tool} not installed");
    }
    found
}

/// The Debian python3 with the libnbd binding, if installed.
fn have_python_nbd() -> bool {
    let ok = Path::new("/usr/bin/python3").is_file()
        && Command::new("/usr/bin/python3")
            .args(["-c", "import nbd"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: python3-libnbd not installed");
    }
    ok
}

/// Runs a command, returning its output; panics with stderr if it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stdout and stderr together, for assertions on messages.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn qemu_io(addr: SocketAddr, export: &str, commands: &[&str]) -> Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &uri(addr, export)]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.output().expect("run qemu-io")
}

/// Waits until every handle is closed (the server drops it after the
/// client's connection ends).
fn wait_closed(table: &MemTable) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while table.open.load(Ordering::SeqCst) != 0 {
        assert!(
            Instant::now() < deadline,
            "handles still open after the clients left"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn qemu_io_writes_and_reads_back_a_pattern() {
    if !have("qemu-io") {
        return;
    }
    let (addr, table) = start(&[("vol", 4 * MIB)]);
    let out = qemu_io(
        addr,
        "vol",
        &["write -P 0xab 0 1M", "read -P 0xab 0 1M", "flush"],
    );
    let all = text(&out);
    println!("{all}");
    assert!(out.status.success(), "{all}");
    assert!(
        all.contains("wrote 1048576/1048576 bytes at offset 0"),
        "{all}"
    );
    assert!(
        all.contains("read 1048576/1048576 bytes at offset 0"),
        "{all}"
    );
    assert!(!all.contains("Pattern verification failed"), "{all}");
    let data = table.data("vol");
    assert!(data[..MIB].iter().all(|&b| b == 0xab));
    assert!(data[MIB..].iter().all(|&b| b == 0));
    wait_closed(&table);
}

#[test]
fn qemu_io_fua_write_zeroes_and_discard() {
    if !have("qemu-io") {
        return;
    }
    let (addr, table) = start(&[("vol", 4 * MIB)]);
    let out = qemu_io(
        addr,
        "vol",
        &[
            "write -f -P 0x5a 1M 2M",
            "write -z 1M 64k",
            "discard 2M 64k",
            "read -P 0 1M 64k",
            "read -P 0x5a 1088k 960k",
            "read -P 0 2M 64k",
        ],
    );
    let all = text(&out);
    println!("{all}");
    assert!(out.status.success(), "{all}");
    assert!(!all.contains("Pattern verification failed"), "{all}");
    let data = table.data("vol");
    let expected = |i: usize| match i {
        _ if i < MIB => 0,
        _ if i < MIB + 64 * 1024 => 0,
        _ if (2 * MIB..2 * MIB + 64 * 1024).contains(&i) => 0,
        _ if i < 3 * MIB => 0x5a,
        _ => 0,
    };
    for (i, &b) in data.iter().enumerate() {
        assert_eq!(b, expected(i), "byte {i}");
    }
}

#[test]
fn qemu_io_reports_a_refused_write_with_the_servers_errno() {
    if !have("qemu-io") {
        return;
    }
    let (addr, table) = start(&[("secondary", MIB)]);
    table.fill("secondary", &[0x11; 4096]);
    let out = qemu_io(
        addr,
        "secondary",
        &["write -P 0xab 0 4k", "read -P 0x11 0 4k"],
    );
    let all = text(&out);
    println!("{all}");
    assert!(
        all.contains("write failed: Operation not permitted"),
        "{all}"
    );
    assert!(all.contains("read 4096/4096 bytes at offset 0"), "{all}");
    assert!(!all.contains("Pattern verification failed"), "{all}");
    assert!(table.data("secondary")[..4096].iter().all(|&b| b == 0x11));
}

#[test]
fn qemu_img_info_reports_the_size() {
    if !have("qemu-img") {
        return;
    }
    let (addr, _) = start(&[("vol", 64 * MIB)]);
    let out = run(Command::new("qemu-img").args(["info", "--output=json", &uri(addr, "vol")]));
    println!("{out}");
    assert!(out.contains("\"virtual-size\": 67108864"), "{out}");
    let human = run(Command::new("qemu-img").args(["info", &uri(addr, "vol")]));
    assert!(
        human.contains("virtual size: 64 MiB (67108864 bytes)"),
        "{human}"
    );
}

#[test]
fn qemu_img_fails_on_an_unknown_export() {
    if !have("qemu-img") {
        return;
    }
    let (addr, _) = start(&[("vol", MIB)]);
    let out = Command::new("qemu-img")
        .args(["info", &uri(addr, "nope")])
        .output()
        .unwrap();
    let all = text(&out);
    println!("{all}");
    assert!(!out.status.success());
    assert!(all.contains("export \"nope\" is not served here"), "{all}");
}

#[test]
fn nbdinfo_lists_every_export() {
    if !have("nbdinfo") {
        return;
    }
    let (addr, _) = start(&[("alpha", MIB), ("beta", 2 * MIB)]);
    let out = run(Command::new("nbdinfo").args(["--list", &format!("nbd://{addr}")]));
    println!("{out}");
    assert!(out.contains("export=\"alpha\":"), "{out}");
    assert!(out.contains("export=\"beta\":"), "{out}");
    assert!(out.contains("export-size: 1048576"), "{out}");
    assert!(out.contains("export-size: 2097152"), "{out}");
}

#[test]
fn nbdinfo_shows_size_flags_and_block_sizes() {
    if !have("nbdinfo") {
        return;
    }
    let (addr, table) = start(&[("vol", 16 * MIB)]);
    let out = run(Command::new("nbdinfo").arg(uri(addr, "vol")));
    println!("{out}");
    for line in [
        "protocol: newstyle-fixed without TLS, using simple packets",
        "export-size: 16777216",
        "can_flush: true",
        "can_fua: true",
        "can_multi_conn: true",
        "can_trim: true",
        "can_zero: true",
        "is_read_only: false",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    wait_closed(&table);
}

#[test]
fn nbdcopy_copies_a_file_in_and_back_out() {
    if !have("nbdcopy") {
        return;
    }
    let (addr, table) = start(&[("vol", 8 * MIB)]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.img");
    let output = dir.path().join("out.img");
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&input, &data).unwrap();

    run(Command::new("nbdcopy").args([input.to_str().unwrap(), &uri(addr, "vol")]));
    assert!(
        table.data("vol") == data,
        "volume differs from the copied file"
    );
    std::fs::write(&output, b"").unwrap();
    run(Command::new("nbdcopy").args([&uri(addr, "vol"), output.to_str().unwrap()]));
    assert!(
        std::fs::read(&output).unwrap() == data,
        "copied-out file differs"
    );
    wait_closed(&table);
}

#[test]
fn python_libnbd_round_trip_and_errors() {
    if !have_python_nbd() {
        return;
    }
    let (addr, table) = start(&[("vol", 4 * MIB), ("secondary", MIB)]);
    table.fill("vol", b"seeded by the test");
    let script = r#"
import errno, sys, nbd

def errname(e):
    # Older bindings give the errno's name, newer ones its number.
    return errno.errorcode[e.errno] if isinstance(e.errno, int) else e.errno

h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_size() == 4 * 1024 * 1024, h.get_size()
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()
assert not h.is_read_only()
assert h.pread(18, 0) == b"seeded by the test"
h.pwrite(b"\xcd" * 65536, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 4096) == b"\xcd" * 65536
h.flush()
h.zero(4096, 8192)
h.trim(4096, 16384)
assert h.pread(65536, 4096) == (b"\xcd" * 4096 + b"\0" * 4096) * 2 + b"\xcd" * 49152
h.set_strict_mode(0)
try:
    h.pread(4096, 4 * 1024 * 1024 - 100)
    raise SystemExit("read beyond the end succeeded")
except nbd.Error as e:
    assert errname(e) == "EINVAL", (e.errno, e.string)
    print("beyond end:", e.string)
h.shutdown()
h = nbd.NBD()
h.connect_uri(sys.argv[3])
try:
    h.pwrite(b"x", 0)
    raise SystemExit("write to a secondary succeeded")
except nbd.Error as e:
    assert errname(e) == "EPERM", (e.errno, e.string)
    print("refused write:", e.string)
h.shutdown()
h2 = nbd.NBD()
try:
    h2.connect_uri(sys.argv[2])
    raise SystemExit("unknown export accepted")
except nbd.Error as e:
    print("unknown export:", e.string)
"#;
    let out = run(Command::new("/usr/bin/python3").args([
        "-c",
        script,
        &uri(addr, "vol"),
        &uri(addr, "nope"),
        &uri(addr, "secondary"),
    ]));
    println!("{out}");
    // "command failed" means the server's reply carried the errno.
    assert!(
        out.contains("beyond end: nbd_pread: read: command failed: Invalid argument"),
        "{out}"
    );
    assert!(
        out.contains("refused write: nbd_pwrite: write: command failed: Operation not permitted"),
        "{out}"
    );
    assert!(
        out.contains(
            "unknown export: nbd_connect_uri: handshake: server has no export named 'nope'"
        ),
        "{out}"
    );
    let data = table.data("vol");
    assert_eq!(&data[..18], b"seeded by the test");
    let expected = |i: usize| match i {
        8192..12288 | 16384..20480 => 0,
        4096..69632 => 0xcd,
        _ => 0,
    };
    for (i, &b) in data.iter().enumerate().skip(18) {
        assert_eq!(b, expected(i), "byte {i}");
    }
    wait_closed(&table);
}

#[test]
fn support_client_round_trip_and_errno() {
    let (addr, table) = start(&[("vol", MIB), ("other", 4096)]);
    assert_eq!(nbd_client::list_exports(addr).unwrap(), ["other", "vol"]);
    let mut client = nbd_client::connect(addr, "vol").unwrap();
    assert_eq!(client.size(), MIB as u64);
    assert_ne!(client.flags() & nbd_client::TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(client.block_sizes(), Some((1, 4096, 32 << 20)));
    client.write(100, b"support", true).unwrap();
    client.flush().unwrap();
    assert_eq!(client.read(100, 7).unwrap(), b"support");
    client.write_zeroes(100, 3, false).unwrap();
    client.trim(104, 3, false).unwrap();
    assert_eq!(client.read(100, 7).unwrap(), b"\0\0\0p\0\0\0");
    let err = client.read(MIB as u64, 1).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(22), "{err}");
    client.disconnect().unwrap();
    let err = nbd_client::connect(addr, "nope").err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(
        err.to_string()
            .contains("export \"nope\" is not served here"),
        "{err}"
    );
    wait_closed(&table);
}
