//! etcd least privilege (issue 6, item 7) on a real three-member etcd from `pgkeep up
//! --no-agents`: authentication is on, each identity can do exactly what its role allows, a
//! certificate issued for another purpose by the same CA is no etcd identity, `up` converges an
//! environment created before access control existed, and refuses a role it does not own.
//! (`local.rs` runs agents, `pgkeep ctl` and `patronictl list` against the same setup.)

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{
    Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions, WatchOptions,
};
use pgkeep::inventory::Inventory;
use pgkeep::local::Layout;
use pgkeep::pki::{Ca, CertRequest, Usage};

use crate::local::{Scenario, ok, pgkeep};

/// A TLS identity (certificate and key files), and optionally a password user to log in as.
struct Who<'a> {
    what: &'a str,
    cert: PathBuf,
    key: PathBuf,
    login: Option<(String, String)>,
}

fn who<'a>(what: &'a str, dir: &Path, base: &str) -> Who<'a> {
    Who {
        what,
        cert: dir.join(format!("{base}.crt")),
        key: dir.join(format!("{base}.key")),
        login: None,
    }
}

async fn connect(inv: &Inventory, ca: &Path, w: &Who<'_>) -> Result<Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(fs::read(ca)?))
        .identity(Identity::from_pem(fs::read(&w.cert)?, fs::read(&w.key)?));
    let mut opts = ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5));
    if let Some((u, p)) = &w.login {
        opts = opts.with_user(u.clone(), p.clone());
    }
    let endpoints: Vec<String> = inv
        .etcd_endpoints()
        .iter()
        .map(|e| format!("https://{e}"))
        .collect();
    Ok(tokio::time::timeout(
        Duration::from_secs(10),
        Client::connect(endpoints, Some(opts)),
    )
    .await
    .with_context(|| format!("{}: connect timed out", w.what))??)
}

/// What one identity may do on one key.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum May {
    /// Reads and writes succeed.
    ReadWrite,
    /// Reads succeed, writes are denied.
    Read,
    /// Both are denied by etcd's access control (the TLS connection itself works).
    Nothing,
    /// The TLS handshake fails: not even a connection.
    NoConnection,
}

async fn probe(inv: &Inventory, ca: &Path, w: &Who<'_>, key: &str) -> Result<May> {
    let mut c = connect(inv, ca, w).await?;
    let bound = |d| Duration::from_secs(d);
    // Ok(true): done; Ok(false): refused by access control; Err: anything else (no TLS
    // connection, a timeout).
    let outcome = |r: std::result::Result<std::result::Result<(), etcd_client::Error>, _>| match r {
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) if e.to_string().contains("permission denied") => Ok(false),
        Ok(Err(e)) if e.to_string().contains("user name is empty") => Ok(false),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    };
    let read =
        outcome(tokio::time::timeout(bound(5), async { c.get(key, None).await.map(drop) }).await);
    let write = outcome(
        tokio::time::timeout(bound(5), async { c.put(key, "x", None).await.map(drop) }).await,
    );
    Ok(match (read, write) {
        (Ok(true), Ok(true)) => May::ReadWrite,
        (Ok(true), Ok(false)) => May::Read,
        (Ok(false), Ok(false)) => May::Nothing,
        (Err(_), Err(_)) => May::NoConnection,
        other => bail!("{} on {key}: unexpected {other:?}", w.what),
    })
}

