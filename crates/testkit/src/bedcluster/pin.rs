//! Starting processes in a bed host with the bed's names pinned for their whole life.
//!
//! `ip netns exec` gives a process the bed's names by bind-mounting `/etc/netns/<ns>/hosts`
//! over `/etc/hosts` in a new mount namespace. A bind mount on a *file* does not survive the
//! file being replaced in the root mount namespace: since Linux 3.18, renaming over (or
//! unlinking) a dentry detaches every mount on it in every namespace. The harness, `pgkeep up`
//! and every other test replace `/etc/hosts` by rename whenever they add or remove a block, so a
//! long-running bed process (an etcd member, an agent) silently falls back to the root
//! namespace's `/etc/hosts` and can no longer resolve its peers ("Temporary failure in name
//! resolution") as soon as any concurrent test creates or drops an environment.
//!
//! Here the process instead runs (as root, inside the host's namespace, before dropping to its
//! user) under a read-only overlay mounted on the `/etc` *directory*: the bed's `hosts` and
//! `resolv.conf` (copied to `<env root>/bed-etc/<bed-id>/<host>/`) on top of the real `/etc`.
//! `/etc` itself is never renamed, so the overlay stays, and the bed's files shadow whatever
//! the root namespace does to its own. The mount lives in the mount namespace `ip netns exec`
//! created (propagation slave), so nothing outside sees it. The wrapper `exec`s, so the pid
//! reported is still the program's own.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::env::ServiceUser;
use crate::service::{CommandOutput, Service};
use crate::{NetBed, paths};

/// Mounts the overlay, then drops to the service user (or stays root for uid 0) and execs.
const PIN_SCRIPT: &str = r#"d=$1; u=$2; g=$3; shift 3
/usr/bin/mount -t overlay pgkeep-bed-etc -o "lowerdir=$d:/etc" /etc || { echo "pgkeep-testkit: cannot pin the bed's /etc files from $d" >&2; exit 125; }
[ "$u" = 0 ] && exec "$@"
exec /usr/bin/setpriv --reuid="$u" --regid="$g" --init-groups --no-new-privs -- "$@""#;

/// The directory holding `host`'s pinned `/etc` files, created (from the bed's
/// `/etc/netns/<ns>/`) on first use.
fn etc_dir(bed: &NetBed, host: &str) -> Result<PathBuf> {
    let base = bed.env().root().join("bed-etc");
    let dir = base.join(bed.id()).join(host);
    if dir.join("hosts").exists() {
        return Ok(dir);
    }
    for d in [&base, &base.join(bed.id()), &dir] {
        paths::ensure_dir(d, 0o755)?;
    }
    let src = bed.etc_dir(host);
    for name in ["resolv.conf", "hosts"] {
        let from = src.join(name);
        if !from.exists() {
            continue;
        }
        let to = dir.join(name);
        fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644))
            .with_context(|| format!("chmod 644 {}", to.display()))?;
    }
    Ok(dir)
}

/// The wrapper's program, arguments and environment for `program args` as `user`.
fn wrap(
    bed: &NetBed,
    host: &str,
    user: &ServiceUser,
    program: &OsStr,
    args: &[&OsStr],
) -> Result<Vec<OsString>> {
    let dir = etc_dir(bed, host)?;
    let mut all: Vec<OsString> = vec![
        "-c".into(),
        PIN_SCRIPT.into(),
        "pgkeep-bed-pin".into(),
        dir.into_os_string(),
        user.uid.to_string().into(),
        user.gid.to_string().into(),
        program.to_owned(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    Ok(all)
}

/// [`NetBed::spawn`] with the bed's names pinned (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    bed: &NetBed,
    host: &str,
    name: &str,
    user: &ServiceUser,
    home: &Path,
    program: impl AsRef<OsStr>,
    args: &[&OsStr],
    envs: &[(&str, &OsStr)],
) -> Result<Service> {
    let all = wrap(bed, host, user, program.as_ref(), args)?;
    let refs: Vec<&OsStr> = all.iter().map(OsString::as_os_str).collect();
    let mut env: Vec<(&str, &OsStr)> = vec![
        ("USER", user.name.as_ref()),
        ("LOGNAME", user.name.as_ref()),
    ];
    env.extend_from_slice(envs);
    bed.spawn(
        host,
        name,
        &ServiceUser::root(),
        home,
        "/bin/sh",
        &refs,
        &env,
    )
}

/// [`NetBed::run`] with the bed's names pinned (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    bed: &NetBed,
    host: &str,
    user: &ServiceUser,
    home: &Path,
    program: impl AsRef<OsStr>,
    args: &[&OsStr],
    envs: &[(&str, &OsStr)],
    timeout: Duration,
) -> Result<CommandOutput> {
    let all = wrap(bed, host, user, program.as_ref(), args)?;
    let refs: Vec<&OsStr> = all.iter().map(OsString::as_os_str).collect();
    let mut env: Vec<(&str, &OsStr)> = vec![
        ("USER", user.name.as_ref()),
        ("LOGNAME", user.name.as_ref()),
    ];
    env.extend_from_slice(envs);
    bed.run(
        host,
        &ServiceUser::root(),
        home,
        "/bin/sh",
        &refs,
        &env,
        timeout,
    )
}
