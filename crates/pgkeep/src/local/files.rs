//! The files of an environment: directories with the right owners and modes, secrets, each
//! node's `node.yml`, and the files for operators and scripts (`ctl.yml`, `patronictl.yml`,
//! `cluster.json`). Writes are atomic and skipped when the content is unchanged.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::certs::{self, node_tls, operator_etcd, operator_rest, pair};
use super::{ADMIN_ROLE, APP_ROLE, Layout, PG_BIN_DIR, REST_USER, ServiceUser, s};
use crate::inventory::{DbHost, Inventory};
use crate::pki::Service;

/// Creates `path` (parents must exist) or fixes an existing one: `mode`, and `owner` if given.
pub fn dir(path: &Path, mode: u32, owner: Option<&ServiceUser>) -> Result<()> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    if let Some(u) = owner {
        u.chown(path)?;
    }
    Ok(())
}

/// Writes `contents` to `path` with `mode` (and `owner`), unless the file already holds exactly
/// that; owner and mode are corrected either way.
pub fn write(path: &Path, contents: &str, mode: u32, owner: Option<&ServiceUser>) -> Result<()> {
    if fs::read(path).ok().as_deref() != Some(contents.as_bytes()) {
        crate::fsutil::write_atomic(path, contents.as_bytes(), mode)
            .with_context(|| format!("writing {}", path.display()))?;
    } else {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    }
    if let Some(u) = owner {
        u.chown(path)?;
    }
    Ok(())
}

/// The secret in `path` (0600 root), created with a random 32-character password if missing.
pub fn secret(path: &Path) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
            Ok(s.trim().to_owned())
        }
        Ok(_) => bail!(
            "{} is empty; delete it to have a new secret generated",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pw = super::random_password(32)?;
            write(path, &format!("{pw}\n"), 0o600, None)?;
            Ok(pw)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `D/secrets/restapi.pw`: the REST API password of the agents and the operator.
pub fn rest_password_file(layout: &Layout) -> PathBuf {
    layout.secrets().join("restapi.pw")
}

/// `D/secrets/pgpass`: the libpq passfile of the `app` and `admin` roles.
pub fn pgpass_file(layout: &Layout) -> PathBuf {
    layout.secrets().join("pgpass")
}

/// `D/secrets/<role>.pw`.
pub fn role_password_file(layout: &Layout, role: &str) -> PathBuf {
    layout.secrets().join(format!("{role}.pw"))
}

/// Creates the directory skeleton with owners and modes (idempotent).
pub fn skeleton(
    layout: &Layout,
    inv: &Inventory,
    pg: &ServiceUser,
    etcd: &ServiceUser,
) -> Result<()> {
    dir(&layout.dir, 0o755, None)?;
    for d in ["pki", "logs", "run", "nodes", "etcd"] {
        dir(&layout.path(d), 0o755, None)?;
    }
    dir(&layout.secrets(), 0o700, None)?;
    for h in &inv.database_hosts {
        let n = &h.name;
        dir(&layout.node_dir(n), 0o700, Some(pg))?;
        for sub in ["secrets", "conf"] {
            dir(&layout.node_dir(n).join(sub), 0o700, Some(pg))?;
        }
        let sock = layout.socket_dir(n);
        if !sock.starts_with(&layout.dir) {
            let base = layout.socket_base_fallback();
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&base)
                .with_context(|| format!("creating {}", base.display()))?;
        }
        dir(&sock, 0o700, Some(pg))?;
    }
    for m in &inv.etcd_hosts {
        dir(&layout.etcd_dir(&m.name), 0o700, Some(etcd))?;
    }
    Ok(())
}

fn etcd_section(inv: &Inventory, ca: &Path, client: &certs::Pair) -> Value {
    json!({
        "hosts": inv.etcd_endpoints(),
        "protocol": "https",
        "cacert": s(ca),
        "cert": s(&client.cert),
        "key": s(&client.key),
    })
}

