//! Small filesystem helpers shared by the IO modules.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `contents` to `path` with the given mode, atomically: a temporary file in the same
/// directory is written, fsynced and renamed over the target, and the directory is fsynced.
/// The mode is applied at creation, so a secret is never briefly world-readable.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = write_staged(path, contents, mode, None)?;
    // rename() replaces a symlink at `path` itself; it never writes through it.
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(parent(path))?.sync_all()?;
    Ok(())
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `contents` to a new temporary file beside `path` (mode `mode`, owner `owner` when
/// given), fsynced, and returns its path; the caller renames it into place (several files can
/// so be replaced back to back). The temporary file is removed on error.
pub fn write_staged(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<std::path::PathBuf> {
    let dir = parent(path);
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // An unpredictable name, created exclusively and without following symlinks: nobody who can
    // write into `dir` can make this write land in a file of their choosing.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{}.{}-{nonce:08x}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is filtered by the umask; set it explicitly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.write_all(contents)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// True when the file's mode grants any permission to group or others.
pub fn readable_by_others(meta: &fs::Metadata) -> bool {
    meta.permissions().mode() & 0o077 != 0
}

/// Removes everything inside `dir`, keeping the directory itself (it may be a mount point, or
/// its parent not writable). A missing directory is empty.
pub fn empty_dir(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let p = e?.path();
        if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn emptying_keeps_the_directory_and_does_not_follow_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "x").unwrap();
        let d = dir.path().join("data");
        fs::create_dir_all(d.join("base/1")).unwrap();
        fs::write(d.join("PG_VERSION"), "15").unwrap();
        std::os::unix::fs::symlink(&outside, d.join("link")).unwrap();
        empty_dir(&d).unwrap();
        assert!(d.is_dir());
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        assert!(outside.join("keep").exists());
        empty_dir(&dir.path().join("missing")).unwrap();
    }

    #[test]
    fn writes_with_the_mode_and_replaces_a_planted_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let key = dir.path().join("ca.key");
        std::os::unix::fs::symlink(&victim, &key).unwrap();
        write_atomic(&key, b"secret", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let meta = fs::symlink_metadata(&key).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::read(&key).unwrap(), b"secret");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(leftovers.len(), 2, "no temporary file left behind");
    }
}
