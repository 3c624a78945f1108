//! Fleet mode: several hypervisors share one job queue on PostgreSQL.
//!
//! Any member accepts a delivery: [`intake::FleetIntake`] writes it to PostgreSQL (delivery
//! id dedupe, the job's forward-only row) before the 2xx, and answers 503 when it cannot.
//! The job rows are the queue: each member's scheduler reads the rows it needs and claims
//! from them ([`claims`]), woken by [`listen`]. A single host without `[fleet]` uses none
//! of this.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

pub mod claims;
pub mod intake;
pub mod schema;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("postgresql: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("postgresql pool: {0}")]
    Pool(String),
    #[error("postgresql schema version {found} is newer than this agent knows ({known}): upgrade the agent")]
    SchemaTooNew { found: i32, known: i32 },
    #[error("postgresql schema migration to version {version} failed: {source}")]
    Migration {
        version: i32,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("fleet intake: the writer has stopped")]
    Closed,
    #[error("local store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("postgresql TLS: {0}")]
    Tls(String),
    #[error(
        "another agent with fleet.host_id {host_id:?} is a member of this fleet now: two members with one host id would serve jobs, names and claims as one (give each hypervisor its own host_id)"
    )]
    HostTaken { host_id: String },
}

/// TLS for `sslmode=prefer|require` (the server's certificate is verified against the
/// system's roots, plus `ca_file` when given, and must name the host). Off this host,
/// `prefer` counts as `require` ([`require_tls_off_host`]).
pub fn tls(ca_file: Option<&Path>) -> Result<MakeTlsConnector, FleetError> {
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| FleetError::Tls(format!("{}: {e}", path.display())))?;
        let cert =
            native_tls::Certificate::from_pem(&pem).map_err(|e| FleetError::Tls(format!("{}: {e}", path.display())))?;
        builder.add_root_certificate(cert);
    }
    let connector = builder.build().map_err(|e| FleetError::Tls(e.to_string()))?;
    Ok(MakeTlsConnector::new(connector))
}

/// The IPv4 addresses the fleet's database is reached at (its URL's hosts, resolved; a
/// Unix socket has none): every member's fence drops them, since a job must not reach
/// the queue's server. Empty when the URL cannot be read or the name not resolved.
pub async fn database_addresses(url: &str) -> Vec<std::net::Ipv4Addr> {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else { return Vec::new() };
    let ports = config.get_ports();
    let mut out: Vec<std::net::Ipv4Addr> = config
        .get_hostaddrs()
        .iter()
        .filter_map(|a| match a {
            std::net::IpAddr::V4(v4) => Some(*v4),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    for (i, host) in config.get_hosts().iter().enumerate() {
        let tokio_postgres::config::Host::Tcp(name) = host else { continue };
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        if let Ok(addrs) = tokio::net::lookup_host((name.as_str(), port)).await {
            out.extend(addrs.filter_map(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            }));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Longest a statement may take: a delivery is answered 503 rather than held.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of connections to the fleet's database.
pub type Pool = deadpool_postgres::Pool;

/// A pool for `config` (password and TLS set by the caller), each connection with the
/// statement timeout; `size` connections at most.
pub fn pool(mut config: tokio_postgres::Config, tls: MakeTlsConnector, size: usize) -> Result<Pool, FleetError> {
    let options =
        format!("{} -c statement_timeout={}", config.get_options().unwrap_or(""), STATEMENT_TIMEOUT.as_millis());
    config.options(options.trim_start());
    config.connect_timeout(Duration::from_secs(5));
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tls,
        deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| FleetError::Pool(e.to_string()))
}

/// A connection from `pool`.
pub async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, FleetError> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => FleetError::Db(e),
        other => FleetError::Pool(other.to_string()),
    })
}

/// This host as a member of a fleet: its name, its connections, its settings.
#[derive(Clone)]
pub struct Member {
    pub host_id: String,
    pub pool: Pool,
    /// One connection for renewals and the lead: the pool's may all be busy with a burst
    /// of deliveries and reads, and a lease must not run out behind them.
    pub leases: Pool,
    /// For the `LISTEN` connection (a pooled one cannot hear notifications).
    pub listen: tokio_postgres::Config,
    pub tls: MakeTlsConnector,
    pub lease: Duration,
    pub cold_head_start: Duration,
    /// Set once this member holds its lock on its host id ([`listen`]): it claims no job
    /// before.
    pub joined: Arc<AtomicBool>,
}