/// The node's configuration (Patroni's `patroni.yml` structure) as a JSON value.
pub fn node_config(layout: &Layout, inv: &Inventory, h: &DbHost) -> Result<Value> {
    let n = &h.name;
    let fqdn = inv.fqdn(n);
    let tls = node_tls(layout, n);
    let ca = s(&layout.ca_cert());
    let cert = |svc: Service| pair(&tls, svc, n);
    let (rest, rest_client) = (cert(Service::RestApi), cert(Service::RestApiClient));
    let (pg, repl, rewind) = (
        cert(Service::Postgres),
        cert(Service::Replication),
        cert(Service::Rewind),
    );
    let auth = json!({
        "username": REST_USER,
        "password_file": s(&layout.node_dir(n).join("secrets/restapi.pw")),
    });
    let role = |user: &str, p: &certs::Pair| json!({"username": user, "sslcert": s(&p.cert), "sslkey": s(&p.key), "sslrootcert": ca});
    let mut parameters = json!({
        "ssl_cert_file": s(&pg.cert),
        "ssl_key_file": s(&pg.key),
        "ssl_ca_file": ca,
        "unix_socket_directories": s(&layout.socket_dir(n)),
        "archive_mode": "off",
    });
    if inv.backup_host.is_some() {
        let (archive, restore) = super::backup::wal_commands(layout, inv, n)?;
        // `on`, not `always`: pgBackRest refuses `always` (check and backup fail with [067]).
        parameters["archive_mode"] = json!("on");
        parameters["archive_command"] = json!(archive);
        parameters["restore_command"] = json!(restore);
    }
    let mut v = json!({
        "scope": inv.cluster,
        "namespace": inv.namespace,
        "name": n,
        "restapi": {
            "listen": format!("{}:{}", h.address, h.api_port),
            "connect_address": format!("{fqdn}:{}", h.api_port),
            "certfile": s(&rest.cert),
            "keyfile": s(&rest.key),
            "cafile": ca,
            "verify_client": "optional",
            "authentication": auth,
            "allowlist": ["127.0.0.0/8"],
            "allowed_client_names": certs::allowed_client_names(inv),
        },
        "ctl": {
            "certfile": s(&rest_client.cert),
            "keyfile": s(&rest_client.key),
            "cacert": ca,
            "authentication": auth,
        },
        "etcd3": etcd_section(inv, &layout.ca_cert(), &cert(Service::EtcdClient)),
        "bootstrap": {
            "dcs": {
                "ttl": 10,
                "loop_wait": 2,
                "retry_timeout": 4,
                "maximum_lag_on_failover": 1_048_576,
                "postgresql": {"use_pg_rewind": true, "use_slots": true},
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}],
        },
        "postgresql": {
            "listen": format!("{}:{}", h.address, h.pg_port),
            "connect_address": format!("{fqdn}:{}", h.pg_port),
            "data_dir": s(&layout.data_dir(n)),
            "config_dir": s(&layout.conf_dir(n)),
            "bin_dir": PG_BIN_DIR,
            "authentication": {
                "replication": role("replicator", &repl),
                "rewind": role("rewind_user", &rewind),
            },
            "parameters": parameters,
            "use_pg_rewind": true,
        },
        // A local environment never arms a hardware watchdog: a missed ping reboots the machine.
        "watchdog": {"mode": "off"},
        "log": {"level": "info"},
    });
    if inv.backup_host.is_some() {
        v["pgkeep"] = json!({"pgbackrest": {
            "config_path": s(&super::backup::node_config_path(layout, n)),
            "stanza": inv.cluster,
            // The repository is this environment's own: with every node's data lost, the
            // cluster comes back from it without an operator.
            "replica_without_leader": true,
        }});
    }
    Ok(v)
}

/// YAML of `v` after `header`, top-level keys in Patroni's usual order (nested keys sorted).
fn yaml(header: &str, v: &Value) -> Result<String> {
    const ORDER: &[&str] = &[
        "scope",
        "namespace",
        "name",
        "restapi",
        "ctl",
        "etcd3",
        "bootstrap",
        "postgresql",
        "watchdog",
        "log",
        "pgkeep",
    ];
    let mut out = header.to_owned();
    let Value::Object(map) = v else {
        return Ok(out + &serde_saphyr::to_string(v).context("rendering YAML")?);
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| ORDER.iter().position(|o| o == k).unwrap_or(ORDER.len()));
    for k in keys {
        let one = serde_json::Map::from_iter([(k.clone(), map[k].clone())]);
        out.push_str(&serde_saphyr::to_string(&one).context("rendering YAML")?);
    }
    Ok(out)
}

/// Writes each node's `node.yml` (root:postgres 0640) and its REST API password copy (0600,
/// owned by postgres).
pub fn node_files(layout: &Layout, inv: &Inventory, pg: &ServiceUser) -> Result<()> {
    let rest_pw = secret(&rest_password_file(layout))?;
    for h in &inv.database_hosts {
        let pw = layout.node_dir(&h.name).join("secrets/restapi.pw");
        write(&pw, &format!("{rest_pw}\n"), 0o600, Some(pg))?;
        let header = format!(
            "# {} of the local environment {} (written by `pgkeep up`; edits are overwritten)\n",
            h.name,
            layout.dir.display()
        );
        let text = yaml(&header, &node_config(layout, inv, h)?)?;
        // root:postgres 0640: the agent reads its configuration but cannot change it.
        let owner = ServiceUser {
            name: "root".into(),
            uid: 0,
            gid: pg.gid,
        };
        write(&layout.node_config(&h.name), &text, 0o640, Some(&owner))?;
    }
    Ok(())
}