/// Every (identity, key) pair must behave as `want`.
fn expect(
    rt: &tokio::runtime::Runtime,
    inv: &Inventory,
    ca: &Path,
    cases: &[(&Who<'_>, &str, May)],
) -> Result<()> {
    let mut wrong = Vec::new();
    for (w, key, want) in cases {
        let got = rt.block_on(probe(inv, ca, w, key))?;
        if got != *want {
            wrong.push(format!("{} on {key}: {got:?}, want {want:?}", w.what));
        }
    }
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// A certificate from the environment's CA, written into `dir`: how the reference lab issued
/// every certificate (server and client usage), here with a PostgreSQL host's name.
fn lab_style_cert(sc: &Scenario, cn: &str, dir: &Path) -> Result<()> {
    let pki = sc.dir.join("pki");
    let ca = Ca::load(&pki.join("ca.crt"), &pki.join("ca.key"))?;
    let issued = ca.issue(&CertRequest {
        common_name: cn.to_owned(),
        usage: Usage::ServerAndClient,
        dns_names: vec![cn.to_owned()],
        ip_addresses: Vec::new(),
        validity_days: 1,
    })?;
    issued.write(dir, "lab")?;
    Ok(())
}

#[test]
fn etcd_access_is_least_privilege_per_identity() -> Result<()> {
    let sc = Scenario::new("rbac");
    let out = sc.up(&["--no-agents"])?;
    ensure!(
        out.contains("etcd users, roles and authentication")
            && out.contains("enabled authentication"),
        "{out}"
    );
    let inv = sc.inventory()?;
    let c = &sc.cluster;
    let (d, ca) = (sc.dir.clone(), sc.dir.join("pki/ca.crt"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // Files: etcd's root key and patronictl's password are root's alone.
    for f in [
        "pki/etcd-root-admin.key",
        "pki/etcd-gateway-patronictl.key",
        "secrets/etcd-patronictl.pw",
        "patronictl.yml",
    ] {
        let m = fs::metadata(d.join(f))?;
        ensure!(
            m.permissions().mode() & 0o777 == 0o600 && m.uid() == 0,
            "{f}: {:o}",
            m.permissions().mode()
        );
    }
    let pctl = fs::read_to_string(d.join("patronictl.yml"))?;
    ensure!(
        pctl.contains(&format!("username: patronictl@{c}")),
        "{pctl}"
    );
    ensure!(pctl.contains("etcd-gateway-patronictl.crt"), "{pctl}");
    let password = fs::read_to_string(d.join("secrets/etcd-patronictl.pw"))?
        .trim()
        .to_owned();

    // The identities.
    let tls1 = d.join("nodes/node1/tls");
    let agent = who("agent node1", &tls1, "etcd-client-node1");
    let operator = who("operator", &d.join("pki"), "etcd-client-operator");
    let root = who("root", &d.join("pki"), "etcd-root-admin");
    let pg_server = who(
        "node1's PostgreSQL server certificate",
        &tls1,
        "postgres-node1",
    );
    let rest_client = who(
        "node1's REST API client certificate",
        &tls1,
        "restapi-client-node1",
    );
    let replication = who(
        "node1's replication certificate",
        &tls1,
        "replication-node1",
    );
    let gateway = who(
        "patronictl's gateway certificate, no password",
        &d.join("pki"),
        "etcd-gateway-patronictl",
    );
    let mut reader = who(
        "patronictl@ (password)",
        &d.join("pki"),
        "etcd-gateway-patronictl",
    );
    reader.login = Some((format!("patronictl@{c}"), password.clone()));
    let tmp = tempfile::tempdir()?;
    lab_style_cert(&sc, &inv.fqdn("node1"), tmp.path())?;
    let lab = who(
        "a server+client certificate named like node1's PostgreSQL (the lab's)",
        tmp.path(),
        "lab",
    );

    let mine = format!("/service/{c}/probe");
    let sibling = format!("/service/{c}x/probe");
    let other = "/service/other/probe";
    expect(
        &rt,
        &inv,
        &ca,
        &[
            (&agent, &mine, May::ReadWrite),
            (&agent, &sibling, May::Nothing),
            (&agent, other, May::Nothing),
            (&operator, &mine, May::ReadWrite),
            (&operator, other, May::Nothing),
            (&reader, &mine, May::Read),
            (&reader, other, May::Nothing),
            (&gateway, &mine, May::Nothing),
            (&lab, &mine, May::Nothing),
            (&rest_client, &mine, May::Nothing),
            (&replication, &mine, May::Nothing),
            (&root, other, May::ReadWrite),
        ],
    )?;
    // A server-only certificate (PostgreSQL's) is not even a TLS client of etcd.
    ensure!(rt.block_on(probe(&inv, &ca, &pg_server, &mine))? == May::NoConnection);
    // A wrong password is no login at all.
    let mut wrong = who(
        "patronictl@ (wrong password)",
        &d.join("pki"),
        "etcd-gateway-patronictl",
    );
    wrong.login = Some((format!("patronictl@{c}"), "not-the-password".into()));
    ensure!(
        rt.block_on(connect(&inv, &ca, &wrong)).is_err(),
        "a wrong password logged in"
    );

    // What the agent does besides keys works without root: leases (grant, keepalive, revoke
    // with a key attached), a watch of its prefix, member list and status; a watch of another
    // prefix and user management are refused.
    rt.block_on(async {
        let mut a = connect(&inv, &ca, &agent).await?;
        let lease = a.lease_grant(10, None).await?.id();
        a.put(
            format!("/service/{c}/leader"),
            "node1",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await?;
        let (mut keeper, mut stream) = a.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        ensure!(
            stream.message().await?.is_some_and(|r| r.ttl() > 0),
            "keepalive"
        );
        a.lease_revoke(lease).await?;
        ensure!(
            a.get(format!("/service/{c}/leader"), None)
                .await?
                .kvs()
                .is_empty(),
            "revoke left the key"
        );
        a.member_list().await?;
        a.status().await?;
        let mut s = a
            .watch(
                format!("/service/{c}/"),
                Some(WatchOptions::new().with_prefix()),
            )
            .await?;
        let first = tokio::time::timeout(Duration::from_secs(1), s.message()).await;
        ensure!(
            !matches!(&first, Ok(Ok(Some(r))) if r.canceled()),
            "own watch canceled: {first:?}"
        );
        let mut s = a
            .watch("/service/other/", Some(WatchOptions::new().with_prefix()))
            .await?;
        let r = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await??
            .context("watch stream ended")?;
        ensure!(
            r.canceled() && r.cancel_reason().contains("permission denied"),
            "watch of another prefix: {r:?}"
        );
        ensure!(a.user_list().await.is_err(), "the agent listed etcd users");
        ensure!(
            a.auth_disable().await.is_err(),
            "the agent turned authentication off"
        );
        anyhow::Ok(())
    })?;

    // patronictl reads through the JSON gateway with its password user.
    let out = std::process::Command::new("patronictl")
        .args(["-c", d.join("patronictl.yml").to_str().unwrap(), "list"])
        .output()?;
    ensure!(
        out.status.success(),
        "patronictl list: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Converged: a second up changes nothing.
    let out = sc.up(&["--no-agents"])?;
    ensure!(
        out.contains("authentication on; users and roles in place"),
        "{out}"
    );

    // An environment from before access control: no root certificate, no gateway certificate,
    // no password, no users or roles, authentication off. up converges it.
    rt.block_on(async {
        let mut r = connect(&inv, &ca, &root).await?;
        r.auth_disable().await?;
        for u in r.user_list().await?.users() {
            r.user_delete(u.as_str()).await?;
        }
        for role in r.role_list().await?.roles() {
            r.role_delete(role.as_str()).await?;
        }
        anyhow::Ok(())
    })?;
    for f in [
        "pki/etcd-root-admin.crt",
        "pki/etcd-root-admin.key",
        "pki/etcd-gateway-patronictl.crt",
        "pki/etcd-gateway-patronictl.key",
        "secrets/etcd-patronictl.pw",
    ] {
        fs::remove_file(d.join(f))?;
    }
    ensure!(
        rt.block_on(probe(&inv, &ca, &rest_client, other))? == May::ReadWrite,
        "auth is not off"
    );
    let out = sc.up(&["--no-agents"])?;
    for want in [
        "added user root",
        "added user pgkeep-node1",
        "added user pgkeep-operator",
        "enabled authentication",
    ] {
        ensure!(out.contains(want), "{want:?} missing: {out}");
    }
    let password = fs::read_to_string(d.join("secrets/etcd-patronictl.pw"))?
        .trim()
        .to_owned();
    reader.login = Some((format!("patronictl@{c}"), password.clone()));
    expect(
        &rt,
        &inv,
        &ca,
        &[
            (&agent, &mine, May::ReadWrite),
            (&agent, other, May::Nothing),
            (&rest_client, &mine, May::Nothing),
            (&reader, &mine, May::Read),
        ],
    )?;

    // A password that no longer logs in (the file was replaced) is set again.
    fs::write(d.join("secrets/etcd-patronictl.pw"), "rotated-password-1\n")?;
    let out = sc.up(&["--no-agents"])?;
    ensure!(
        out.contains(&format!("user patronictl@{c}: password set from its file")),
        "{out}"
    );
    reader.login = Some((format!("patronictl@{c}"), "rotated-password-1".into()));
    expect(&rt, &inv, &ca, &[(&reader, &mine, May::Read)])?;

    // A role of pgkeep's name that grants more is someone else's: refused, named, untouched.
    let role = format!("pgkeep-{c}");
    rt.block_on(async {
        let mut r = connect(&inv, &ca, &root).await?;
        r.role_grant_permission(role.as_str(), Permission::read("/elsewhere/").with_prefix())
            .await?;
        anyhow::Ok(())
    })?;
    let failed = pgkeep(&["up", "--dir", sc.d(), "--no-agents"]);
    let err = String::from_utf8_lossy(&failed.stderr);
    ensure!(!failed.status.success(), "up accepted a foreign role");
    ensure!(
        err.contains(&format!(
            "etcd role {role} already grants read [/elsewhere/"
        )),
        "{err}"
    );
    rt.block_on(async {
        let mut r = connect(&inv, &ca, &root).await?;
        let opts = etcd_client::RoleRevokePermissionOptions::new().with_prefix();
        r.role_revoke_permission(role.as_str(), "/elsewhere/", Some(opts))
            .await?;
        anyhow::Ok(())
    })?;
    sc.up(&["--no-agents"])?;

    // pgkeep etcd grant: another scope for a password user (read only), never a certificate
    // issued for another purpose.
    let pw = tmp.path().join("svc.pw");
    ok(&[
        "etcd",
        "grant",
        "--dir",
        sc.d(),
        "--scope",
        "other",
        "--user",
        "svc@other",
        "--password-file",
        pw.to_str().unwrap(),
        "--read-only",
    ])?;
    ensure!(fs::metadata(&pw)?.permissions().mode() & 0o777 == 0o600);
    let mut svc = who("svc@other", &d.join("pki"), "etcd-gateway-patronictl");
    svc.login = Some((
        "svc@other".into(),
        fs::read_to_string(&pw)?.trim().to_owned(),
    ));
    expect(
        &rt,
        &inv,
        &ca,
        &[
            (&svc, other, May::Read),
            (&svc, &mine, May::Nothing),
            (&agent, other, May::Nothing),
        ],
    )?;
    let refused = pgkeep(&[
        "etcd",
        "grant",
        "--dir",
        sc.d(),
        "--scope",
        "other",
        "--user",
        "restapi-client-node1",
    ]);
    ensure!(!refused.status.success());
    ensure!(String::from_utf8_lossy(&refused.stderr).contains("pgkeep-<name>"));

    // render etcd --dir documents exactly this environment.
    let doc = ok(&["render", "etcd", "--dir", sc.d()])?;
    let layout = Layout::new(&d)?;
    for want in [
        format!(
            "export ETCDCTL_CERT={}",
            layout.pki().join("etcd-root-admin.crt").display()
        ),
        format!("certificate_user pgkeep-node1\netcdctl user grant-role pgkeep-node1 {role}\n"),
        format!(
            "password_user patronictl@{c} {}",
            d.join("secrets/etcd-patronictl.pw").display()
        ),
        "--experimental-peer-skip-client-san-verification=true".to_owned(),
        "etcdctl auth enable".to_owned(),
    ] {
        ensure!(doc.contains(&want), "{want:?} missing:\n{doc}");
    }
    // And its script is exactly what etcd accepts: run it (as root, with the environment's
    // files) on the converged cluster; it changes nothing and succeeds.
    let script = tmp.path().join("etcd-access.sh");
    fs::write(&script, &doc)?;
    let run = std::process::Command::new("/bin/sh")
        .arg(&script)
        .output()?;
    ensure!(
        run.status.success(),
        "the rendered script failed: {}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    expect(
        &rt,
        &inv,
        &ca,
        &[
            (&agent, &mine, May::ReadWrite),
            (&rest_client, &mine, May::Nothing),
        ],
    )?;
    Ok(())
}
