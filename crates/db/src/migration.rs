//! Schema migrations written as SQL per backend, so that every constraint
//! that protects money (checks, uniqueness, triggers, partial indexes) is
//! stated exactly as the database will hold it. Each service lists its own
//! [`SqlMigration`]s in its `MigratorTrait` and keeps its own bookkeeping table.

use sea_orm::{ConnectionTrait, DbBackend};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};

use crate::{Db, DbErr};

/// The same change for each backend; empty where a backend needs none.
#[derive(Debug, Clone, Copy)]
pub struct Sql {
    /// For PostgreSQL.
    pub postgres: &'static str,
    /// For SQLite.
    pub sqlite: &'static str,
}

impl Sql {
    /// One statement list both backends run as written.
    pub const fn both(sql: &'static str) -> Self {
        Self { postgres: sql, sqlite: sql }
    }

    /// A change only PostgreSQL needs.
    pub const fn postgres_only(sql: &'static str) -> Self {
        Self { postgres: sql, sqlite: "" }
    }

    async fn run(&self, manager: &SchemaManager<'_>) -> Result<(), DbErr> {
        let sql = match manager.get_database_backend() {
            DbBackend::Postgres => self.postgres,
            DbBackend::Sqlite => self.sqlite,
            other => return Err(DbErr::Migration(format!("unsupported database backend {other:?}"))),
        };
        if !sql.trim().is_empty() {
            manager.get_connection().execute_unprepared(sql).await?;
        }
        Ok(())
    }
}

/// One versioned migration: its name (`mYYYYMMDD_NNNNNN_what`, the order they
/// apply in) and its SQL up and down.
#[derive(Debug, Clone, Copy)]
pub struct SqlMigration {
    /// The version, recorded in the service's migrations table.
    pub name: &'static str,
    /// Applies it.
    pub up: Sql,
    /// Reverts it.
    pub down: Sql,
}

impl MigrationName for SqlMigration {
    fn name(&self) -> &str {
        self.name
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SqlMigration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        self.up.run(manager).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        self.down.run(manager).await
    }
}

/// `migrations` boxed, as `MigratorTrait::migrations` returns them.
pub fn boxed(migrations: &[SqlMigration]) -> Vec<Box<dyn MigrationTrait>> {
    migrations.iter().map(|m| Box::new(*m) as Box<dyn MigrationTrait>).collect()
}

/// Creates or upgrades `M`'s tables.
pub async fn migrate<M: MigratorTrait>(db: &Db) -> Result<(), DbErr> {
    M::up(db.conn(), None).await
}

/// True when every migration of `M` this build knows has been applied.
pub async fn schema_is_current<M: MigratorTrait>(db: &Db) -> Result<bool, DbErr> {
    Ok(M::get_pending_migrations(db.conn()).await?.is_empty())
}

/// Ready when the database answers and `M`'s schema (named `component` in
/// the reason) is current.
pub async fn readiness<M: MigratorTrait>(db: &Db, component: &str) -> Result<(), String> {
    db.ping().await.map_err(|e| format!("database unreachable: {e}"))?;
    match schema_is_current::<M>(db).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("the {component} schema is not current: run `fluxo migrate`")),
        Err(e) => Err(format!("cannot read the {component} schema version: {e}")),
    }
}
