//! The pgkeep side: `pgkeep up --no-agents` (PKI, inventory, `/etc/hosts` block, the three etcd
//! members every product uses), then the three agents started by the harness, each in its own
//! cgroup, then `pgkeep up` again, which finds them running, waits for a healthy cluster and
//! creates the `app` role. `pgkeep down --purge` takes it all away.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::client::{self, Host, Target};
use crate::cluster::{Cluster, Member, Side, Timings};
use crate::etcd::Etcd;
use crate::rest::Rest;
use crate::sys::{Cgroups, Cmd, User};

/// The cluster name (host names are `<node>.pgkbench.internal`).
pub const CLUSTER: &str = "pgkbench";
/// Patroni's etcd user: a password user (Patroni 3.0.2 reaches etcd through the JSON gateway,
/// which cannot authenticate by certificate).
pub const PATRONI_ETCD_USER: &str = "patroni@patroni";

/// What the pgkeep environment offers the other parts of the run.
pub struct Shared {
    /// `cluster.json` of the environment.
    pub doc: Value,
    /// The CA certificate (PEM path), trusted by every client.
    pub ca: PathBuf,
    /// The CA key (to issue the Patroni side's certificates).
    pub ca_key: PathBuf,
    /// etcd endpoints (`https://name:port`).
    pub etcd_endpoints: Vec<String>,
    /// The password of [`PATRONI_ETCD_USER`] (from `D/secrets/etcd-patroni.pw`, 0600).
    pub patroni_etcd_password: String,
}

fn text(v: &Value, what: &str) -> Result<String> {
    v.as_str()
        .map(str::to_owned)
        .with_context(|| format!("cluster.json: {what} missing"))
}

/// Brings the environment up in `dir` with the binary `bin`, bootstrapping with timings
/// `boot`; the cluster and what it shares.
pub async fn up(
    bin: &Path,
    dir: &Path,
    boot: Timings,
    cg: &Cgroups,
    pg: &User,
    log: &Path,
) -> Result<(Cluster, Shared)> {
    let bin_s = bin.to_string_lossy().into_owned();
    let dir_s = dir.to_string_lossy().into_owned();
    // etcd members inherit this cgroup.
    let out = Cmd::new(&bin_s)
        .args([
            "up",
            "--dir",
            &dir_s,
            "--cluster",
            CLUSTER,
            "--no-agents",
            "--no-haproxy",
        ])
        .cgroup(&cg.group("etcd")?)
        .timeout(Duration::from_secs(120))
        .output()
        .await
        .context("pgkeep up --no-agents")?;
    std::fs::write(log, &out)?;
    // etcd authentication is on: the harness (the operator's certificate, CN pgkeep-operator)
    // and Patroni (a password user) get read-write access to Patroni's scope.
    let pw_file = dir.join("secrets/etcd-patroni.pw");
    let pw_s = pw_file.to_string_lossy().into_owned();
    let scope = crate::patroni::SCOPE;
    for extra in [
        vec!["--user", "pgkeep-operator"],
        vec!["--user", PATRONI_ETCD_USER, "--password-file", &pw_s],
    ] {
        let mut args = vec!["etcd", "grant", "--dir", &dir_s, "--scope", scope];
        args.extend(extra);
        let out = Cmd::new(&bin_s)
            .args(args)
            .timeout(Duration::from_secs(60))
            .output()
            .await
            .context("pgkeep etcd grant")?;
        std::fs::write(log, format!("{}\n{out}", std::fs::read_to_string(log)?))?;
    }
    let patroni_etcd_password = std::fs::read_to_string(&pw_file)
        .with_context(|| format!("reading {}", pw_file.display()))?
        .trim()
        .to_owned();
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("cluster.json")).context("reading cluster.json")?,
    )
    .context("parsing cluster.json")?;
    let names: Vec<String> = doc["members"]
        .as_array()
        .context("cluster.json: members")?
        .iter()
        .map(|m| text(&m["name"], "member name"))
        .collect::<Result<_>>()?;
    let mut members = Vec::new();
    let mut hosts = Vec::new();
    for (m, name) in doc["members"].as_array().into_iter().flatten().zip(&names) {
        members.push(Member {
            name: name.clone(),
            api: text(&m["api_url"], "api_url")?,
            data_dir: PathBuf::from(text(&m["data_dir"], "data_dir")?),
            cgroup: cg.group(&format!("pgkeep-{name}"))?,
        });
        hosts.push(Host {
            member: name.clone(),
            name: text(&m["host"], "host")?,
            addr: text(&m["address"], "address")?.parse().context("address")?,
            port: u16::try_from(m["port"].as_u64().context("port")?)?,
        });
    }
    let ca = PathBuf::from(text(&doc["ca"], "ca")?);
    let ca_pem = std::fs::read(&ca)?;
    let rest_pw =
        std::fs::read_to_string(text(&doc["rest_api"]["password_file"], "rest password")?)?;
    let identity = (
        std::fs::read(text(&doc["operator"]["cert"], "operator cert")?)?,
        std::fs::read(text(&doc["operator"]["key"], "operator key")?)?,
    );
    let rest = Rest::new(
        &ca_pem,
        Some(identity),
        &text(&doc["rest_api"]["username"], "rest user")?,
        rest_pw.trim(),
    )?;
    let etcd_endpoints: Vec<String> = doc["etcd"]["endpoints"]
        .as_array()
        .context("etcd endpoints")?
        .iter()
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect();
    let etcd = Etcd::connect(
        &etcd_endpoints,
        &ca,
        Path::new(&text(&doc["etcd"]["cert"], "etcd cert")?),
        Path::new(&text(&doc["etcd"]["key"], "etcd key")?),
    )
    .await?;
    let app_pw = std::fs::read_to_string(dir.join("secrets/app.pw")).context("the app password")?;
    let app = Target {
        hosts,
        user: "app".into(),
        password: app_pw.trim().to_owned(),
        dbname: "app".into(),
        tls: client::tls(&ca_pem)?,
    };
    let prefix = format!(
        "{}{}/",
        text(&doc["namespace"], "namespace")?,
        text(&doc["cluster"], "cluster")?
    );
    let n = members.len();
    let mut cluster = Cluster {
        label: "pgkeep",
        prefix,
        members,
        rest,
        etcd,
        app,
        side: Side::Pgkeep {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
        },
        pg: pg.clone(),
        pids: vec![None; n],
        sync: false,
    };
    if boot != Timings::AGGRESSIVE {
        for name in &names {
            patch_bootstrap(&dir.join("nodes").join(name).join("node.yml"), boot)?;
        }
    }
    for name in &names {
        cluster.start(name).await?;
    }
    // The bootstrap node publishes bootstrap.dcs as the cluster's config; only then may
    // `pgkeep up` rewrite node.yml.
    wait_config(&cluster, boot).await?;
    // Finds the agents running, waits for health, creates the app and admin roles.
    let out = Cmd::new(&bin_s)
        .args(["up", "--dir", &dir_s, "--timeout", "180", "--no-haproxy"])
        .cgroup(&cg.group("pgkeep-up")?)
        .timeout(Duration::from_secs(240))
        .output()
        .await
        .context("pgkeep up (agents started by the harness)")?;
    std::fs::write(log, format!("{}\n{out}", std::fs::read_to_string(log)?))?;
    let strays = crate::sys::cgroup_procs(&cg.group("pgkeep-up")?);
    if !strays.is_empty() {
        bail!(
            "pgkeep up started processes {strays:?} itself (an agent had exited?); see {}",
            log.display()
        );
    }
    let shared = Shared {
        ca_key: ca.with_file_name("ca.key"),
        ca,
        doc,
        etcd_endpoints,
        patroni_etcd_password,
    };
    if !shared.ca_key.exists() {
        bail!("{} is missing", shared.ca_key.display());
    }
    Ok((cluster, shared))
}

