//! Opens fluxo's database, PostgreSQL or SQLite, with settings that keep
//! committed money durable, and hides the one behavioural difference between
//! them that the services must respect: SQLite admits one writer at a time.

pub mod migration;

use std::{path::Path, sync::Arc, time::Duration};

pub use sea_orm::DbErr;
use sea_orm::{ConnectOptions, DatabaseConnection, DbBackend};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Mutex, MutexGuard};

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// `postgres://…` or `sqlite://path`; may carry a password, so it stays secret.
    pub url: SecretString,
    /// Largest number of pooled connections.
    pub max_connections: u32,
    /// How long to wait for a free pooled connection before failing the call.
    pub acquire_timeout: Duration,
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no supported database.
    #[error(
        "database.url must start with postgres://, postgresql:// or sqlite:// (got a URL starting with {scheme:?})"
    )]
    UnsupportedScheme {
        /// What the URL started with (never the rest: it may hold a password).
        scheme: String,
    },
    /// The directory for the SQLite file could not be created.
    #[error("cannot create the directory {dir} for the SQLite database: {source}")]
    CreateDir {
        /// The directory.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The server or file refused the connection.
    #[error("cannot connect to the {backend} database: {reason}")]
    Connect {
        /// `PostgreSQL` or `SQLite`.
        backend: &'static str,
        /// The driver's reason, with any URL credentials removed.
        reason: String,
    },
}

/// Why a store could not read or write, in terms a caller can act on. Every
/// store of fluxo answers with this one enum; the gRPC edge maps it to a status
/// in one place (`fluxo_server::status`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached, or refused for a passing reason (a
    /// deadlock, a serialization failure, a busy SQLite file): another attempt
    /// may pass.
    #[error("database unavailable: {0}")]
    Unavailable(DbErr),
    /// The database refused the statement (a constraint, a type).
    #[error("database error: {0}")]
    Failed(DbErr),
    /// A sum would leave 64-bit minor units. `field` names the request field
    /// whose value took it there, when a request did.
    #[error("{message}")]
    OutOfRange {
        /// What passed the limit.
        message: String,
        /// The request field to blame, if any.
        field: Option<&'static str>,
    },
    /// A stored row that no longer parses: a bug or a hand edit, never caller input.
    #[error("stored {what} is unreadable: {reason}")]
    Corrupt {
        /// The row, e.g. `entry 01J…`.
        what: String,
        /// What did not parse.
        reason: String,
    },
    /// A broken invariant inside the store: a bug, never the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DbErr> for StoreError {
    fn from(error: DbErr) -> Self {
        match error {
            DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => Self::Unavailable(error),
            other if is_transient(&other) => Self::Unavailable(other),
            other => Self::Failed(other),
        }
    }
}

impl StoreError {
    /// Whether another attempt may pass.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// Whether the database refused a statement because a number left its
    /// column's range (see [`is_out_of_range`]).
    pub fn is_out_of_range(&self) -> bool {
        match self {
            Self::OutOfRange { .. } => true,
            Self::Failed(e) => is_out_of_range(e),
            _ => false,
        }
    }
}

/// Refusals that say nothing about the statement: a deadlock, a serialization
/// failure, a timeout or a busy SQLite file. Another attempt may pass.
pub fn is_transient(error: &DbErr) -> bool {
    let text = error.to_string();
    ["deadlock detected", "could not serialize", "canceling statement", "database is locked", "lock timeout"]
        .iter()
        .any(|t| text.contains(t))
}

/// An open database: a connection pool plus, for SQLite, the process-wide
/// writer lock. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    conn: DatabaseConnection,
    // SQLite has one writer; a transaction that reads and then writes can fail
    // with SQLITE_BUSY instead of waiting when another writer got there first.
    // Queueing writers here makes them wait in order instead.
    writer: Option<Arc<Mutex<()>>>,
}

/// Held while writing; a no-op on PostgreSQL, which locks rows itself.
#[derive(Debug)]
pub struct WriteGuard<'a>(#[allow(dead_code)] Option<MutexGuard<'a, ()>>);

impl Db {
    /// Opens the database named by `config.url`, failing when it does not answer.
    pub async fn connect(config: &DbConfig) -> Result<Self, DbError> {
        Self::open(config, false).await
    }

