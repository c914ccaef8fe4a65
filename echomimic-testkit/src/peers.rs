//! HTTP peers that misbehave, on a loopback port, for transfer fault tests.

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
