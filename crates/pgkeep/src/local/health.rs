//! Is the cluster healthy (ARCHITECTURE glossary)? And the roles `up` creates once it is.
//!
//! Healthy: exactly one member holds the leader key and its PostgreSQL accepts writes; every
//! other member is in recovery on the leader's timeline with its WAL receiver streaming; on
//! the leader a walsender whose `application_name` is that member's name is `streaming`, the
//! member's slot exists and its lag is within `maximum_lag_on_failover`; and the leader's REST
//! API answers `GET /primary` with 200.
//!
//! PostgreSQL is asked over each node's Unix socket as the `postgres` OS user (peer
//! authentication; no password anywhere). SQL goes through `psql`'s standard input, never its
//! arguments.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pgkeep_core::ha::slot_name;
use pgkeep_core::pgconf::login_role_sql;
use tokio::io::AsyncWriteExt;

use super::files::{role_password_file, secret};
use super::{ADMIN_ROLE, APP_ROLE, Layout, PG_BIN_DIR, ServiceUser};
use crate::api::client::ApiClientBuilder;
use crate::dcs::{Dcs, EtcdDcs};
use crate::inventory::{DbHost, Inventory};

/// `maximum_lag_on_failover` the environment bootstraps with (bytes).
pub const MAX_LAG: i64 = 1_048_576;

/// Bound of one psql call.
const PSQL_TIMEOUT: Duration = Duration::from_secs(15);

/// What a healthy cluster looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthy {
    /// The member holding the leader key.
    pub leader: String,
    /// The leader's timeline.
    pub timeline: u32,
    /// PostgreSQL's system identifier.
    pub system_identifier: String,
}