    /// Like [`Db::connect`], but a PostgreSQL pool is created without connecting: the first
    /// query connects. For a server that must start while the database is down (its readiness
    /// reports why until the database answers). SQLite opens its file at once either way.
    pub async fn connect_lazy(config: &DbConfig) -> Result<Self, DbError> {
        Self::open(config, true).await
    }

    async fn open(config: &DbConfig, lazy: bool) -> Result<Self, DbError> {
        let url = config.url.expose_secret();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            DbBackend::Postgres
        } else if url.starts_with("sqlite:") {
            DbBackend::Sqlite
        } else {
            let scheme = url.split(':').next().unwrap_or_default().chars().take(16).collect();
            return Err(DbError::UnsupportedScheme { scheme });
        };
        let mut options = ConnectOptions::new(url.to_owned());
        options
            .max_connections(config.max_connections)
            .min_connections(1)
            .acquire_timeout(config.acquire_timeout)
            .connect_timeout(Duration::from_secs(5))
            // Statement logging would print every query with its bound values.
            .sqlx_logging(false)
            .connect_lazy(lazy && backend == DbBackend::Postgres);
        if backend == DbBackend::Sqlite {
            if let Some(dir) = sqlite_file(url).and_then(Path::parent).filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|source| DbError::CreateDir { dir: dir.display().to_string(), source })?;
            }
            options.map_sqlx_sqlite_opts(|o| {
                o.create_if_missing(true)
                    // WAL lets readers proceed while one writer commits; FULL
                    // syncs each commit so an acknowledged entry survives power loss.
                    .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
            });
        }
        let conn = sea_orm::Database::connect(options).await.map_err(|e| DbError::Connect {
            backend: backend_name(backend),
            reason: redact(&e.to_string(), url),
        })?;
        let writer = (backend == DbBackend::Sqlite).then(|| Arc::new(Mutex::new(())));
        observe_pool(&conn, config.max_connections);
        Ok(Self { conn, writer })
    }

    /// The connection pool.
    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// Which database this is.
    pub fn backend(&self) -> DbBackend {
        self.conn.get_database_backend()
    }

    /// Waits for the right to write (SQLite) or returns at once (PostgreSQL).
    pub async fn write_guard(&self) -> WriteGuard<'_> {
        match &self.writer {
            Some(lock) => WriteGuard(Some(lock.lock().await)),
            None => WriteGuard(None),
        }
    }

    /// Answers whether the database takes a query right now.
    pub async fn ping(&self) -> Result<(), DbErr> {
        self.conn.ping().await
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(self) -> Result<(), DbErr> {
        self.conn.close().await
    }
}

/// Reports the pool's connections, by state (`idle`, `used`), as
/// `db.client.connection.count`, and its limit as `db.client.connection.max`
/// (OpenTelemetry semantic conventions), read from the sqlx pool whenever
/// metrics are collected. The callbacks stay registered for the life of the
/// process (after `close` they report an empty pool): a target opens one pool.
fn observe_pool(conn: &DatabaseConnection, max_connections: u32) {
    use fluxo_telemetry::opentelemetry::KeyValue;
    // (open connections, idle connections)
    type Stats = Box<dyn Fn() -> (u32, usize) + Send + Sync>;
    let stats: Stats = match conn.get_database_backend() {
        DbBackend::Postgres => {
            let pool = conn.get_postgres_connection_pool().clone();
            Box::new(move || (pool.size(), pool.num_idle()))
        }
        DbBackend::Sqlite => {
            let pool = conn.get_sqlite_connection_pool().clone();
            Box::new(move || (pool.size(), pool.num_idle()))
        }
        _ => return,
    };
    let pool = KeyValue::new("db.client.connection.pool.name", "fluxo");
    let meter = fluxo_telemetry::meter();
    let attributes = pool.clone();
    meter
        .i64_observable_gauge("db.client.connection.count")
        .with_unit("{connection}")
        .with_description("Database connections in the pool, by state")
        .with_callback(move |o| {
            let (size, idle) = stats();
            let idle = i64::try_from(idle).unwrap_or(i64::MAX);
            let used = i64::from(size).saturating_sub(idle).max(0);
            o.observe(idle, &[attributes.clone(), KeyValue::new("db.client.connection.state", "idle")]);
            o.observe(used, &[attributes.clone(), KeyValue::new("db.client.connection.state", "used")]);
        })
        .build();
    meter
        .i64_observable_gauge("db.client.connection.max")
        .with_unit("{connection}")
        .with_description("Largest number of connections the pool opens")
        .with_callback(move |o| o.observe(i64::from(max_connections), std::slice::from_ref(&pool)))
        .build();
}

