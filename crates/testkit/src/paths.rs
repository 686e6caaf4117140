//! Where the harness keeps things: the checkout id, the test base directory, the cgroup2 mount.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// Root of every test environment's files, on a path every service user can traverse.
const BASE_DIR: &str = "/var/tmp/pgkeep-test";

/// Prefix of the per-checkout cgroup directory under the cgroup2 mount.
pub(crate) const CGROUP_PREFIX: &str = "pgkeep-test-";

/// Short, stable id of this checkout: FNV-1a of the workspace path, 8 hex digits.
///
/// Leftovers are only ever swept within the same checkout id, so two checkouts of pgkeep on one
/// machine do not clean up each other's running tests.
pub fn checkout_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let workspace = manifest.join("../..");
        let workspace = fs::canonicalize(&workspace).unwrap_or(workspace);
        let hash = fnv1a(workspace.as_os_str().as_encoded_bytes());
        format!("{:08x}", (hash ^ (hash >> 32)) as u32)
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `/var/tmp/pgkeep-test/<checkout-id>`: the parent of this checkout's environment roots.
pub fn test_base_dir() -> PathBuf {
    Path::new(BASE_DIR).join(checkout_id())
}

/// The shared base directory (`/var/tmp/pgkeep-test`), for lock files.
pub(crate) fn shared_base_dir() -> &'static Path {
    Path::new(BASE_DIR)
}

/// Creates `dir` (not its parents) with `mode`, or fixes the mode if it exists.
pub(crate) fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !dir.is_dir() {
                bail!("{} exists and is not a directory", dir.display());
            }
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    // The mode given to mkdir is filtered by the umask.
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {:o} {}", mode, dir.display()))
}

/// Creates the shared base and this checkout's base directory, both 0755.
pub(crate) fn ensure_base_dirs() -> Result<PathBuf> {
    ensure_dir(shared_base_dir(), 0o755)?;
    let base = test_base_dir();
    ensure_dir(&base, 0o755)?;
    Ok(base)
}

/// The cgroup2 mount point, from `/proc/mounts`.
pub(crate) fn cgroup2_mount() -> Result<&'static Path> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mounts = fs::read_to_string("/proc/mounts").ok()?;
            mounts.lines().find_map(|line| {
                let mut f = line.split_whitespace();
                let (_dev, mnt, fstype) = (f.next()?, f.next()?, f.next()?);
                (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(mnt)))
            })
        })
        .as_deref()
        .context("no cgroup2 filesystem in /proc/mounts")
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `<cgroup2>/pgkeep-test-<checkout-id>`: the parent of this checkout's environment cgroups.
pub(crate) fn checkout_cgroup_dir() -> Result<PathBuf> {
    Ok(cgroup2_mount()?.join(format!("{CGROUP_PREFIX}{}", checkout_id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkout_id_is_short_hex() {
        let id = checkout_id();
        assert_eq!(id.len(), 8);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, checkout_id());
    }

    #[test]
    fn mount_unescape() {
        assert_eq!(unescape_mount(r"/a\040b"), "/a b");
        assert_eq!(
            unescape_mount("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
    }
}
