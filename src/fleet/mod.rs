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
/// system's roots, plus `ca_file` when given, and must name the host).
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
    /// For the `LISTEN` connection (a pooled one cannot hear notifications).
    pub listen: tokio_postgres::Config,
    pub tls: MakeTlsConnector,
    pub lease: Duration,
    pub cold_head_start: Duration,
    /// Set once this member holds its lock on its host id ([`listen`]): it claims no job
    /// before.
    pub joined: Arc<AtomicBool>,
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
        if pg.get_application_name().is_none() {
            pg.application_name(format!("runnervisor {}", config.host_id()));
        }
        let tls = tls(config.postgres.ca_file.as_deref())?;
        Ok(Member {
            host_id: config.host_id(),
            pool: pool(pg.clone(), tls.clone(), config.postgres.max_connections)?,
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
/// lock and calls `wake` for each change of a job row until `shutdown` (see [`listen`]).
/// An error: this agent must not be a member (a newer schema, its host id taken); the
/// caller stops.
pub async fn run_member(
    member: Member,
    wake: impl Fn() + Send + 'static,
    shutdown: CancellationToken,
) -> Result<(), FleetError> {
    if member.migrate(&shutdown).await? {
        listen(member.listen, member.tls, member.host_id, member.joined, wake, shutdown).await?;
    }
    Ok(())
}

/// The advisory lock a member holds on its `LISTEN` connection for as long as it is up:
/// one per host id (a key of 64 bits from it, made by PostgreSQL).
const MEMBER_LOCK: &str = "SELECT pg_try_advisory_lock(hashtextextended('runnervisor member ' || $1, 0))";

/// Takes the member's lock on `host_id` on `client`; `Ok(false)`: another session holds
/// it. `stale`: the server process of this member's previous `LISTEN` connection, which
/// the server may still keep (and its lock with it) after a cut path the client gave up
/// on: it is ended first (only if it is still a session of this user and application).
/// Returns this connection's server process too.
pub async fn join(
    client: &tokio_postgres::Client,
    host_id: &str,
    stale: Option<i32>,
) -> Result<(bool, i32), FleetError> {
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let Some(stale) = stale.filter(|p| *p != pid) else {
        return Ok((client.query_one(MEMBER_LOCK, &[&host_id]).await?.get(0), pid));
    };
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 \
             AND usename = current_user AND application_name = current_setting('application_name')",
            &[&stale],
        )
        .await?;
    // The ended session lets go of its locks as its process exits.
    for _ in 0..20 {
        if client.query_one(MEMBER_LOCK, &[&host_id]).await?.get(0) {
            return Ok((true, pid));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((false, pid))
}

/// `LISTEN`s on a connection of its own (a pooled one cannot deliver notifications) and
/// calls `wake` for each notification, and once (re)connected; reconnects after an error.
/// The same connection holds the member's lock on `host_id` ([`join`]): `joined` is set
/// once it is held (the scheduler claims nothing before), and another session holding it
/// is an error (two agents with one host id).
pub async fn listen(
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
    host_id: String,
    joined: Arc<AtomicBool>,
    wake: impl Fn() + Send + 'static,
    shutdown: CancellationToken,
) -> Result<(), FleetError> {
    let mut previous: Option<i32> = None;
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let statement = format!("LISTEN {}", intake::CHANNEL);
                // The connection must be polled for the statements to complete.
                let stale = previous;
                let setup = async {
                    let (locked, pid) = join(&client, &host_id, stale).await?;
                    if locked {
                        client.batch_execute(&statement).await?;
                    }
                    Ok::<(bool, i32), FleetError>((locked, pid))
                };
                let mut setup = std::pin::pin!(setup);
                let ok = loop {
                    tokio::select! {
                        r = &mut setup => match r {
                            Ok((true, pid)) => {
                                previous = Some(pid);
                                break true;
                            }
                            Ok((false, _)) => return Err(FleetError::HostTaken { host_id: host_id.clone() }),
                            Err(e) => {
                                tracing::debug!(error = %e, "fleet LISTEN connection failed; retrying");
                                break false;
                            }
                        },
                        m = messages.next() => if m.is_none() { break false },
                    }
                };
                if ok {
                    joined.store(true, Ordering::Release);
                    wake();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            m = messages.next() => match m {
                                Some(Ok(AsyncMessage::Notification(_))) => wake(),
                                Some(Ok(_)) => {}
                                Some(Err(_)) | None => break,
                            },
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "fleet LISTEN connection failed; retrying"),
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
    for table in ["rv_deliveries", "rv_events", "rv_jobs", "rv_leader"] {
        let exists: bool = c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.get(0);
        if !exists {
            continue;
        }
        for privilege in ["SELECT", "INSERT", "UPDATE"] {
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
}
