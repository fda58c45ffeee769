//! Test support: a fresh, empty database per test on either backend, and
//! [`backend_suite!`] to run one suite over SQLite and PostgreSQL.
//!
//! PostgreSQL comes from `FLUXO_TEST_POSTGRES_URL`, which `scripts/test.sh`
//! sets after starting a throwaway server. Without it the PostgreSQL half of a
//! suite fails with a message saying so, rather than silently passing.

pub mod receiver;

use std::time::Duration;

use fluxo_db::{Db, DbConfig};
use sea_orm::{ConnectionTrait, Database};
use secrecy::SecretString;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file in a temporary directory.
    Sqlite,
    /// A new database on the test PostgreSQL server.
    Postgres,
}

/// A fresh database that lives as long as this value.
#[derive(Debug)]
pub struct TestDb {
    /// Connection URL of the database.
    pub url: String,
    /// Which backend it is.
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

/// The test PostgreSQL server's URL, or a panic explaining how to get one.
pub fn postgres_server_url() -> String {
    std::env::var("FLUXO_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("FLUXO_TEST_POSTGRES_URL is not set: run the suite with ./scripts/test.sh, which starts PostgreSQL and Redis")
    })
}

impl TestDb {
    /// Creates an empty database on `backend`.
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}", dir.path().join("fluxo.sqlite").display());
                Self { url, backend, _dir: Some(dir) }
            }
            Backend::Postgres => {
                let server = postgres_server_url();
                let name = format!("fluxo_test_{}", ulid::Ulid::new().to_string().to_lowercase());
                let admin = Database::connect(&server).await.expect("connect to the test PostgreSQL server");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create a test database");
                admin.close().await.ok();
                let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base);
                Self { url: format!("{base}/{name}"), backend, _dir: None }
            }
        }
    }

    /// Opens a pool on this database.
    pub async fn connect(&self) -> Db {
        Db::connect(&DbConfig {
            url: SecretString::from(self.url.clone()),
            max_connections: 32,
            acquire_timeout: Duration::from_secs(10),
        })
        .await
        .expect("connect to the test database")
    }
}

/// Runs each named `async fn(Backend)` as two tests, `sqlite::name` and
/// `postgres::name`, so one suite proves both backends.
#[macro_export]
macro_rules! backend_suite {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )+
        }
    };
}
