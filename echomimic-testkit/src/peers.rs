//! Peers that misbehave, on a loopback port, for fault tests: an HTTP server that stalls, and
//! a Redis proxy that loses one reply.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// A peer that answers every connection with `200` headers for a 1 MB PNG and then one byte
/// every `every` (`None`: never another byte), each connection for at most 30 s: a download
/// from it never ends on its own. Returns its address.
pub fn stalling_http_peer(every: Option<Duration>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let head =
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n";
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let end = Instant::now() + Duration::from_secs(30);
                while Instant::now() < end {
                    std::thread::sleep(every.unwrap_or(Duration::from_millis(200)));
                    if every.is_some()
                        && stream
                            .write_all(b"x")
                            .and_then(|()| stream.flush())
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A TCP proxy in front of a Redis server that, once [armed](ReplyDroppingProxy::arm), swallows
/// the first non-null reply to a command named `command` (e.g. `BLMOVE`) and closes that
/// connection: the server ran the command, the client never hears of it (a reply lost to a
/// network cut). Everything else is passed through unchanged.
#[derive(Debug)]
pub struct ReplyDroppingProxy {
    addr: SocketAddr,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl ReplyDroppingProxy {
    /// Listens on a loopback port and forwards each connection to `upstream`.
    pub fn start(upstream: SocketAddr, command: &'static str) -> ReplyDroppingProxy {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let armed = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (a, d) = (armed.clone(), dropped.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let pending = Arc::new(AtomicBool::new(false));
                let (a, d) = (a.clone(), d.clone());
                let name = command.to_ascii_uppercase().into_bytes();
                let (mut c_in, mut s_out) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let p = pending.clone();
                // client -> server, noting when the command goes by
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match c_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if buf[..n]
                            .to_ascii_uppercase()
                            .windows(name.len())
                            .any(|w| w == name.as_slice())
                        {
                            p.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Both);
                });
                // server -> client, dropping the armed reply
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    use std::sync::atomic::Ordering::SeqCst;
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let n = match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let reply = &buf[..n];
                        if pending.swap(false, SeqCst) {
                            let null = reply.starts_with(b"$-1\r\n")
                                || reply.starts_with(b"*-1\r\n")
                                || reply.starts_with(b"_\r\n");
                            if !null && a.swap(false, SeqCst) {
                                d.fetch_add(1, SeqCst);
                                break;
                            }
                        }
                        if c_out.write_all(reply).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                    let _ = s_in.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        ReplyDroppingProxy {
            addr,
            armed,
            dropped,
        }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops the next non-null reply to the command.
    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many replies were dropped.
    pub fn dropped(&self) -> u32 {
        self.dropped.load(std::sync::atomic::Ordering::SeqCst)
    }
}
