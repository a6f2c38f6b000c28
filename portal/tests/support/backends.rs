//! The store's two backends, for the tests that run on both: SQLite (the embedded default) and
//! PostgreSQL (a fresh database on the test process's server, `fz_host::testing::postgres`).

use fz_portal::store::Database;

/// A fresh database on the test process's PostgreSQL server; `None` when there is none here,
/// after reporting `test` skipped (which fails `.ci/run`).
pub fn postgres(test: &str) -> Option<Database> {
    match fz_host::testing::postgres::server() {
        Ok(server) => Some(Database::Postgres(server.database())),
        Err(why) => {
            fz_host::testing::skip_needing(test, "PostgreSQL", &why);
            None
        }
    }
}

/// The configuration line (top-level key of `portal.toml`) that keeps a portal's store in
/// `database`: none for the SQLite default.
pub fn config_line(database: &Database) -> String {
    match database {
        Database::Sqlite => String::new(),
        Database::Postgres(url) => format!("database_url = \"{url}\""),
    }
}

/// Runs each named test, an `async fn(Database)` of the test binary `$binary`, twice: on
/// SQLite (`<name>::sqlite`) and on PostgreSQL (`<name>::postgres`, reported skipped where
/// there is no PostgreSQL).
#[macro_export]
macro_rules! on_both_backends {
    ($binary:literal: $($test:ident),* $(,)?) => {$(
        mod $test {
            use fz_portal::store::Database;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$test(Database::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let test = concat!($binary, "::", stringify!($test));
                if let Some(database) = $crate::support::backends::postgres(test) {
                    super::$test(database).await;
                }
            }
        }
    )*};
}
