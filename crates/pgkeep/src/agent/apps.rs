//! `bootstrap.applications`: each application's database, schema and roles, created on the
//! freshly bootstrapped primary (SQL from [`pgkeep_core::apps`]). Passwords reach PostgreSQL
//! only as SCRAM verifiers computed here; no statement text is logged.

use std::time::Duration;

use anyhow::{Context, Result};
use pgkeep_core::apps::Application;
use secrecy::ExposeSecret;

use super::Shell;
use crate::postgres::observe::connect_local_db;

impl Shell {
    /// Creates (or brings up to date) every configured application, over `client` (connected
    /// to `postgres` as the local superuser) and a connection to each application's database.
    pub(super) async fn create_applications(&self, client: &tokio_postgres::Client) -> Result<()> {
        let superuser = &self.cfg.postgresql.authentication.superuser.username;
        for app in &self.cfg.bootstrap.applications {
            let verifier =
                postgres_protocol::password::scram_sha_256(app.password.expose_secret().as_bytes());
            let ro_verifier = app
                .readonly_password
                .as_ref()
                .map(|p| postgres_protocol::password::scram_sha_256(p.expose_secret().as_bytes()));
            let spec = Application {
                name: &app.name,
                verifier: &verifier,
                readonly_verifier: ro_verifier.as_deref(),
            };
            let cluster_sql = spec
                .cluster_sql()
                .context("the SCRAM verifier has an unexpected form")?;
            for (i, sql) in cluster_sql.iter().enumerate() {
                client
                    .batch_execute(sql)
                    .await
                    .with_context(|| format!("application {}: role statement {i}", app.name))?;
            }
            let exists = client
                .query_opt(
                    "SELECT 1 FROM pg_database WHERE datname = $1",
                    &[&spec.database()],
                )
                .await?
                .is_some();
            if !exists {
                client
                    .batch_execute(&spec.create_database_sql())
                    .await
                    .with_context(|| format!("creating database {}", spec.database()))?;
            }
            let db = connect_local_db(
                self.layout.socket_dir(),
                self.layout.node.port,
                superuser,
                spec.database(),
                Duration::from_secs(10),
            )
            .await?;
            for (i, sql) in spec.database_sql().iter().enumerate() {
                db.batch_execute(sql)
                    .await
                    .with_context(|| format!("application {}: database statement {i}", app.name))?;
            }
            tracing::info!(
                application = %app.name,
                readonly_login = app.readonly_password.is_some(),
                "created the application's database, schema and roles"
            );
        }
        Ok(())
    }
}
