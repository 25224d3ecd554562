//! A small synchronous NBD client for integration tests: fixed newstyle,
//! NBD_OPT_GO, simple replies, one request at a time.
//!
//! Errors are `io::Error`s; a request the server refused carries the NBD
//! errno as its raw OS error (`err.raw_os_error() == Some(22)` for EINVAL),
//! and an option the server refused has kind `NotFound` (unknown export) or
//! `Other` with the server's message.

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;

const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1;

pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// One connection in the transmission phase.
pub struct NbdClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
    size: u64,
    flags: u16,
    block_sizes: Option<(u32, u32, u32)>,
    cookie: u64,
}

/// Connects and enters transmission on `export` with NBD_OPT_GO.
pub fn connect(addr: impl ToSocketAddrs, export: &str) -> io::Result<NbdClient> {
    let (mut r, mut w) = greet(addr)?;
    let mut go = Vec::new();
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(&mut w, OPT_GO, &go)?;

    let (mut export_info, mut block_sizes) = (None, None);
    loop {
        let (kind, data) = option_reply(&mut r, OPT_GO)?;
        match kind {
            REP_INFO if data.len() >= 2 => match u16::from_be_bytes([data[0], data[1]]) {
                INFO_EXPORT if data.len() == 12 => {
                    export_info = Some((
                        be_u64(&data[2..10]),
                        u16::from_be_bytes([data[10], data[11]]),
                    ))
                }
                INFO_BLOCK_SIZE if data.len() == 14 => {
                    block_sizes = Some((
                        be_u32(&data[2..6]),
                        be_u32(&data[6..10]),
                        be_u32(&data[10..14]),
                    ))
                }
                _ => {}
            },
            REP_INFO => return Err(invalid("short NBD_REP_INFO")),
            REP_ACK => break,
            REP_ERR_UNKNOWN => {
                let msg = String::from_utf8_lossy(&data);
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("unknown export: {msg}"),
                ));
            }
            _ => {
                let msg = String::from_utf8_lossy(&data);
                return Err(io::Error::other(format!(
                    "NBD_OPT_GO refused ({kind:#x}): {msg}"
                )));
            }
        }
    }
    let (size, flags) = export_info.ok_or_else(|| invalid("no NBD_INFO_EXPORT before ACK"))?;
    Ok(NbdClient {
        r,
        w,
        size,
        flags,
        block_sizes,
        cookie: 0,
    })
}

/// Names the server lists with NBD_OPT_LIST.
pub fn list_exports(addr: impl ToSocketAddrs) -> io::Result<Vec<String>> {
    let (mut r, mut w) = greet(addr)?;
    send_option(&mut w, OPT_LIST, &[])?;
    let mut names = Vec::new();
    loop {
        let (kind, data) = option_reply(&mut r, OPT_LIST)?;
        match kind {
            REP_SERVER if data.len() >= 4 => {
                let len = be_u32(&data[..4]) as usize;
                let name = data
                    .get(4..4 + len)
                    .ok_or_else(|| invalid("bad NBD_REP_SERVER"))?;
                names.push(String::from_utf8_lossy(name).into_owned());
            }
            REP_ACK => return Ok(names),
            _ => {
                return Err(io::Error::other(format!(
                    "NBD_OPT_LIST refused ({kind:#x})"
                )));
            }
        }
    }
}

impl NbdClient {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags from NBD_INFO_EXPORT.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// (minimum, preferred, maximum) from NBD_INFO_BLOCK_SIZE, if sent.
    pub fn block_sizes(&self) -> Option<(u32, u32, u32)> {
        self.block_sizes
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.request(CMD_READ, 0, offset, len, &[])?;
        let mut data = vec![0; len as usize];
        self.r.read_exact(&mut data)?;
        Ok(data)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| invalid("write larger than 4 GiB"))?;
        self.request(CMD_WRITE, fua_flag(fua), offset, len, data)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.request(CMD_WRITE_ZEROES, fua_flag(fua), offset, len, &[])
    }

    pub fn trim(&mut self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.request(CMD_TRIM, fua_flag(fua), offset, len, &[])
    }

    /// Sends any command and waits for its reply header (a read payload is
    /// left unread); for tests of odd requests.
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.cookie += 1;
        let mut msg = Vec::with_capacity(28 + payload.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&self.cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(payload);
        self.w.write_all(&msg)?;

        let mut reply = [0u8; 16];
        self.r.read_exact(&mut reply)?;
        if be_u32(&reply[..4]) != SIMPLE_REPLY_MAGIC {
            return Err(invalid("bad reply magic"));
        }
        if be_u64(&reply[8..]) != self.cookie {
            return Err(invalid("reply for another request"));
        }
        match be_u32(&reply[4..8]) {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(errno as i32)),
        }
    }

    /// Sends NBD_CMD_DISC and waits for the server to close.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.cookie += 1;
        let mut msg = Vec::with_capacity(28);
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&CMD_DISC.to_be_bytes());
        msg.extend_from_slice(&self.cookie.to_be_bytes());
        msg.extend_from_slice(&[0; 12]);
        self.w.write_all(&msg)?;
        let mut rest = Vec::new();
        self.r.read_to_end(&mut rest)?;
        if !rest.is_empty() {
            return Err(invalid("server sent data after NBD_CMD_DISC"));
        }
        Ok(())
    }
}

fn greet(addr: impl ToSocketAddrs) -> io::Result<(BufReader<TcpStream>, TcpStream)> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut hello = [0u8; 18];
    r.read_exact(&mut hello)?;
    if be_u64(&hello[..8]) != NBDMAGIC || be_u64(&hello[8..16]) != IHAVEOPT {
        return Err(invalid("not a fixed-newstyle NBD server"));
    }
    let server_flags = u32::from(u16::from_be_bytes([hello[16], hello[17]]));
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(invalid("server lacks FIXED_NEWSTYLE"));
    }
    w.write_all(&(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)).to_be_bytes())?;
    Ok((r, w))
}

fn send_option(w: &mut TcpStream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg)
}

/// Reads one option reply to `option`: (reply type, data).
fn option_reply(r: &mut BufReader<TcpStream>, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut header = [0u8; 20];
    r.read_exact(&mut header)?;
    if be_u64(&header[..8]) != OPTION_REPLY_MAGIC || be_u32(&header[8..12]) != option {
        return Err(invalid("bad option reply header"));
    }
    let len = be_u32(&header[16..20]);
    if len > 1 << 20 {
        return Err(invalid("option reply too long"));
    }
    let mut data = vec![0; len as usize];
    r.read_exact(&mut data)?;
    Ok((be_u32(&header[12..16]), data))
}

fn fua_flag(fua: bool) -> u16 {
    if fua { CMD_FLAG_FUA } else { 0 }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}
