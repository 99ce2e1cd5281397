//! A private PostgreSQL server for one test: one that must run with TLS only, or that the test
//! stops and restarts (the shared server on :5432 serves every other test and is never touched).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::tls::Certs;
use super::{free_address, wait_listening, wait_until};

pub struct PrivatePostgres {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    tls: bool,
    /// Extra `-c name=value` server settings.
    settings: Vec<String>,
}

fn sh(command: &str) {
    let out = Command::new("sh").args(["-ec", command]).output().unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
}

fn postgres_id(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

impl PrivatePostgres {
    /// Creates a cluster (trust auth for `postgres`) and starts it on a free loopback port.
    /// With `certs`, the server presents `server.crt` and accepts only TLS connections.
    pub async fn start(certs: Option<&Certs>) -> Self {
        Self::start_with(certs, &[]).await
    }

    /// [`PrivatePostgres::start`] with extra server settings (`name=value`).
    pub async fn start_with(certs: Option<&Certs>, settings: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .max()
            .unwrap();
        let hba = if certs.is_some() {
            "hostssl all all 127.0.0.1/32 trust\\nhost all all 127.0.0.1/32 reject\\nhost all all ::1/128 reject\\n"
        } else {
            "local all all trust\\nhost all all 127.0.0.1/32 trust\\n"
        };
        let copy_certs = certs.map_or(String::new(), |c| {
            format!(
                "cp {} {} {d}/ && chmod 600 {d}/server.key",
                c.path("server.crt").display(),
                c.path("server.key").display()
            )
        });
        let init = format!(
            "{copy_certs}
             mkdir {d}/data && chown -R postgres {d} && chmod 755 {d}
             runuser -u postgres -- {bin}/initdb -D {d}/data -A trust -U postgres >/dev/null
             printf '{hba}' > {d}/data/pg_hba.conf",
            bin = bin.display()
        );
        tokio::task::spawn_blocking(move || sh(&init))
            .await
            .unwrap();
        let mut server = Self {
            child: None,
            port: free_address().port(),
            bin,
            dir,
            tls: certs.is_some(),
            settings: settings.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.start_server().await;
        server
    }

    /// Starts the server on its data directory and port and waits until it accepts
    /// connections. Started directly as the postgres user (not through runuser), so signals
    /// reach the server itself.
    pub async fn start_server(&mut self) {
        let d = self.dir.path().display().to_string();
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .uid(postgres_id("-u"))
            .gid(postgres_id("-g"))
            .args(["-D", &format!("{d}/data"), "-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={d}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for setting in &self.settings {
            command.args(["-c", setting]);
        }
        if self.tls {
            command.args([
                "-c",
                "ssl=on",
                "-c",
                &format!("ssl_cert_file={d}/server.crt"),
                "-c",
                &format!("ssl_key_file={d}/server.key"),
            ]);
        }
        self.child = Some(command.spawn().unwrap());
        wait_listening(self.port, "private PostgreSQL").await;
        // Listening is not ready: until recovery ends, sessions are refused with "the database
        // system is starting up". pg_isready tells the two apart.
        let ready = self.bin.join("pg_isready");
        let port = self.port.to_string();
        wait_until(
            Duration::from_secs(60),
            "private PostgreSQL accepting sessions",
            || {
                let ready = ready.clone();
                let port = port.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        Command::new(ready)
                            .args(["-q", "-h", "127.0.0.1", "-p", &port])
                            .status()
                            .is_ok_and(|s| s.success())
                    })
                    .await
                    .unwrap()
                }
            },
        )
        .await;
    }

    /// Stops the server: SIGINT is a fast shutdown (sessions terminated, clean checkpoint),
    /// SIGQUIT an immediate one (no checkpoint: crash recovery at the next start).
    pub async fn stop(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
            tokio::task::spawn_blocking(move || child.wait())
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// URL of database `postgres` on this server (plain; TLS servers need their own URL).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// URL for a TLS server, verifying its certificate against `ca` (a file of `certs`).
    pub fn tls_url(&self, certs: &Certs, ca: &str) -> String {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            self.port,
            certs.path(ca).display()
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            let _ = child.wait();
        }
    }
}