/// A parameterised statement written once with `?` placeholders, numbered
/// `$1, $2, …` for PostgreSQL. Lets hand-written SQL (upserts, aggregates)
/// run unchanged on both backends. The SQL must not contain a literal `?`.
pub fn statement(backend: DbBackend, sql: &str, values: Vec<sea_orm::Value>) -> sea_orm::Statement {
    let sql = if backend == DbBackend::Postgres {
        let mut numbered = String::with_capacity(sql.len() + 16);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                numbered.push('$');
                numbered.push_str(&n.to_string());
            } else {
                numbered.push(c);
            }
        }
        numbered
    } else {
        sql.to_owned()
    };
    sea_orm::Statement::from_sql_and_values(backend, sql, values)
}

/// `PostgreSQL` or `SQLite`, for messages.
pub fn backend_name(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "PostgreSQL",
        DbBackend::Sqlite => "SQLite",
        _ => "unsupported",
    }
}

/// A database URL safe to print: the password, if any, replaced by `***`.
pub fn redacted_url(url: &SecretString) -> String {
    let url = url.expose_secret();
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // Credentials sit before the last '@' of the authority.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

/// Driver errors may quote the URL; never let its password through.
fn redact(message: &str, url: &str) -> String {
    let secret = SecretString::from(url.to_owned());
    message.replace(url, &redacted_url(&secret))
}

fn sqlite_file(url: &str) -> Option<&Path> {
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next()?;
    (path != ":memory:" && !path.is_empty()).then(|| Path::new(path))
}

/// Whether the database refused a statement because a number left its
/// column's range: PostgreSQL's `numeric_value_out_of_range` (SQLSTATE 22003,
/// `bigint out of range`), SQLite's `integer overflow`, or a SQLite CHECK that
/// an amount is still an integer (SQLite turns an overflowing sum into a REAL).
pub fn is_out_of_range(error: &DbErr) -> bool {
    let text = error.to_string();
    text.contains("out of range")
        || text.contains("22003")
        || text.contains("integer overflow")
        || text.contains("CHECK constraint failed: typeof")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        let pg = statement(DbBackend::Postgres, "a = ? AND b = ?", vec![1.into(), 2.into()]);
        assert_eq!(pg.sql, "a = $1 AND b = $2");
        let lite = statement(DbBackend::Sqlite, "a = ? AND b = ?", vec![1.into(), 2.into()]);
        assert_eq!(lite.sql, "a = ? AND b = ?");
    }

    #[test]
    fn passwords_never_survive_redaction() {
        let url = SecretString::from("postgres://fluxo:s3cr%40t@db.internal:5432/fluxo".to_owned());
        let shown = redacted_url(&url);
        assert_eq!(shown, "postgres://fluxo:***@db.internal:5432/fluxo");
        assert!(!shown.contains("s3cr"));
        let plain = SecretString::from("sqlite://data/fluxo.db".to_owned());
        assert_eq!(redacted_url(&plain), "sqlite://data/fluxo.db");
    }

    #[tokio::test]
    async fn an_unknown_scheme_is_refused_without_echoing_the_url() {
        let config = DbConfig {
            url: SecretString::from("mysql://root:hunter2@localhost/x".to_owned()),
            max_connections: 1,
            acquire_timeout: Duration::from_secs(1),
        };
        let error = Db::connect(&config).await.unwrap_err().to_string();
        assert!(error.contains("mysql"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[tokio::test]
    async fn a_sqlite_file_and_its_directory_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nested/fluxo.sqlite");
        let config = DbConfig {
            url: SecretString::from(format!("sqlite://{}", file.display())),
            max_connections: 2,
            acquire_timeout: Duration::from_secs(1),
        };
        let db = Db::connect(&config).await.unwrap();
        db.ping().await.unwrap();
        assert!(file.exists());
    }
}
