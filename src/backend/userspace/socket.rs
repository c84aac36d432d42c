//! The UAPI socket client: one connection per transaction to
//! `/var/run/wireguard/<interface>.sock`, with timeouts. Answers can hold keys, so they
//! are returned in zeroing buffers.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

/// The largest answer read (a `get` of many thousand peers stays far below).
const MAX_ANSWER: usize = 256 * 1024 * 1024;

/// Connects with a deadline: a wireguard-go that is stopped (not accepting) must not
/// block the agent's event loop.
fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.connect_timeout(&socket2::SockAddr::unix(path)?, timeout)?;
    socket.set_nonblocking(false)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// Sends `request` and reads the answer up to its terminating blank line.
pub(super) fn transact(
    path: &Path,
    request: &[u8],
    timeout: Duration,
) -> io::Result<Zeroizing<String>> {
    let mut stream = connect(path, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request)?;
    let mut answer = Zeroizing::new(Vec::with_capacity(4096));
    let mut chunk = Zeroizing::new([0u8; 8192]);
    loop {
        let n = match stream.read(&mut chunk[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        if answer.len() + n > answer.capacity() {
            // Grow by copying into a new zeroing buffer, so no key stays behind in a
            // freed allocation.
            let mut bigger = Zeroizing::new(Vec::with_capacity((answer.len() + n) * 2));
            bigger.extend_from_slice(&answer);
            answer = bigger;
        }
        answer.extend_from_slice(&chunk[..n]);
        if answer.ends_with(b"\n\n") {
            break;
        }
        if answer.len() > MAX_ANSWER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "UAPI answer larger than 256 MiB",
            ));
        }
    }
    let text = std::str::from_utf8(&answer)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "UAPI answer is not UTF-8"))?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// True when something answers on the socket (a `get` that ends in `errno=`).
pub(super) fn answers(path: &Path, timeout: Duration) -> bool {
    matches!(transact(path, b"get=1\n\n", timeout), Ok(a) if a.contains("errno="))
}