/// Sets ttl/loop_wait/retry_timeout of `bootstrap.dcs` in a node.yml `pgkeep up` wrote (the
/// only 4-space-indented keys of those names), keeping its owner and mode.
fn patch_bootstrap(node_yml: &Path, t: Timings) -> Result<()> {
    let text = std::fs::read_to_string(node_yml)?;
    let mut done = 0;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            for (k, v) in [
                ("ttl", t.ttl),
                ("loop_wait", t.loop_wait),
                ("retry_timeout", t.retry_timeout),
            ] {
                if l.starts_with(&format!("    {k}: ")) {
                    done += 1;
                    return format!("    {k}: {v}");
                }
            }
            l.to_owned()
        })
        .collect();
    if done != 3 {
        bail!("{}: bootstrap.dcs timings not found", node_yml.display());
    }
    std::fs::write(node_yml, out.join("\n") + "\n")?;
    Ok(())
}

/// Waits until the cluster's `config` key carries ttl `t.ttl` (bounded).
async fn wait_config(c: &Cluster, t: Timings) -> Result<()> {
    let key = format!("{}config", c.prefix);
    for _ in 0..300 {
        if let Ok(Some(v)) = c.etcd.get_json(&key).await
            && v["ttl"].as_u64() == Some(u64::from(t.ttl))
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "pgkeep: the bootstrap node did not publish {key} with ttl {} within 60 s",
        t.ttl
    )
}

/// `pgkeep down --dir D --purge` (stops agents and etcd, removes the directory and the hosts
/// block); errors are reported, not fatal.
pub async fn down(bin: &Path, dir: &Path) {
    if !dir.join("inventory.yml").exists() && !dir.exists() {
        return;
    }
    let r = Cmd::new(bin.to_string_lossy())
        .args([
            "down",
            "--dir",
            &dir.to_string_lossy(),
            "--purge",
            "--timeout",
            "30",
        ])
        .timeout(Duration::from_secs(150))
        .output()
        .await;
    if let Err(e) = r {
        eprintln!("warning: pgkeep down failed: {e:#}");
    }
}

/// `pgkeep --version`.
pub async fn version(bin: &Path) -> String {
    Cmd::new(bin.to_string_lossy())
        .args(["--version"])
        .timeout(Duration::from_secs(10))
        .output()
        .await
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e:#})"))
}
