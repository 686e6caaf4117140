//! The environment's etcd access control (see [`crate::dcs::access`] for the model): `pgkeep up`
//! creates the users and roles and turns authentication on ([`ensure`]); `pgkeep etcd grant`
//! gives one more user access to a scope ([`grant`]); `pgkeep render etcd --dir D` prints the
//! same as a script ([`document`]).
//!
//! All of it runs as etcd's `root` user, through `D/pki/etcd-root-admin.{crt,key}` (CN `root`,
//! key 0600 root, beside the CA key). A certificate rather than a root password: nothing secret
//! travels or sits in a file other than a key that never leaves the host, etcd's `root` user is
//! created without a password (so no password can log in as root, by gRPC or through the
//! gateway), and whoever could read that key could read the CA key next to it and issue any
//! identity anyway. No agent, `pgkeep ctl` or health check ever uses it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use secrecy::SecretString;

use super::certs::{self, OPERATOR_ETCD_NAME};
use super::{Layout, etcd, files};
use crate::dcs::access::{self, Access, Admin, Credential, Plan, Report};
use crate::etcdconf::{self, AccessFiles, Document, PATRONICTL};
use crate::inventory::Inventory;

/// `patronictl@<cluster>`: the read-only password user of `D/patronictl.yml`.
pub fn patronictl_user(inv: &Inventory) -> String {
    access::password_user(PATRONICTL, &inv.cluster)
}

/// `D/secrets/etcd-patronictl.pw` (0600 root): its password.
pub fn patronictl_password_file(layout: &Layout) -> PathBuf {
    layout.secrets().join("etcd-patronictl.pw")
}

/// The environment's users and roles: the agents and the operator read and write the cluster's
/// keys, `patronictl@<cluster>` reads them.
pub fn plan(inv: &Inventory) -> Result<Plan> {
    Ok(etcdconf::cluster_plan(
        inv,
        &[OPERATOR_ETCD_NAME.to_owned()],
    )?)
}

async fn admin(layout: &Layout, inv: &Inventory) -> Result<Admin> {
    let root = certs::etcd_root(layout);
    if !root.key.exists() {
        bail!(
            "{} is missing: etcd's root certificate is issued by `pgkeep up`",
            root.key.display()
        );
    }
    Admin::connect(&etcd::root_settings(layout, inv))
        .await
        .with_context(|| format!("connecting to etcd as root ({})", root.cert.display()))
}

/// Whether etcd's authentication is on (asked as root).
pub async fn auth_enabled(layout: &Layout, inv: &Inventory) -> Result<bool> {
    Ok(admin(layout, inv).await?.auth_enabled().await?)
}

/// Creates the environment's users and roles where missing and turns authentication on (first
/// checking whether it is). Changes nothing on a converged environment.
pub async fn ensure(layout: &Layout, inv: &Inventory) -> Result<Report> {
    let plan = plan(inv)?;
    let pw_file = patronictl_password_file(layout);
    let pw = files::secret(&pw_file)?;
    let passwords = BTreeMap::from([(patronictl_user(inv), SecretString::from(pw))]);
    let admin = admin(layout, inv).await?;
    admin.apply(&plan, &passwords, true).await.with_context(|| {
        format!(
            "setting up etcd users, roles and authentication as root ({})",
            certs::etcd_root(layout).cert.display()
        )
    })
}

/// What `pgkeep etcd grant` was asked to do.
#[derive(Debug, Clone)]
pub struct GrantOptions {
    /// The environment directory (its etcd and root certificate).
    pub dir: PathBuf,
    /// The scope (cluster name) whose keys the user gets.
    pub scope: String,
    /// Its namespace.
    pub namespace: String,
    /// The user: a certificate user `pgkeep-<name>`, or with `password_file` a password user
    /// whose name contains `@`.
    pub user: String,
    /// The password user's password file (created, 0600, with a random password if missing).
    pub password_file: Option<PathBuf>,
    /// Read only (role `pgkeep-<scope>.readonly`) instead of read and write.
    pub read_only: bool,
}

