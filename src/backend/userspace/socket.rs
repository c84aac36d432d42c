//! The UAPI socket client: one connection per transaction to
//! `/var/run/wireguard/<interface>.sock`, with timeouts. Answers can hold keys, so they
//! are returned in zeroing buffers.

use std::io::{self, Read, Write};
use std::ops::ControlFlow;
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

/// Sends `request` and reads the answer up to its terminating blank line, whole: each
/// line with its newline, the blank line left out ([`transact_lines`] reads it).
/// Connecting and sending give up after `timeout`; each read of the answer waits up to
/// `answer_wait` (wireguard-go answers a `set` only when its work is done), so a stopped
/// wireguard-go is found as soon as with a short wait.
pub(super) fn transact_waiting(
    path: &Path,
    request: &[u8],
    timeout: Duration,
    answer_wait: Duration,
) -> io::Result<Zeroizing<String>> {
    let mut answer = Zeroizing::new(Vec::with_capacity(64));
    lines(path, request, timeout, answer_wait, |line| {
        extend_zeroizing(&mut answer, line.as_bytes());
        extend_zeroizing(&mut answer, b"\n");
        ControlFlow::Continue(())
    })?;
    // Whole lines of UTF-8 (checked by `transact_lines`): the bytes are kept, not copied.
    let text = String::from_utf8(std::mem::take(&mut *answer))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "UAPI answer is not UTF-8"))?;
    Ok(Zeroizing::new(text))
}

/// Sends `request` and hands the answer to `each`, one line at a time without its
/// newline, until `each` breaks or the answer's terminating blank line. Only the line
/// being read is buffered (in a zeroing buffer), whatever the answer's size: a `get` of
/// 50,000 peers is about 20 MB of text.
pub(super) fn transact_lines(
    path: &Path,
    request: &[u8],
    timeout: Duration,
    each: impl FnMut(&str) -> ControlFlow<()>,
) -> io::Result<()> {
    lines(path, request, timeout, timeout, each)
}

/// [`transact_lines`], each read of the answer waiting up to `answer_wait`.
fn lines(
    path: &Path,
    request: &[u8],
    timeout: Duration,
    answer_wait: Duration,
    mut each: impl FnMut(&str) -> ControlFlow<()>,
) -> io::Result<()> {
    let mut stream = connect(path, timeout)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(answer_wait))?;
    stream.write_all(request)?;
    let mut chunk = Zeroizing::new([0u8; 8192]);
    // A UAPI line is short (a key is 64 hex digits): this never grows in practice.
    let mut partial = Zeroizing::new(Vec::with_capacity(1024));
    let mut total = 0usize;
    loop {
        let n = match stream.read(&mut chunk[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(());
        }
        total += n;
        if total > MAX_ANSWER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "UAPI answer larger than 256 MiB",
            ));
        }
        let mut rest = &chunk[..n];
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            let line = if partial.is_empty() {
                &rest[..at]
            } else {
                extend_zeroizing(&mut partial, &rest[..at]);
                &partial[..]
            };
            let text = std::str::from_utf8(line).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "UAPI answer is not UTF-8")
            })?;
            // The blank line ends the answer.
            if text.is_empty() || each(text).is_break() {
                return Ok(());
            }
            partial.clear();
            rest = &rest[at + 1..];
        }
        extend_zeroizing(&mut partial, rest);
    }
}

/// Appends to a zeroing buffer; growing copies into a new one, so no key stays behind in
/// a freed allocation.
fn extend_zeroizing(buf: &mut Zeroizing<Vec<u8>>, bytes: &[u8]) {
    if buf.len() + bytes.len() > buf.capacity() {
        let mut bigger = Zeroizing::new(Vec::with_capacity((buf.len() + bytes.len()) * 2));
        bigger.extend_from_slice(buf);
        *buf = bigger;
    }
    buf.extend_from_slice(bytes);
}

