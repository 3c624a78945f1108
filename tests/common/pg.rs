//! PostgreSQL for fleet tests: `scripts/test-postgres start` (run by `./scripts/test`) runs
//! a throwaway cluster on loopback with a role that may create databases; each test gets a
//! database of its own, dropped after.

use std::sync::atomic::{AtomicU32, Ordering};

/// The throwaway cluster's port (`RV_PG_PORT` overrides it, for the script and the tests).
pub const PORT: u16 = 55432;

pub fn port() -> u16 {
    std::env::var("RV_PG_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(PORT)
}

/// `scripts/test-postgres ACTION` (`halt`: stopped, data kept; `start`); whether it did.
pub fn ctl(action: &str) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-postgres");
    std::process::Command::new(script).arg(action).status().is_ok_and(|s| s.success())
}

/// The role and where its password is (`scripts/test-postgres`).
pub const ROLE: &str = "runnervisor_test";
pub const PASSWORD_FILE: &str = "/var/lib/runnervisor/test-postgres.password";

pub fn password() -> String {
    std::fs::read_to_string(PASSWORD_FILE)
        .unwrap_or_else(|e| panic!("{PASSWORD_FILE}: {e} (scripts/test-postgres start makes it)"))
        .trim()
        .to_string()
}

/// A connection config to `db` on the test cluster.
pub fn config(db: &str) -> tokio_postgres::Config {
    let port = port();
    let mut c = tokio_postgres::Config::new();
    // Loopback: no TLS (Debian's cluster offers its snakeoil certificate, which names no IP).
    c.host("127.0.0.1")
        .port(port)
        .user(ROLE)
        .password(password())
        .dbname(db)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    c
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = config("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL on 127.0.0.1 as {ROLE}: {e} (scripts/test-postgres start starts it)"));
    tokio::spawn(conn);
    client
}

/// A fresh database, dropped (with its connections) when this goes.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub async fn new(tag: &str) -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("rv_{tag}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        admin().await.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.unwrap();
        TestDb { name }
    }

    pub fn config(&self) -> tokio_postgres::Config {
        config(&self.name)
    }

    /// A connection of its own (driven by a spawned task).
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, conn) = self.config().connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    pub fn pool(&self, size: usize) -> runnervisor::fleet::Pool {
        runnervisor::fleet::pool(self.config(), runnervisor::fleet::tls(None).unwrap(), size).unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: a runtime of its own, on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let _ = admin().await.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
            });
        })
        .join();
    }
}

/// A TCP proxy to the test cluster that a test can cut (every connection dropped, new ones
/// refused) and restore: one member's network path to PostgreSQL, partitioned at will.
pub struct Proxy {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (o, c) = (open.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if !o.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cuts = c.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Proxy { port, open, cut, task }
    }

    /// Drops every connection through it and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
