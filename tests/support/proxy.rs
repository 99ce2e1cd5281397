//! A loopback TCP proxy the tests control: it passes bytes both ways until told to blackhole
//! the connections open at that moment (they stay open, nothing more is forwarded either way,
//! no reset: what a vanished host or a dropped route looks like to a client that is waiting
//! for an answer), or to reset them. Connections made later pass again.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the test can do to one proxied connection.
#[derive(Clone, Default)]
struct Control {
    blackhole: CancellationToken,
    reset: CancellationToken,
}

pub struct Proxy {
    pub port: u16,
    connections: Arc<Mutex<Vec<Control>>>,
    /// Every connection that was opened, blackholed or not (counted for the test's proof
    /// that the client came back on a new one).
    opened: Arc<std::sync::atomic::AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listen");
        let port = listener.local_addr().expect("proxy address").port();
        let connections: Arc<Mutex<Vec<Control>>> = Arc::default();
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accept = tokio::spawn({
            let connections = Arc::clone(&connections);
            let opened = Arc::clone(&opened);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let control = Control::default();
                    connections.lock().unwrap().push(control.clone());
                    opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::spawn(forward(client, server, control));
                }
            }
        });
        Self {
            port,
            connections,
            opened,
            accept,
        }
    }

    /// Stops forwarding on every connection open now, in both directions, without closing it.
    /// Returns how many there were.
    pub fn blackhole(&self) -> usize {
        let mut connections = self.connections.lock().unwrap();
        for control in connections.iter() {
            control.blackhole.cancel();
        }
        let n = connections.len();
        connections.clear();
        n
    }

    /// Resets (RST) every connection open now.
    pub fn reset(&self) -> usize {
        let mut connections = self.connections.lock().unwrap();
        for control in connections.iter() {
            control.reset.cancel();
        }
        let n = connections.len();
        connections.clear();
        n
    }

    /// Connections opened through the proxy so far.
    pub fn opened(&self) -> usize {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset();
    }
}

/// Copies bytes both ways until either side closes, the connection is reset, or it is
/// blackholed (then it holds both sockets open and forwards nothing until reset).
async fn forward(client: TcpStream, server: TcpStream, control: Control) {
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    let mut blackholed = false;
    loop {
        tokio::select! {
            biased;
            () = control.reset.cancelled() => {
                // A zero linger makes the close a reset (RST); it never blocks (only a
                // non-zero linger does, which is why tokio deprecates the setter).
                #[allow(deprecated)]
                let _ = client.set_linger(Some(Duration::ZERO));
                #[allow(deprecated)]
                let _ = server.set_linger(Some(Duration::ZERO));
                return;
            }
            () = control.blackhole.cancelled(), if !blackholed => blackholed = true,
            ready = client.readable(), if !blackholed => {
                if ready.is_err() || !pass(&client, &server, &mut up).await {
                    return;
                }
            }
            ready = server.readable(), if !blackholed => {
                if ready.is_err() || !pass(&server, &client, &mut down).await {
                    return;
                }
            }
        }
    }
}

/// Moves what `from` has to `to`; false once either side is closed or failed.
async fn pass(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> bool {
    let n = match from.try_read(buf) {
        Ok(0) => return false,
        Ok(n) => n,
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return true,
        Err(_) => return false,
    };
    let mut sent = 0;
    while sent < n {
        if to.writable().await.is_err() {
            return false;
        }
        match to.try_write(&buf[sent..n]) {
            Ok(written) => sent += written,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    true
}