/// True when something answers on the socket: an empty `set` transaction (it configures
/// nothing) answered with `errno=`. Not a `get`: wireguard-go writes out every peer before
/// the first byte of a `get` answer (30–80 ms at 10,000 peers, on every start and every
/// backend check), while an empty `set` is answered at once whatever the number of peers.
pub(super) fn answers(path: &Path, timeout: Duration) -> bool {
    let mut errno = false;
    let read = transact_lines(path, b"set=1\n\n", timeout, |line| {
        errno = line.starts_with("errno=");
        if errno {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    read.is_ok() && errno
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;

    /// A one-shot UAPI server: reads the request up to its blank line, then writes
    /// `answer` in pieces of `piece` bytes (so lines are cut across reads).
    fn serve(
        dir: &Path,
        answer: String,
        piece: usize,
    ) -> (std::path::PathBuf, thread::JoinHandle<Vec<u8>>) {
        let path = dir.join("wgt.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\n\n") {
                stream.read_exact(&mut byte).unwrap();
                request.push(byte[0]);
            }
            for part in answer.as_bytes().chunks(piece) {
                // The reader may stop early (it has what it wants): a closed socket is fine.
                if stream
                    .write_all(part)
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    return request;
                }
            }
            request
        });
        (path, server)
    }

    fn peer_lines(n: usize) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "public_key={:064x}\nallowed_ip=10.0.{}.{}/32\nrx_bytes={i}\n",
                    i + 1,
                    i / 256,
                    i % 256
                )
            })
            .collect()
    }

    /// Lines cut at every size of piece, and across the reader's own 8 KiB chunks, arrive
    /// whole and in order; the blank line ends the answer.
    #[test]
    fn lines_arrive_whole_however_the_answer_is_cut() {
        let answer = format!("listen_port=51820\n{}errno=0\n\n", peer_lines(300));
        let want: Vec<String> = answer
            .lines()
            .take_while(|l| !l.is_empty())
            .map(String::from)
            .collect();
        for piece in [1, 7, 64, 8191, 8192, 100_000] {
            let dir = tempfile::tempdir().unwrap();
            let (path, server) = serve(dir.path(), answer.clone(), piece);
            let mut got = Vec::new();
            transact_lines(&path, b"get=1\n\n", Duration::from_secs(5), |l| {
                got.push(l.to_string());
                ControlFlow::Continue(())
            })
            .unwrap();
            server.join().unwrap();
            assert_eq!(got, want, "pieces of {piece} bytes");
        }
    }

    /// The parser fed line by line from the socket gives what `parse_get` gives on the
    /// whole text; `answers` reads past any other lines to the `errno=` line.
    #[test]
    fn a_get_parsed_as_it_arrives_equals_the_whole_text_parsed() {
        let answer = format!("listen_port=51820\n{}errno=0\n\n", peer_lines(2000));
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(dir.path(), answer.clone(), 4096 + 13);
        let mut parser = super::super::uapi::GetParser::default();
        transact_lines(&path, b"get=1\n\n", Duration::from_secs(5), |l| {
            parser.line(l)
        })
        .unwrap();
        server.join().unwrap();
        let streamed = parser.finish().unwrap();
        assert_eq!(streamed.peers.len(), 2000);
        assert_eq!(streamed, super::super::uapi::parse_get(&answer).unwrap());

        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(dir.path(), answer, 8192);
        assert!(answers(&path, Duration::from_secs(5)));
        server.join().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(dir.path(), peer_lines(10) + "\n", 8192);
        assert!(!answers(&path, Duration::from_secs(5)), "no errno line");
        server.join().unwrap();
    }

    /// `transact_waiting` reads through `transact_lines`: the answer's lines up to the blank line,
    /// however cut, and nothing after it.
    #[test]
    fn a_whole_answer_ends_at_its_blank_line() {
        for piece in [1, 3, 8192] {
            let dir = tempfile::tempdir().unwrap();
            let answer = "errno=0\n\nlisten_port=1\n".to_string();
            let (path, server) = serve(dir.path(), answer, piece);
            let five = Duration::from_secs(5);
            let got = transact_waiting(&path, b"set=1\n\n", five, five).unwrap();
            server.join().unwrap();
            assert_eq!(got.as_str(), "errno=0\n", "pieces of {piece} bytes");
        }
    }

    /// The liveness probe asks for nothing to be written out: an empty `set`, not a `get`
    /// (which wireguard-go answers only after formatting every peer).
    #[test]
    fn the_liveness_probe_is_an_empty_set_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(dir.path(), "errno=0\n\n".into(), 8192);
        assert!(answers(&path, Duration::from_secs(5)));
        assert_eq!(server.join().unwrap(), b"set=1\n\n");
    }

    #[test]
    fn an_answer_that_is_not_utf8_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgt.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 7];
            stream.read_exact(&mut request).unwrap();
            let _ = stream.write_all(b"listen_port=\xff\nerrno=0\n\n");
        });
        let e = transact_lines(&path, b"get=1\n\n", Duration::from_secs(5), |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        server.join().unwrap();
    }
}
