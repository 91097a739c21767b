//! Refuses key files that others could read or change, before byokd uses them.
//!
//! A local KEK readable by others hands every stored key to whoever also reads the store; a
//! KEK, store or usage ledger writable by others lets them swap the master key, revive a
//! revoked key or reset a tenant's spend. Group *read* of a KEK is allowed: Kubernetes adds it
//! to every file of a Secret mounted in a pod with `fsGroup`, even with `defaultMode: 0400`.
//!
//! The mode judged is the one of the file byokd reads: [`check`] takes the opened file
//! (`fstat`), so a file swapped between check and read cannot slip through, and a Kubernetes
//! Secret's symlink (`kek-k1 -> ..data/kek-k1`, itself 0777) is judged by its target.

use std::path::Path;

use super::KeyError;

/// What a file holds, which decides what others may do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFile {
    /// A local key-encryption key (`kms.local.keks`).
    Kek,
    /// The file store (`store.file.path`): ciphertext only, but its records are trusted.
    Store,
    /// The usage ledger beside the file store: the spend budgets are checked against.
    Ledger,
}

impl KeyFile {
    /// Permission bits refused: write by group or others for all, read by others for a KEK.
    pub const fn forbidden(self) -> u32 {
        match self {
            Self::Kek => 0o026,
            Self::Store | Self::Ledger => 0o022,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Kek => "KEK file",
            Self::Store => "key store",
            Self::Ledger => "usage ledger",
        }
    }
}

/// The one-line message of [`KeyError::LoosePermissions`]: the file, its mode, what is wrong
/// with it and the fix.
pub fn message(file: KeyFile, path: &Path, mode: u32) -> String {
    let bad = mode & file.forbidden();
    let mut what = Vec::new();
    if bad & 0o004 != 0 {
        what.push("readable by others");
    }
    match (bad & 0o020 != 0, bad & 0o002 != 0) {
        (true, true) => what.push("writable by group and others"),
        (true, false) => what.push("writable by group"),
        (false, true) => what.push("writable by others"),
        (false, false) => {}
    }
    let secret = if file == KeyFile::Kek {
        " (a Kubernetes Secret: mount it with `defaultMode: 0400`)"
    } else {
        ""
    };
    format!(
        "{} {} has mode {mode:04o}, {}; refusing to use it: run `chmod 600 {}`{secret}",
        file.name(),
        path.display(),
        what.join(" and "),
        path.display(),
    )
}

fn judge(file: KeyFile, path: &Path, meta: &std::fs::Metadata) -> Result<(), KeyError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & file.forbidden() != 0 {
            return Err(KeyError::LoosePermissions {
                file,
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = (file, path, meta);
    Ok(())
}

/// Checks an opened file, the one about to be read.
pub fn check(file: KeyFile, path: &Path, opened: &std::fs::File) -> Result<(), KeyError> {
    let meta = opened.metadata().map_err(|e| KeyError::io(path, e))?;
    judge(file, path, &meta)
}

/// Checks a file by path, following symlinks; a missing file passes (whoever reads or creates
/// it deals with that).
pub fn check_path(file: KeyFile, path: &Path) -> Result<(), KeyError> {
    match std::fs::metadata(path) {
        Ok(meta) => judge(file, path, &meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KeyError::io(path, e)),
    }
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn file_with_mode(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn what_each_kind_of_file_may_be() {
        let dir = tempfile::tempdir().unwrap();
        // (mode, KEK accepted, store/ledger accepted)
        for (mode, kek, store) in [
            (0o600, true, true),
            (0o400, true, true),
            (0o440, true, true), // a Secret with defaultMode 0400 in a pod with fsGroup
            (0o640, true, true),
            (0o644, false, true),
            (0o604, false, true),
            (0o620, false, false),
            (0o602, false, false),
            (0o660, false, false),
            (0o666, false, false),
        ] {
            let p = file_with_mode(dir.path(), &format!("f{mode:o}"), mode);
            assert_eq!(check_path(KeyFile::Kek, &p).is_ok(), kek, "KEK {mode:04o}");
            for f in [KeyFile::Store, KeyFile::Ledger] {
                assert_eq!(check_path(f, &p).is_ok(), store, "{f:?} {mode:04o}");
            }
            let opened = std::fs::File::open(&p).unwrap();
            assert_eq!(check(KeyFile::Kek, &p, &opened).is_ok(), kek);
        }
        assert!(check_path(KeyFile::Kek, &dir.path().join("missing")).is_ok());
    }

    #[test]
    fn the_message_names_file_mode_and_fix_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with_mode(dir.path(), "kek-k1", 0o644);
        let err = check_path(KeyFile::Kek, &p).unwrap_err().to_string();
        let path = p.display().to_string();
        for part in [
            "KEK file",
            path.as_str(),
            "mode 0644",
            "readable by others",
            "chmod 600",
            "defaultMode: 0400",
        ] {
            assert!(err.contains(part), "{part:?} missing in: {err}");
        }
        assert!(!err.contains('\n'), "{err}");
        let p = file_with_mode(dir.path(), "keys.json", 0o666);
        let err = check_path(KeyFile::Store, &p).unwrap_err().to_string();
        assert!(
            err.contains("key store")
                && err.contains("mode 0666")
                && err.contains("writable by group and others")
                && err.contains("chmod 600")
                && !err.contains("readable")
                && !err.contains("defaultMode"),
            "{err}"
        );
    }

    #[test]
    fn a_symlink_is_judged_by_its_target() {
        // The layout of a Kubernetes Secret volume: kek-k1 -> ..data/kek-k1.
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..data");
        std::fs::create_dir(&data).unwrap();
        let link = dir.path().join("kek-k1");
        std::os::unix::fs::symlink(data.join("kek-k1"), &link).unwrap();
        file_with_mode(&data, "kek-k1", 0o400);
        assert!(check_path(KeyFile::Kek, &link).is_ok());
        std::fs::set_permissions(data.join("kek-k1"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = check_path(KeyFile::Kek, &link).unwrap_err();
        assert!(matches!(
            err,
            KeyError::LoosePermissions { mode: 0o644, .. }
        ));
    }
}
