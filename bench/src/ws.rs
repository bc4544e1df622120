//! Minimal WebSocket and HTTP/1.1 plumbing shared by the load generator and the floor server:
//! a frame reader over a growable buffer, frame encoders, the accept-key derivation, and the
//! /proc and clock helpers. Everything here is deliberately small: the point of the harness is
//! that its own cost per message is a few hundred nanoseconds, not a WebSocket library's.

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest frame either side accepts (the harness never sends anything near it).
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// One parsed frame: its first header byte and where its (unmasked) payload sits in the buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub fin: bool,
    pub op: u8,
    pub start: usize,
    pub len: usize,
}

/// A read buffer holding zero or more frames and at most one partial frame at its end.
pub struct Reader {
    pub buf: Vec<u8>,
    pub start: usize,
    pub end: usize,
}

impl Reader {
    pub fn new(cap: usize) -> Reader {
        Reader {
            buf: vec![0; cap],
            start: 0,
            end: 0,
        }
    }

    /// The bytes read and not consumed yet.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
    }

    pub fn payload(&self, f: &Frame) -> &[u8] {
        &self.buf[f.start..f.start + f.len]
    }

    /// Makes room for at least one more read: moves an incomplete tail to the front, and grows
    /// the buffer when a frame does not fit in it.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let n = self.buf.len() * 2;
            self.buf.resize(n, 0);
        }
    }

    /// One read from a stream this task owns or shares (readiness + try_read: cancel-safe).
    pub async fn fill(&mut self, stream: &TcpStream) -> io::Result<usize> {
        self.make_room();
        loop {
            match stream.try_read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.readable().await?,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next complete frame, unmasking a masked payload in place. `Ok(None)`: need more bytes.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, &'static str> {
        let avail = self.end - self.start;
        if avail < 2 {
            return Ok(None);
        }
        let b = &self.buf[self.start..self.end];
        let b0 = b[0];
        let b1 = b[1];
        if b0 & 0x70 != 0 {
            return Err("reserved bits set (no extension was negotiated)");
        }
        let masked = b1 & 0x80 != 0;
        let (mut hlen, plen) = match b1 & 0x7f {
            126 => {
                if avail < 4 {
                    return Ok(None);
                }
                (4, u16::from_be_bytes([b[2], b[3]]) as usize)
            }
            127 => {
                if avail < 10 {
                    return Ok(None);
                }
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[2..10]);
                let n = u64::from_be_bytes(a);
                if n > MAX_FRAME as u64 {
                    return Err("frame too large");
                }
                (10, n as usize)
            }
            n => (2, n as usize),
        };
        if plen > MAX_FRAME {
            return Err("frame too large");
        }
        let mut key = [0u8; 4];
        if masked {
            if avail < hlen + 4 {
                return Ok(None);
            }
            key.copy_from_slice(&b[hlen..hlen + 4]);
            hlen += 4;
        }
        if avail < hlen + plen {
            return Ok(None);
        }
        let start = self.start + hlen;
        if masked {
            for (i, byte) in self.buf[start..start + plen].iter_mut().enumerate() {
                *byte ^= key[i & 3];
            }
        }
        self.start = start + plen;
        Ok(Some(Frame {
            fin: b0 & 0x80 != 0,
            op: b0 & 0x0f,
            start,
            len: plen,
        }))
    }
}

/// Is this frame masked? (Checked before parsing by the side that must reject it.)
pub fn first_frame_masked(r: &Reader) -> bool {
    r.end - r.start >= 2 && r.buf[r.start + 1] & 0x80 != 0
}

fn header(out: &mut Vec<u8>, op: u8, len: usize, mask: bool) {
    out.push(0x80 | op);
    let m = if mask { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// A server-to-client frame (unmasked), appended to `out`.
pub fn server_frame(out: &mut Vec<u8>, op: u8, payload: &[u8]) {
    header(out, op, payload.len(), false);
    out.extend_from_slice(payload);
}

/// A client-to-server frame (masked with `key`, as RFC 6455 requires).
pub fn client_frame(op: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    header(&mut out, op, payload.len(), true);
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    out
}

/// Sec-WebSocket-Accept for a Sec-WebSocket-Key.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Index of the first byte after "\r\n\r\n", if the head is complete.
pub fn head_end(b: &[u8]) -> Option<usize> {
    memchr::memmem::find(b, b"\r\n\r\n").map(|i| i + 4)
}

/// A header's value in a raw HTTP head (case-insensitive name).
pub fn header_value<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    for line in head.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(colon) = line.iter().position(|&c| c == b':') {
            if line[..colon].eq_ignore_ascii_case(name.as_bytes()) {
                return Some(line[colon + 1..].trim_ascii());
            }
        }
    }
    None
}

/// The unsigned integer right after `key` (e.g. `"seq":`), skipping spaces.
pub fn field_u64(p: &[u8], key: &[u8]) -> Option<u64> {
    let i = memchr::memmem::find(p, key)? + key.len();
    let mut j = i;
    while j < p.len() && p[j] == b' ' {
        j += 1;
    }
    let s = j;
    let mut v: u64 = 0;
    while j < p.len() && p[j].is_ascii_digit() {
        v = v.checked_mul(10)?.checked_add(u64::from(p[j] - b'0'))?;
        j += 1;
    }
    (j > s).then_some(v)
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds, like wsgate's event timestamps.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        d.subsec_millis()
    )
}

/// Resident memory of a process in KiB (VmRSS).
pub fn vm_rss_kib(pid: u32) -> io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS"))
}

/// (utime, stime) of a process in clock ticks, all its threads (live and exited) included.
pub fn cpu_ticks(pid: u32) -> io::Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')').ok_or_else(|| io::Error::other("bad stat"))? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let parse = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| io::Error::other("bad stat"))
    };
    Ok((parse(11)?, parse(12)?))
}

/// Whole-machine CPU from /proc/stat, in clock ticks: (busy, steal). Busy is user + nice +
/// system + irq + softirq (guest time is inside user).
pub fn machine_ticks() -> io::Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let line = s
        .lines()
        .next()
        .ok_or_else(|| io::Error::other("empty /proc/stat"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 8 {
        return Err(io::Error::other("short /proc/stat"));
    }
    Ok((f[0] + f[1] + f[2] + f[5] + f[6], f[7]))
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// This process's CPU time (user, system) in nanoseconds.
pub fn self_cpu_ns() -> (u64, u64) {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    (ns(ru.ru_utime), ns(ru.ru_stime))
}

/// Raises the soft open-files limit to the hard one; returns the limit now in force.
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_masked_and_not() {
        let mut r = Reader::new(8);
        let mut bytes = client_frame(OP_TEXT, b"hello world, this is long", [1, 2, 3, 4]);
        server_frame(&mut bytes, OP_TEXT, &[b'x'; 300]);
        r.buf = bytes.clone();
        r.end = bytes.len();
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(r.payload(&f), b"hello world, this is long");
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(f.len, 300);
        assert!(r.next_frame().unwrap().is_none());
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn fields_and_timestamps() {
        assert_eq!(field_u64(br#"{"seq":42,"ts": 7}"#, br#""seq":"#), Some(42));
        assert_eq!(field_u64(br#"{"seq":42,"ts": 7}"#, br#""ts":"#), Some(7));
        assert_eq!(field_u64(br#"{"seq":"x"}"#, br#""seq":"#), None);
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_795_700_096_789);
        assert_eq!(rfc3339_millis(t), "2026-11-26T13:34:56.789Z");
    }
}