/// A libpq connection string over TCP to the members (multi-host, read-write).
pub fn libpq_tcp(
    layout: &Layout,
    inv: &Inventory,
    hosts: &[&DbHost],
    db: &str,
    user: &str,
) -> String {
    let join =
        |f: &dyn Fn(&DbHost) -> String| hosts.iter().map(|h| f(h)).collect::<Vec<_>>().join(",");
    let mut c = format!(
        "host={} hostaddr={} port={} dbname={db} user={user} sslmode=verify-full sslrootcert={} passfile={}",
        join(&|h| inv.fqdn(&h.name)),
        join(&|h| h.address.to_string()),
        join(&|h| h.pg_port.to_string()),
        s(&layout.ca_cert()),
        s(&pgpass_file(layout)),
    );
    if hosts.len() > 1 {
        c.push_str(" target_session_attrs=read-write");
    }
    c
}

/// The superuser's libpq string over the node's Unix socket (as the `postgres` OS user).
pub fn libpq_socket(layout: &Layout, h: &DbHost) -> String {
    format!(
        "host={} port={} dbname=postgres user=postgres",
        s(&layout.socket_dir(&h.name)),
        h.pg_port
    )
}

/// Writes `ctl.yml`, `patronictl.yml`, `cluster.json` and the passfile.
pub fn operator_files(layout: &Layout, inv: &Inventory) -> Result<()> {
    let ca = layout.ca_cert();
    let rest_pw = secret(&rest_password_file(layout))?;
    let (op_rest, op_etcd) = (operator_rest(layout), operator_etcd(layout));
    let etcd = etcd_section(inv, &ca, &op_etcd);
    let ctl = json!({
        "scope": inv.cluster,
        "namespace": inv.namespace,
        "etcd3": etcd,
        "ctl": {
            "cacert": s(&ca),
            "certfile": s(&op_rest.cert),
            "keyfile": s(&op_rest.key),
            "authentication": {"username": REST_USER, "password_file": s(&rest_password_file(layout))},
        },
    });
    let header = format!(
        "# pgkeep ctl -c {} list   (written by `pgkeep up`)\n",
        s(&layout.path("ctl.yml"))
    );
    write(&layout.path("ctl.yml"), &yaml(&header, &ctl)?, 0o644, None)?;

    // Patroni 3.0.2 reaches etcd through its JSON gateway, which cannot take a certificate's
    // name as the user and, with authentication on, refuses a certificate that has one: a
    // certificate without a common name for TLS, and the read-only password user.
    let gateway = certs::etcd_gateway(layout);
    let mut patronictl_etcd = etcd_section(inv, &ca, &gateway);
    patronictl_etcd["username"] = json!(super::etcd_access::patronictl_user(inv));
    patronictl_etcd["password"] = json!(secret(&super::etcd_access::patronictl_password_file(
        layout
    ))?);
    let patronictl = json!({
        "scope": inv.cluster,
        "namespace": inv.namespace,
        "etcd3": patronictl_etcd,
        "ctl": {"cacert": s(&ca), "certfile": s(&op_rest.cert), "keyfile": s(&op_rest.key)},
        "restapi": {"authentication": {"username": REST_USER, "password": rest_pw}},
    });
    let header = format!(
        "# patronictl -c {} list   (holds the REST API and etcd passwords: keep it 0600)\n",
        s(&layout.path("patronictl.yml"))
    );
    write(
        &layout.path("patronictl.yml"),
        &yaml(&header, &patronictl)?,
        0o600,
        None,
    )?;

    let mut pgpass = String::new();
    for role in [APP_ROLE, ADMIN_ROLE] {
        let pw = secret(&role_password_file(layout, role))?;
        pgpass.push_str(&format!("*:*:*:{role}:{pw}\n"));
    }
    write(&pgpass_file(layout), &pgpass, 0o600, None)?;

    let all: Vec<&DbHost> = inv.database_hosts.iter().collect();
    let members: Vec<Value> = inv
        .database_hosts
        .iter()
        .map(|h| {
            json!({
                "name": h.name,
                "host": inv.fqdn(&h.name),
                "address": h.address.to_string(),
                "port": h.pg_port,
                "socket_dir": s(&layout.socket_dir(&h.name)),
                "api_url": format!("https://{}:{}", inv.fqdn(&h.name), h.api_port),
                "pid_file": s(&layout.agent_pid(&h.name)),
                "data_dir": s(&layout.data_dir(&h.name)),
                "config": s(&layout.node_config(&h.name)),
                "log": s(&layout.agent_log(&h.name)),
                "superuser_libpq": libpq_socket(layout, h),
            })
        })
        .collect();
    let doc = json!({
        "cluster": inv.cluster,
        "namespace": inv.namespace,
        "dir": s(&layout.dir),
        "members": members,
        "etcd": {
            "endpoints": inv.etcd_endpoints().iter().map(|e| format!("https://{e}")).collect::<Vec<_>>(),
            "cert": s(&op_etcd.cert),
            "key": s(&op_etcd.key),
            "root_cert": s(&certs::etcd_root(layout).cert),
            "root_key": s(&certs::etcd_root(layout).key),
            "patronictl": {
                "username": super::etcd_access::patronictl_user(inv),
                "password_file": s(&super::etcd_access::patronictl_password_file(layout)),
                "cert": s(&gateway.cert),
                "key": s(&gateway.key),
            },
        },
        "ca": s(&ca),
        "operator": {"cert": s(&op_rest.cert), "key": s(&op_rest.key)},
        "rest_api": {"username": REST_USER, "password_file": s(&rest_password_file(layout))},
        "passfile": s(&pgpass_file(layout)),
        "libpq": {
            APP_ROLE: libpq_tcp(layout, inv, &all, APP_ROLE, APP_ROLE),
            ADMIN_ROLE: libpq_tcp(layout, inv, &all, "postgres", ADMIN_ROLE),
        },
    });
    let mut doc = doc;
    if let Some(lb) = &inv.load_balancer {
        let conn = |write| super::haproxy::libpq(layout, inv, write, APP_ROLE, APP_ROLE);
        doc["load_balancer"] = json!({
            "host": inv.fqdn(&lb.name),
            "address": lb.address.to_string(),
            "write_port": lb.write_port,
            "read_port": lb.read_port,
            "config": s(&layout.haproxy_config()),
            "stats_socket": s(&layout.haproxy_socket()),
            "pid_file": s(&layout.haproxy_pid()),
            "log": s(&layout.haproxy_log()),
            "libpq_write": conn(true)?,
            "libpq_read": conn(false)?,
        });
    }
    let text = serde_json::to_string_pretty(&doc).context("rendering cluster.json")? + "\n";
    write(&layout.path("cluster.json"), &text, 0o644, None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::test_inventory as inv;

    #[test]
    fn node_config_is_a_valid_pgkeep_config() {
        let layout = Layout::new(Path::new("/var/lib/pgkeep-demo")).unwrap();
        let inv = inv();
        let v = node_config(&layout, &inv, &inv.database_hosts[1]).unwrap();
        let text = yaml("# x\n", &v).unwrap();
        assert!(text.contains("node2.demo.internal:28442"), "{text}");
        // Parse without touching the password files: swap them for inline secrets.
        let text = text.replace(
            "password_file: /var/lib/pgkeep-demo/nodes/node2/secrets/restapi.pw",
            "password: x",
        );
        let c = crate::config::Config::parse(Path::new("node.yml"), &text).unwrap();
        assert_eq!(c.name, "node2");
        assert_eq!(c.restapi.allowed_client_names.len(), 4);
        assert_eq!(c.postgresql.data_dir, layout.data_dir("node2"));
        assert_eq!(c.watchdog.mode, crate::config::WatchdogMode::Off);
    }

    #[test]
    fn libpq_strings() {
        let layout = Layout::new(Path::new("/d")).unwrap();
        let inv = inv();
        let one = libpq_tcp(&layout, &inv, &[&inv.database_hosts[0]], "app", "app");
        assert_eq!(
            one,
            "host=node1.demo.internal hostaddr=127.42.5.11 port=25431 dbname=app user=app \
             sslmode=verify-full sslrootcert=/d/pki/ca.crt passfile=/d/secrets/pgpass"
        );
        let all: Vec<&DbHost> = inv.database_hosts.iter().collect();
        let multi = libpq_tcp(&layout, &inv, &all, "app", "app");
        assert!(multi.contains("port=25431,25432,25433"));
        assert!(multi.ends_with("target_session_attrs=read-write"));
        assert_eq!(
            libpq_socket(&layout, &inv.database_hosts[0]),
            "host=/d/run/node1 port=25431 dbname=postgres user=postgres"
        );
    }
}
