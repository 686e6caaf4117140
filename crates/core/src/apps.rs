//! Per-application roles and schemas created at bootstrap (the guide's RBAC step): for an
//! application `shop`, a database `shop` whose schema `shop` belongs to `shop_owner` (NOLOGIN:
//! nobody logs in as the owner; migrations run with `SET ROLE shop_owner`), a login role `shop`
//! with data rights only (no DDL), a role `shop_readonly` with `SELECT` only, and optionally a
//! login role `shop_ro` that is a member of it. `PUBLIC` loses `CONNECT` on the database and
//! `CREATE` on `public`.
//!
//! Everything is idempotent: the same SQL can run again on a later leader.

use crate::pgconf::{login_role_sql, quote_ident, quote_literal};

/// Application names: a lower-case identifier that leaves room for the role suffixes.
pub fn valid_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if !first_ok
        || name.len() > 40
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(
            "an application name is a lower-case identifier ([a-z_][a-z0-9_]*, at most 40 characters)"
                .into(),
        );
    }
    if name.starts_with("pg_") || matches!(name, "postgres" | "template0" | "template1" | "public")
    {
        return Err(format!("{name} is reserved by PostgreSQL"));
    }
    Ok(())
}

/// The SQL of one application: first the statements run in the `postgres` database (roles;
/// the database itself is created separately, see [`Application::database`]), then those run in
/// the application's database. `None` when a verifier is not a SCRAM verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application<'a> {
    /// The application's name (checked by [`valid_name`]).
    pub name: &'a str,
    /// SCRAM verifier of the login role.
    pub verifier: &'a str,
    /// SCRAM verifier of the read-only login role, if there is one.
    pub readonly_verifier: Option<&'a str>,
}

impl Application<'_> {
    /// The owner role's name.
    pub fn owner(&self) -> String {
        format!("{}_owner", self.name)
    }

    /// The database name (the application's name), created with the owner role as owner.
    pub fn database(&self) -> &str {
        self.name
    }

    /// Role statements for the `postgres` database.
    pub fn cluster_sql(&self) -> Option<Vec<String>> {
        let owner = self.owner();
        let readonly = format!("{}_readonly", self.name);
        let mut out = vec![
            nologin(&owner),
            format!(
                "ALTER ROLE {} NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION",
                quote_ident(&owner)
            ),
            nologin(&readonly),
        ];
        out.extend(login_role_sql(
            self.name,
            self.verifier,
            "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION",
        )?);
        if let Some(v) = self.readonly_verifier {
            let ro = format!("{}_ro", self.name);
            out.extend(login_role_sql(
                &ro,
                v,
                "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION",
            )?);
            out.push(format!(
                "GRANT {} TO {}",
                quote_ident(&readonly),
                quote_ident(&ro)
            ));
        }
        Some(out)
    }

    /// `CREATE DATABASE`, to run only when the database does not exist (it cannot run inside a
    /// transaction or a `DO` block).
    pub fn create_database_sql(&self) -> String {
        format!(
            "CREATE DATABASE {} OWNER {}",
            quote_ident(self.database()),
            quote_ident(&self.owner())
        )
    }

    /// Statements for the application's database.
    pub fn database_sql(&self) -> Vec<String> {
        let db = quote_ident(self.database());
        let schema = quote_ident(self.name);
        let owner = quote_ident(&self.owner());
        let login = quote_ident(self.name);
        let readonly = quote_ident(&format!("{}_readonly", self.name));
        let mut out = vec![
            format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"),
            format!("GRANT CONNECT ON DATABASE {db} TO {login}, {readonly}"),
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC".into(),
            format!("CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {owner}"),
            format!("ALTER SCHEMA {schema} OWNER TO {owner}"),
            format!("GRANT USAGE ON SCHEMA {schema} TO {login}, {readonly}"),
            format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {login}"
            ),
            format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {login}"),
            format!("GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {readonly}"),
            format!(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {login}"
            ),
            format!(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} \
                 GRANT USAGE, SELECT ON SEQUENCES TO {login}"
            ),
            format!(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} \
                 GRANT SELECT ON TABLES TO {readonly}"
            ),
            format!("ALTER ROLE {login} IN DATABASE {db} SET search_path = {schema}"),
            format!("ALTER ROLE {readonly} IN DATABASE {db} SET search_path = {schema}"),
        ];
        // Role settings are not inherited: the read-only login role needs its own.
        if self.readonly_verifier.is_some() {
            let ro = quote_ident(&format!("{}_ro", self.name));
            out.push(format!(
                "ALTER ROLE {ro} IN DATABASE {db} SET search_path = {schema}"
            ));
        }
        out
    }
}

fn nologin(role: &str) -> String {
    format!(
        "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) THEN \
         CREATE ROLE {} NOLOGIN; END IF; END$$",
        quote_literal(role),
        quote_ident(role)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: &str = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy";

    #[test]
    fn names_are_identifiers_that_are_not_reserved() {
        assert!(valid_name("shop").is_ok());
        assert!(valid_name("_billing2").is_ok());
        for bad in [
            "Shop", "2shop", "shop-app", "", "pg_shop", "postgres", "public",
        ] {
            assert!(valid_name(bad).is_err(), "{bad}");
        }
        assert!(valid_name(&"a".repeat(41)).is_err());
    }

    #[test]
    fn roles_owner_without_login_login_with_dml_readonly_with_select() {
        let app = Application {
            name: "shop",
            verifier: V,
            readonly_verifier: Some(V),
        };
        let c = app.cluster_sql().unwrap().join(";\n");
        assert!(c.contains("CREATE ROLE \"shop_owner\" NOLOGIN"));
        assert!(c.contains("ALTER ROLE \"shop_owner\" NOLOGIN NOSUPERUSER"));
        assert!(c.contains("ALTER ROLE \"shop\" WITH LOGIN NOSUPERUSER"));
        assert!(c.contains("GRANT \"shop_readonly\" TO \"shop_ro\""));
        assert!(!c.contains("GRANT CREATE"));
        let d = app.database_sql().join(";\n");
        assert!(d.contains("CREATE SCHEMA IF NOT EXISTS \"shop\" AUTHORIZATION \"shop_owner\""));
        assert!(d.contains("REVOKE CREATE ON SCHEMA public FROM PUBLIC"));
        assert!(d.contains("REVOKE ALL ON DATABASE \"shop\" FROM PUBLIC"));
        assert!(d.contains("GRANT SELECT ON TABLES TO \"shop_readonly\""));
        // The login role gets data rights, never DDL on the schema.
        assert!(!d.contains("GRANT CREATE ON SCHEMA"));
        assert!(!d.contains("GRANT ALL"));
        assert_eq!(
            app.create_database_sql(),
            "CREATE DATABASE \"shop\" OWNER \"shop_owner\""
        );
    }

    #[test]
    fn a_plain_password_is_never_accepted_as_a_verifier() {
        let app = Application {
            name: "shop",
            verifier: "hunter2",
            readonly_verifier: None,
        };
        assert!(app.cluster_sql().is_none());
    }
}
