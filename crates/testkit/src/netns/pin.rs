//! Pinning a bed host's names for the whole life of every process started in it.
//!
//! `ip netns exec` gives a process the bed's names by bind-mounting `/etc/netns/<ns>/hosts`
//! (and `resolv.conf`) over `/etc/hosts` in a new mount namespace. A bind mount on a *file*
//! does not survive the file being replaced in the root mount namespace: since Linux 3.18,
//! renaming over (or unlinking) a dentry detaches every mount on it in every namespace. The
//! harness's environments and `pgkeep up` replace `/etc/hosts` by rename whenever they add or
//! remove a block, so without more a long-running bed process (an etcd member, an agent, a test
//! server) silently falls back to the root namespace's `/etc/hosts` and can no longer resolve
//! its peers ("Temporary failure in name resolution") as soon as anything on the machine creates
//! or drops an environment.
//!
//! So every process [`super::NetBed::command`] builds runs, as root inside the host's namespace
//! and before it drops to its user, [`PIN_SCRIPT`]: it mounts a read-only overlay on the `/etc`
//! *directory* with the host's pinned files (`hosts` and, if the bed has one, `resolv.conf`,
//! written with the bed to `<env root>/bed-etc/<bed-id>/<host>/`) on top of the real `/etc`.
//! `/etc` itself is never renamed, so the overlay stays, and the bed's files shadow whatever the
//! root namespace does to its own. The pinned files live outside `/etc` because overlayfs
//! refuses layers that overlap (`/etc/netns/<ns>` is inside `/etc`). The mount lives in the
//! mount namespace `ip netns exec` created (propagation slave), so nothing outside sees it and
//! it goes away with the last process in it. The script `exec`s (into `setpriv` or the program
//! itself), so the pid std reports is still the program's own.
//!
//! Inside the bed, `/etc` is therefore read-only, even for root.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::sys;
use crate::paths;

/// `$0` of the wrapper shell (shown in `ps` until it execs).
pub(super) const PIN_ARG0: &str = "pgkeep-bed-pin";

/// Run by `/bin/sh -c` as root inside the host's namespaces, with the arguments: the pinned
/// directory, uid, gid, program, program arguments. Mounts the overlay, then drops to the user
/// (or stays root for uid 0) and execs the program.
pub(super) const PIN_SCRIPT: &str = r#"d=$1; u=$2; g=$3; shift 3
/usr/bin/mount -t overlay pgkeep-bed-etc -o "ro,lowerdir=$d:/etc" /etc || { echo "pgkeep-testkit: cannot pin the bed's /etc files from $d" >&2; exit 125; }
[ "$u" = 0 ] && exec "$@"
exec /usr/bin/setpriv --reuid="$u" --regid="$g" --init-groups --no-new-privs -- "$@""#;

/// Name of the directory, in the environment's root, that holds the pinned files of its beds.
const BASE_DIR: &str = "bed-etc";

/// `<env root>/bed-etc/<bed-id>`: the pinned files of one bed, one directory per host.
pub(super) fn bed_dir(env_root: &Path, bed_id: &str) -> PathBuf {
    env_root.join(BASE_DIR).join(bed_id)
}

/// Writes the pinned files of one host: `hosts` and, when `resolv` is given, `resolv.conf`,
/// all 0644 in directories 0755 (the overlay is mounted as root, but the files keep their modes
/// for the service users that read them through it). `bed_dir` is [`bed_dir`]'s.
pub(super) fn write_host(
    bed_dir: &Path,
    host: &str,
    hosts: &str,
    resolv: Option<&str>,
) -> Result<PathBuf> {
    let base = bed_dir.parent().context("bed directory without a parent")?;
    let dir = bed_dir.join(host);
    for d in [base, bed_dir, &dir] {
        paths::ensure_dir(d, 0o755)?;
    }
    sys::write_public(&dir.join("hosts"), hosts)?;
    if let Some(resolv) = resolv {
        sys::write_public(&dir.join("resolv.conf"), resolv)?;
    }
    Ok(dir)
}

/// Removes one bed's pinned files; missing ones are fine. `<env root>/bed-etc` itself stays
/// (another bed of the environment may be creating its directory in it right now); it goes with
/// the environment.
pub(super) fn remove_bed(bed_dir: &Path) -> Result<()> {
    match fs::remove_dir_all(bed_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", bed_dir.display())),
    }
}