/// The password in `path`: its first line, from a file only its owner may read; a missing
/// file is created (0600) with a random 32-character password.
fn password_from(path: &Path) -> Result<String> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                bail!(
                    "{} is readable by group or others (mode {mode:04o}): chmod 600 it, and \
                     treat the password in it as exposed",
                    path.display()
                );
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let pw = text.lines().next().unwrap_or("").trim().to_owned();
            if pw.is_empty() || pw.contains(char::is_whitespace) {
                bail!(
                    "{}: the first line must be the password, one word",
                    path.display()
                );
            }
            Ok(pw)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => files::secret(path),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Runs `pgkeep etcd grant`: creates the role and the user where missing and grants it (never
/// turns authentication on or off). Prints what changed, never the password.
pub fn grant(opts: &GrantOptions) -> Result<()> {
    let layout = Layout::new(&opts.dir)?;
    let inv = Inventory::load(&layout.inventory())
        .with_context(|| format!("{} is not a pgkeep environment", layout.dir.display()))?;
    let (credential, access) = (
        if opts.password_file.is_some() {
            Credential::Password
        } else {
            Credential::Certificate
        },
        if opts.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        },
    );
    let plan = Plan::grant(&opts.namespace, &opts.scope, &opts.user, credential, access)?;
    let mut passwords = BTreeMap::new();
    if let Some(f) = &opts.password_file {
        passwords.insert(opts.user.clone(), SecretString::from(password_from(f)?));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(async {
        let admin = admin(&layout, &inv).await?;
        admin
            .apply(&plan, &passwords, false)
            .await
            .with_context(|| format!("granting {} access to {}", opts.user, plan.roles[0].prefix))
    })?;
    let role = &plan.roles[0];
    println!(
        "etcd user {} may {} {} (role {}){}",
        opts.user,
        access.describe(),
        role.prefix,
        role.name,
        opts.password_file
            .as_ref()
            .map(|f| format!("; its password is in {}", f.display()))
            .unwrap_or_default()
    );
    for c in &report.changes {
        println!("  {c}");
    }
    if report.changes.is_empty() {
        println!("  (already in place)");
    }
    if !report.enabled {
        println!("  note: etcd authentication is off (pgkeep up turns it on)");
    }
    Ok(())
}

/// `pgkeep render etcd --dir D`: the members' flags as `up` starts them and the access script
/// with the environment's files.
pub fn document(layout: &Layout, inv: &Inventory) -> Result<String> {
    let plan = plan(inv)?;
    let root = certs::etcd_root(layout);
    let members = inv
        .etcd_hosts
        .iter()
        .map(|m| (m, etcd::member_args(layout, inv, m)))
        .collect();
    Ok(etcdconf::render(&Document {
        inv,
        members,
        member_user: "etcd".into(),
        plan: &plan,
        files: AccessFiles {
            ca: layout.ca_cert(),
            root_cert: root.cert,
            root_key: root.key,
            password_files: BTreeMap::from([(
                patronictl_user(inv),
                patronictl_password_file(layout),
            )]),
        },
    }))
}

/// Prints what [`ensure`] found and did (the `up` step's lines).
pub fn print_report(r: &Report) {
    for c in &r.changes {
        println!("      {c}");
    }
    match (r.was_enabled, r.changes.is_empty()) {
        (true, true) => println!("      authentication on; users and roles in place"),
        (true, false) => println!("      authentication was already on"),
        (false, _) => println!("      authentication is now on"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::test_inventory;

    #[test]
    fn the_environment_plan() {
        let inv = test_inventory();
        let plan = plan(&inv).unwrap();
        let names: Vec<&str> = plan.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "pgkeep-node1",
                "pgkeep-node2",
                "pgkeep-node3",
                "pgkeep-operator",
                "patronictl@demo"
            ]
        );
        // The CNs the environment's certificates carry are exactly these user names.
        let layout = Layout::new(Path::new("/d")).unwrap();
        let pg = super::super::ServiceUser::root();
        let cns: Vec<String> = certs::targets(&layout, &inv, &pg, &pg, Some(&pg), Some(&pg))
            .iter()
            .map(|t| t.request(1).unwrap().common_name)
            .filter(|cn| crate::pki::is_etcd_identity(cn))
            .collect();
        let mut want: Vec<String> = names[..4].iter().map(|s| (*s).to_owned()).collect();
        want.push("root".into());
        let mut got = cns.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "certificates naming etcd users");
    }

    #[test]
    fn password_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        let made = password_from(&f).unwrap();
        assert_eq!(made.len(), 32);
        assert_eq!(password_from(&f).unwrap(), made);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = password_from(&f).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("pw"), "{err}");
    }
}