/// Runs `sql` with psql on node `h` as the superuser over the Unix socket; returns the rows
/// (unaligned, `|`-separated).
pub async fn psql(layout: &Layout, h: &DbHost, pg: &ServiceUser, sql: &str) -> Result<String> {
    let mut cmd = tokio::process::Command::new(format!("{PG_BIN_DIR}/psql"));
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-F",
        "|",
        "-h",
    ])
    .arg(layout.socket_dir(&h.name))
    .arg("-p")
    .arg(h.pg_port.to_string())
    .args(["-U", "postgres", "-d", "postgres"])
    .env_clear()
    .env("PATH", super::spawn::SERVICE_PATH)
    .env("HOME", layout.node_dir(&h.name))
    .env("LANG", "C.UTF-8")
    .env("PGCONNECT_TIMEOUT", "3")
    .env("PGAPPNAME", "pgkeep-up")
    .current_dir("/")
    .uid(pg.uid)
    .gid(pg.gid)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().context("starting psql")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(sql.as_bytes())
            .await
            .context("writing to psql")?;
    }
    let out = tokio::time::timeout(PSQL_TIMEOUT, child.wait_with_output())
        .await
        .with_context(|| format!("psql on {} did not finish within {PSQL_TIMEOUT:?}", h.name))?
        .context("waiting for psql")?;
    if !out.status.success() {
        bail!(
            "psql on {}: {}",
            h.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const LEADER_RO_SQL: &str =
    "SELECT 'ro', pg_is_in_recovery()::text, current_setting('transaction_read_only');\n";

const LEADER_SQL: &str = "\
SELECT 'tl', substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), txid_current()::text;
SELECT 'id', system_identifier::text, '' FROM pg_control_system();
SELECT 'rep', application_name, state, \
coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint, -1)::text FROM pg_stat_replication;
SELECT 'slot', slot_name, '' FROM pg_replication_slots WHERE slot_type = 'physical';
";

const REPLICA_SQL: &str = "\
SELECT pg_is_in_recovery()::text, coalesce(status, 'none'), coalesce(received_tli, 0)::text \
FROM (SELECT 1) one LEFT JOIN pg_stat_wal_receiver ON true;
";

/// What the leader's PostgreSQL says.
#[derive(Debug, Default)]
struct LeaderFacts {
    timeline: u32,
    sysid: String,
    /// (application_name, state, flush lag in bytes or -1)
    walsenders: Vec<(String, String, i64)>,
    slots: Vec<String>,
}

fn parse_leader(out: &str) -> std::result::Result<LeaderFacts, String> {
    let mut f = LeaderFacts::default();
    for line in out.lines() {
        let cols: Vec<&str> = line.split('|').collect();
        match cols.as_slice() {
            ["ro", rec, ro] => {
                if *rec != "false" {
                    return Err("the leader's PostgreSQL is still in recovery".into());
                }
                if *ro != "off" {
                    return Err("the leader's PostgreSQL is read-only".into());
                }
            }
            ["tl", wal, _xid] => {
                f.timeline = u32::from_str_radix(wal, 16)
                    .map_err(|_| format!("unexpected WAL file name {wal:?}"))?;
            }
            ["id", id, _] => f.sysid = (*id).to_owned(),
            ["rep", app, state, lag] => {
                f.walsenders.push((
                    (*app).to_owned(),
                    (*state).to_owned(),
                    lag.parse().unwrap_or(-1),
                ));
            }
            ["slot", name, _] => f.slots.push((*name).to_owned()),
            _ => {}
        }
    }
    Ok(f)
}

/// One look at the cluster: `Ok` when healthy, else `Err` with the first unmet condition.
pub async fn check(
    layout: &Layout,
    inv: &Inventory,
    pg: &ServiceUser,
) -> std::result::Result<Healthy, String> {
    let settings = super::etcd::operator_settings(layout, inv, inv.etcd_endpoints());
    let dcs = EtcdDcs::connect(&settings)
        .await
        .map_err(|e| format!("etcd: {e}"))?;
    let view = dcs.load().await.map_err(|e| format!("etcd: {e}"))?.view;
    let leader = view
        .leader
        .as_ref()
        .map(|l| l.name.clone())
        .ok_or("no member holds the leader key yet")?;
    let lh = inv
        .database_hosts
        .iter()
        .find(|h| h.name == leader)
        .ok_or_else(|| format!("the leader key names {leader}, which is not in the inventory"))?;
    let mut out = String::new();
    for sql in [LEADER_RO_SQL, LEADER_SQL] {
        let rows = psql(layout, lh, pg, sql)
            .await
            .map_err(|e| format!("leader {leader}: {e:#}"))?;
        out.push_str(&rows);
        // Stop before the WAL functions if it is not a writable primary.
        parse_leader(&out).map_err(|e| format!("leader {leader}: {e}"))?;
    }
    let facts = parse_leader(&out).map_err(|e| format!("leader {leader}: {e}"))?;
    for h in inv.database_hosts.iter().filter(|h| h.name != leader) {
        let n = &h.name;
        let streaming = facts
            .walsenders
            .iter()
            .find(|(app, state, _)| app == n && state == "streaming");
        let Some((_, _, lag)) = streaming else {
            return Err(format!("{n} is not streaming from the leader {leader} yet"));
        };
        if *lag < 0 {
            return Err(format!("{n} has not reported a flush position yet"));
        }
        if *lag > MAX_LAG {
            return Err(format!("{n} lags {lag} bytes behind the leader"));
        }
        if !facts.slots.contains(&slot_name(n)) {
            return Err(format!("the leader has no replication slot for {n}"));
        }
        let out = psql(layout, h, pg, REPLICA_SQL)
            .await
            .map_err(|e| format!("{n}: {e:#}"))?;
        let cols: Vec<&str> = out.trim().split('|').collect();
        match cols.as_slice() {
            ["true", "streaming", tli] if tli.parse() == Ok(facts.timeline) => {}
            ["true", "streaming", tli] => {
                return Err(format!(
                    "{n} receives timeline {tli}, the leader is on {}",
                    facts.timeline
                ));
            }
            ["true", status, _] => return Err(format!("{n}'s WAL receiver is {status:?}")),
            _ => return Err(format!("{n} is not in recovery")),
        }
    }
    let url = format!("https://{}:{}/primary", inv.fqdn(&leader), lh.api_port);
    // Anonymous, as a load balancer's health check is: no credentials to refuse or log.
    let client = ApiClientBuilder::from_ca_file(&layout.ca_cert())
        .and_then(|b| b.timeout(Duration::from_secs(3)).build())
        .map_err(|e| format!("REST client: {e}"))?;
    match client.get(&url).await {
        Ok(r) if r.status == 200 => {}
        Ok(r) => return Err(format!("GET {url} answers {}", r.status)),
        Err(e) => return Err(format!("GET {url}: {e}")),
    }
    Ok(Healthy {
        leader,
        timeline: facts.timeline,
        system_identifier: facts.sysid,
    })
}

/// Creates or updates the `app` role (owner of database `app`) and the `admin` role (CREATEDB,
/// CREATEROLE, no superuser) on the leader. Their passwords come from `D/secrets` and reach
/// PostgreSQL only as SCRAM verifiers.
pub async fn ensure_roles(layout: &Layout, leader: &DbHost, pg: &ServiceUser) -> Result<()> {
    let mut sql = String::new();
    for (role, attrs) in [
        (
            APP_ROLE,
            "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION",
        ),
        (ADMIN_ROLE, "NOSUPERUSER CREATEDB CREATEROLE NOREPLICATION"),
    ] {
        let pw = secret(&role_password_file(layout, role))?;
        let verifier = postgres_protocol::password::scram_sha_256(pw.as_bytes());
        let stmts = login_role_sql(role, &verifier, attrs)
            .context("the SCRAM verifier has an unexpected form")?;
        for s in stmts {
            sql.push_str(&s);
            sql.push_str(";\n");
        }
    }
    sql.push_str(&format!(
        "SELECT 'CREATE DATABASE {APP_ROLE} OWNER {APP_ROLE}' \
         WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '{APP_ROLE}')\\gexec\n"
    ));
    psql(layout, leader, pg, &sql)
        .await
        .context("creating the app and admin roles")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_output_parses() {
        let out = "ro|false|off\ntl|00000002|745\nid|7312|\nrep|node2|streaming|0\nslot|node2|\n";
        let f = parse_leader(out).unwrap();
        assert_eq!(f.timeline, 2);
        assert_eq!(f.sysid, "7312");
        assert_eq!(
            f.walsenders,
            [("node2".to_string(), "streaming".to_string(), 0)]
        );
        assert_eq!(f.slots, ["node2"]);
        assert!(parse_leader("ro|true|off\n").is_err());
        assert!(parse_leader("ro|false|on\n").is_err());
    }
}
