//! systemd readiness notification (`sd_notify`), std-only: a datagram to `$NOTIFY_SOCKET`.
//! A no-op when the variable is unset (not started by systemd with `Type=notify`).

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `"READY=1"`, `"STOPPING=1"`, `"RELOADING=1"`) to systemd, if it listens.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (Linux): '@' stands for the leading NUL byte.
        abstract_addr(name).and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets need Linux",
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // Only this test sets the variable, and it reads it back at once.
        std::env::set_var("NOTIFY_SOCKET", &path);
        super::sd_notify("READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