/// TLS is required (`sslmode=require`) unless the URL says `disable` or every host is
/// loopback or a Unix socket: `prefer`, libpq's default, falls back to plain text (and the
/// password with it) for anyone on the path who refuses TLS, so off this host it counts
/// as `require`, written or not.
fn require_tls_off_host(pg: &mut tokio_postgres::Config) {
    use tokio_postgres::config::{Host, SslMode};
    if pg.get_ssl_mode() != SslMode::Prefer {
        return;
    }
    // `hostaddr`, when given, is where it connects (the host name then only names the
    // server's certificate).
    let local = match pg.get_hostaddrs() {
        [] => pg.get_hosts().iter().all(|h| match h {
            Host::Tcp(name) => name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback()),
            Host::Unix(_) => true,
        }),
        addrs => addrs.iter().all(|a| a.is_loopback()),
    };
    if !local {
        pg.ssl_mode(SslMode::Require);
    }
}

impl Member {
    /// Builds the connection settings and the pool (connections are made when first
    /// used: a database that is away at start is retried, not fatal).
    pub fn new(
        config: &crate::config::FleetConfig,
        password: Option<&crate::secret::Secret>,
    ) -> Result<Member, FleetError> {
        let mut pg: tokio_postgres::Config =
            config.postgres.url.parse().map_err(|e: tokio_postgres::Error| FleetError::Pool(e.to_string()))?;
        if let Some(p) = password {
            pg.password(p.expose());
        }
        require_tls_off_host(&mut pg);
        if pg.get_application_name().is_none() {
            pg.application_name(format!("runnervisor {}", config.host_id()));
        }
        let tls = tls(config.postgres.ca_file.as_deref())?;
        Ok(Member {
            host_id: config.host_id(),
            pool: pool(pg.clone(), tls.clone(), config.postgres.max_connections)?,
            leases: pool(pg.clone(), tls.clone(), 1)?,
            listen: pg,
            tls,
            lease: config.lease,
            cold_head_start: config.cold_head_start,
            joined: Arc::default(),
        })
    }

