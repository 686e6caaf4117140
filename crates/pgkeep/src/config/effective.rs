//! The effective configuration as `pgkeep config check` prints it: defaults filled in, every
//! secret replaced by `<redacted>`.

use std::path::PathBuf;

use serde_json::{Map, Value, json};

use super::{BasicAuth, Config, PgRole, TlsFiles};

const REDACTED: &str = "<redacted>";

/// A parameter value for display: anything that mentions a password is hidden.
fn redact_value(v: &str) -> &str {
    if v.to_ascii_lowercase().contains("password") {
        REDACTED
    } else {
        v
    }
}

fn path(p: &Option<PathBuf>) -> Value {
    p.as_ref()
        .map_or(Value::Null, |p| Value::from(p.display().to_string()))
}

fn tls(t: &Option<TlsFiles>) -> Value {
    t.as_ref().map_or(
        Value::Null,
        |t| json!({"cert": t.cert.display().to_string(), "key": t.key.display().to_string()}),
    )
}

fn auth(a: &Option<BasicAuth>) -> Value {
    a.as_ref().map_or(
        Value::Null,
        |a| json!({"username": a.username, "password": REDACTED}),
    )
}

fn role(r: &PgRole) -> Value {
    json!({
        "username": r.username,
        "password": r.password.as_ref().map(|_| REDACTED),
        "sslmode": r.sslmode,
        "client": tls(&r.client),
        "sslrootcert": path(&r.sslrootcert),
    })
}

fn command(c: Option<&super::CallbackCommand>) -> Value {
    c.map_or(Value::Null, |c| Value::from(c.argv.clone()))
}

/// The effective configuration as YAML, defaults filled in and every secret replaced by
/// `<redacted>`. Printed by `pgkeep config check`.
pub fn effective_yaml(c: &Config) -> String {
    let doc = json!({
        "scope": c.scope,
        "namespace": c.namespace,
        "name": c.name,
        "dcs_prefix": c.dcs_base(),
        "restapi": {
            "listen": c.restapi.listen.to_string(),
            "connect_address": c.restapi.connect_address,
            "tls": tls(&c.restapi.tls),
            "cafile": path(&c.restapi.cafile),
            "verify_client": format!("{:?}", c.restapi.verify_client).to_lowercase(),
            "authentication": auth(&c.restapi.authentication),
            "allowlist": c.restapi.allowlist.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "allowlist_include_members": c.restapi.allowlist_include_members,
            "allowed_client_names": c.restapi.allowed_client_names,
        },
        "ctl": {
            "client": tls(&c.ctl.client),
            "cacert": path(&c.ctl.cacert),
            "authentication": auth(&c.ctl.authentication),
        },
        "etcd3": {
            "endpoints": c.etcd.endpoints,
            "cacert": path(&c.etcd.cacert),
            "client": tls(&c.etcd.client),
        },
        "bootstrap": {
            "dcs": c.bootstrap.dcs,
            "initdb": c.bootstrap.initdb,
            "applications": c.bootstrap.applications.iter().map(|a| serde_json::json!({
                "name": a.name,
                "password": "<redacted>",
                "readonly_password": a.readonly_password.as_ref().map(|_| "<redacted>"),
            })).collect::<Vec<_>>(),
        },
        "postgresql": {
            "listen": c.postgresql.listen.to_string(),
            "connect_address": c.postgresql.connect_address,
            "data_dir": c.postgresql.data_dir.display().to_string(),
            "config_dir": c.postgresql.config_dir.display().to_string(),
            "bin_dir": path(&c.postgresql.bin_dir),
            "pgpass": path(&c.postgresql.pgpass),
            "authentication": {
                "superuser": role(&c.postgresql.authentication.superuser),
                "replication": role(&c.postgresql.authentication.replication),
                "rewind": role(&c.postgresql.authentication.rewind),
            },
            "parameters": c.postgresql.parameters.iter().map(|(k, v)| (k.to_string(), Value::from(redact_value(v.as_str())))).collect::<Map<_, _>>(),
            "pg_hba": c.postgresql.pg_hba.iter().map(|l| super::hba::redacted(l)).collect::<Vec<_>>(),
            "ldap_ca_file": path(&c.postgresql.ldap_ca_file),
            "pg_ident": c.postgresql.pg_ident,
            "use_pg_rewind": c.postgresql.use_pg_rewind,
            "pg_ctl_timeout": c.postgresql.pg_ctl_timeout,
            "callbacks": c.callbacks.events.iter().map(|(e, cmd)| (e.name().to_owned(), command(Some(cmd)))).collect::<Map<_, _>>(),
            "pre_promote": command(c.callbacks.pre_promote.as_ref()),
            "before_stop": command(c.callbacks.before_stop.as_ref()),
        },
        "tags": c.tags,
        "watchdog": {
            "mode": format!("{:?}", c.watchdog.mode).to_lowercase(),
            "device": c.watchdog.device.display().to_string(),
            "safety_margin": c.watchdog.safety_margin,
        },
        "log": {"level": c.log.level, "format": format!("{:?}", c.log.format).to_lowercase()},
        "pgkeep": {
            "dynamic_parameter_allowlist": c.dynamic_parameter_allowlist.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "cluster_networks": c.cluster_networks.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "insecure": c.insecure.active(),
            "callback_timeout": c.callbacks.timeout.as_secs(),
            "callback_primary_role": c.callbacks.primary_role.as_str(),
            "certificate_expiry_warning_days": c.certificate_expiry_warning_days,
            "pgbackrest": c.pgbackrest.as_ref().map(|p| serde_json::json!({
                "config_path": p.config_path.display().to_string(),
                "stanza": p.stanza,
            })),
        },
    });
    serde_saphyr::to_string(&doc).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}