    /// Brings the schema up to date, retrying until it can: false on `shutdown`, an error
    /// if the database is not this agent's to use (a newer schema).
    pub async fn migrate(&self, shutdown: &CancellationToken) -> Result<bool, FleetError> {
        let mut logged = false;
        loop {
            let result = async {
                let mut c = client(&self.pool).await?;
                schema::migrate(&mut c).await
            }
            .await;
            match result {
                Ok(applied) => {
                    if !applied.is_empty() {
                        tracing::info!(versions = ?applied, "fleet database schema migrated");
                    }
                    return Ok(true);
                }
                Err(e @ FleetError::SchemaTooNew { .. }) => return Err(e),
                Err(e) => {
                    if !logged {
                        tracing::error!(error = %e, "cannot reach the fleet database; retrying (deliveries are answered 503 meanwhile)");
                        logged = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}

/// Migrates the schema (retrying until the database answers), then holds the member's
/// lock and calls `wake` for each notification until `shutdown` (see [`listen`]).
/// An error: this agent must not be a member (a newer schema, its host id taken); the
/// caller stops.
pub async fn run_member(
    member: Member,
    wake: impl Fn(String) + Send + 'static,
    shutdown: CancellationToken,
) -> Result<(), FleetError> {
    if member.migrate(&shutdown).await? {
        listen(member.listen, member.tls, (member.host_id, member.lease), member.joined, wake, shutdown).await?;
    }
    Ok(())
}

/// The key of the advisory lock a member holds on its `LISTEN` connection for as long as it
/// is up: one per host id (64 bits from it, made by PostgreSQL).
const MEMBER_KEY: &str = "hashtextextended('runnervisor member ' || $1, 0)";

/// Takes the member's lock on `host_id` on `client`; `Ok((false, _))`: a live member with
/// this host id holds it. The lock is taken from a session that is not a live member's:
/// this member's own previous `LISTEN` session (`stale`, which the server may keep, with
/// its lock, after a cut path the member gave up on), or any session while no member with
/// this host id has written its heartbeat for a `lease` (an agent that died, its session
/// not yet noticed gone). Returns this connection's server process too.
pub async fn join(
    client: &tokio_postgres::Client,
    host_id: &str,
    stale: Option<i32>,
    lease: Duration,
) -> Result<(bool, i32), FleetError> {
    let lock = format!("SELECT pg_try_advisory_lock({MEMBER_KEY})");
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    if client.query_one(&lock, &[&host_id]).await?.get(0) {
        return Ok((true, pid));
    }
    // A bigint advisory key shows in pg_locks as its high half (classid) and low half (objid).
    let holder = client
        .query_opt(
            &format!(
                "WITH k AS (SELECT {MEMBER_KEY} AS k) \
                 SELECT l.pid FROM pg_locks l, k WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND l.classid = ((k.k >> 32) & 4294967295)::oid AND l.objid = (k.k & 4294967295)::oid"
            ),
            &[&host_id],
        )
        .await?
        .map(|r| r.get::<_, i32>(0));
    let lease_ms = lease.as_millis() as f64;
    let quiet: bool = client
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM rv_members WHERE host_id = $1 \
             AND seen_at > now() - make_interval(secs => $2::float8 / 1000))",
            &[&host_id, &lease_ms],
        )
        .await?
        .get(0);
    let Some(holder) = holder.filter(|h| Some(*h) == stale || quiet) else {
        return Ok((false, pid));
    };
    tracing::warn!(
        host_id,
        session = holder,
        "this member's lock is held by a session no live member has (its own, left by a cut path or a crash): ending that session"
    );
    client.execute("SELECT pg_terminate_backend($1)", &[&holder]).await?;
    // The ended session lets go of its locks as its process exits.
    for _ in 0..20 {
        if client.query_one(&lock, &[&host_id]).await?.get(0) {
            return Ok((true, pid));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((false, pid))
}

/// `LISTEN`s on a connection of its own (a pooled one cannot deliver notifications) and
/// calls `wake` with each notification's payload ([`intake::CHANNEL`] says what it is), and
/// with an empty one once (re)connected; reconnects after an error.
/// The same connection holds the member's lock on `host_id` ([`join`]): `joined` is set
/// once it is held (the scheduler claims nothing before), and a live member holding it is
/// an error (two agents with one host id).
pub async fn listen(
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
    member: (String, Duration),
    joined: Arc<AtomicBool>,
    wake: impl Fn(String) + Send + 'static,
    shutdown: CancellationToken,
) -> Result<(), FleetError> {
    let (host_id, lease) = member;
    let mut previous: Option<i32> = None;
    let mut logged = false;
    loop {
        let failed = match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                // The connection is driven apart; its notifications come through `heard`,
                // which closes when it does.
                let (tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(m)) = messages.next().await {
                        if let AsyncMessage::Notification(n) = m
                            && tx.send(n.payload().to_string()).is_err()
                        {
                            return;
                        }
                    }
                });
                let setup = async {
                    let (locked, pid) = join(&client, &host_id, previous, lease).await?;
                    if locked {
                        // Held from now on: a cut before the LISTEN leaves this session.
                        previous = Some(pid);
                        client.batch_execute(&format!("LISTEN {}", intake::CHANNEL)).await?;
                    }
                    Ok::<bool, FleetError>(locked)
                };
                let failed = match setup.await {
                    Ok(true) => {
                        joined.store(true, Ordering::Release);
                        logged = false;
                        wake(String::new());
                        loop {
                            tokio::select! {
                                _ = shutdown.cancelled() => {
                                    driver.abort();
                                    return Ok(());
                                }
                                m = heard.recv() => match m {
                                    Some(payload) => wake(payload),
                                    None => break,
                                },
                            }
                        }
                        "the connection was lost".to_string()
                    }
                    Ok(false) => {
                        driver.abort();
                        return Err(FleetError::HostTaken { host_id });
                    }
                    Err(e) => e.to_string(),
                };
                driver.abort();
                failed
            }
            Err(e) => e.to_string(),
        };
        if !logged {
            tracing::warn!(error = %failed, "fleet LISTEN connection down (it holds this member's lock; claims go on while they can); reconnecting");
            logged = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// What `runnervisor check` reports about the fleet's database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub server_version: String,
    pub database: String,
    pub user: String,
    /// 0: not created yet (the agent creates it at start).
    pub schema: i32,
    /// Privileges the agent needs and lacks (`CREATE on database`, `UPDATE on rv_jobs`, ...).
    pub missing: Vec<String>,
}

/// Connects, reads the schema version, and checks the privileges the agent needs.
pub async fn probe(pool: &Pool) -> Result<Probe, FleetError> {
    let c = client(pool).await?;
    let row = c.query_one("SELECT current_setting('server_version'), current_database(), current_user", &[]).await?;
    let schema_version = schema::version(&c).await?;
    let mut missing = Vec::new();
    if schema_version < schema::latest() {
        let create: bool =
            c.query_one("SELECT has_database_privilege(current_database(), 'CREATE')", &[]).await?.get(0);
        if !create {
            missing.push("CREATE on the database (to create the schema)".to_string());
        }
    }
    // Every table the agent writes, and those the lead prunes (rv_events, the log of
    // earlier versions, is only emptied).
    #[rustfmt::skip]
    let tables: [(&str, &[&str]); 6] = [
        ("rv_deliveries", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
        ("rv_jobs", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
        ("rv_leader", &["SELECT", "INSERT", "UPDATE"]),
        ("rv_members", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
        ("rv_runner_list", &["SELECT", "INSERT", "UPDATE"]),
        ("rv_events", &["SELECT", "DELETE"]),
    ];
    for (table, privileges) in tables {
        let exists: bool = c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.get(0);
        if !exists {
            continue;
        }
        for privilege in privileges {
            let has: bool = c.query_one("SELECT has_table_privilege($1, $2)", &[&table, &privilege]).await?.get(0);
            if !has {
                missing.push(format!("{privilege} on {table}"));
            }
        }
    }
    Ok(Probe { server_version: row.get(0), database: row.get(1), user: row.get(2), schema: schema_version, missing })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_databases_addresses_come_from_its_url() {
        let a = super::database_addresses("postgres://rv@127.0.0.5:5433/x?sslmode=disable").await;
        assert_eq!(a, [std::net::Ipv4Addr::new(127, 0, 0, 5)]);
        let a = super::database_addresses("host=localhost,192.0.2.9 user=rv dbname=x").await;
        assert!(a.contains(&std::net::Ipv4Addr::LOCALHOST) && a.contains(&"192.0.2.9".parse().unwrap()), "{a:?}");
        assert!(super::database_addresses("host=/run/postgresql user=rv").await.is_empty(), "a Unix socket");
        assert!(super::database_addresses("not a url ===").await.is_empty());
    }

    #[test]
    fn tls_is_required_off_this_host_unless_the_url_says_disable() {
        use tokio_postgres::config::SslMode::{self, *};
        #[rustfmt::skip]
        let table: [(&str, SslMode); 11] = [
            ("postgres://rv@db.example.net/rv", Require),
            ("postgres://rv@198.51.100.7:5432/rv", Require),
            ("host=127.0.0.1,db.example.net user=rv", Require),
            ("postgres://rv@127.0.0.1:55432/rv", Prefer),
            ("host=localhost user=rv", Prefer),
            ("host=/run/postgresql user=rv", Prefer),
            ("postgres://rv@db.example.net/rv?sslmode=disable", Disable),
            ("host=db.example.net sslmode = disable user=rv", Disable),
            // Written or not, prefer gives the password to whoever refuses TLS on the path.
            ("postgres://rv@db.example.net/rv?sslmode=prefer", Require),
            ("host=db.example.net user=rv sslmode=prefer", Require),
            ("postgres://rv@127.0.0.1/rv?sslmode=prefer", Prefer),
        ];
        let mut pg: tokio_postgres::Config = "host=db.example.net hostaddr=127.0.0.1 user=rv".parse().unwrap();
        super::require_tls_off_host(&mut pg);
        assert_eq!(pg.get_ssl_mode(), Prefer, "a name reached at a loopback address");
        let mut pg: tokio_postgres::Config = "host=localhost hostaddr=198.51.100.7 user=rv".parse().unwrap();
        super::require_tls_off_host(&mut pg);
        assert_eq!(pg.get_ssl_mode(), Require, "localhost by name, reached off this host");
        for (url, want) in table {
            let mut pg: tokio_postgres::Config = url.parse().unwrap();
            super::require_tls_off_host(&mut pg);
            assert_eq!(pg.get_ssl_mode(), want, "{url}");
        }
    }
}
