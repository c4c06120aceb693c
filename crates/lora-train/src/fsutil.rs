//! Output files are written to a temporary sibling, then renamed: never half-written.

use anyhow::Context;
use std::path::Path;

/// Write `bytes` to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    lora_core::utils::write_atomic(path, bytes)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))
}

/// Serialize `value` as pretty JSON to `path` atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Write a folder of `files` (name, bytes) atomically: filled as a hidden sibling, then swapped in
/// for `dir` (an existing `dir` is replaced only once the new one is complete).
pub fn write_dir_atomic(dir: &Path, files: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("{}: cannot create folder", parent.display()))?;
    let name = dir
        .file_name()
        .with_context(|| format!("{}: not a folder path", dir.display()))?
        .to_string_lossy()
        .into_owned();
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "{}: a file is in the way of the output folder",
            dir.display()
        );
    }
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp{pid}"));
    let old = parent.join(format!(".{name}.old{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let fill = || -> anyhow::Result<()> {
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("{}: cannot create folder", tmp.display()))?;
        for (file, bytes) in files {
            let p = tmp.join(file);
            std::fs::write(&p, bytes).with_context(|| format!("{}: cannot write", p.display()))?;
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("{}: cannot sync", p.display()))?;
        }
        if dir.exists() {
            std::fs::rename(dir, &old)
                .with_context(|| format!("{}: cannot replace", dir.display()))?;
        }
        std::fs::rename(&tmp, dir).with_context(|| format!("{}: cannot write", dir.display()))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    };
    fill().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.exists() && old.exists() {
            let _ = std::fs::rename(&old, dir);
        }
    })
}

/// Remove the hidden `.NAME.tmpPID` / `.NAME.oldPID` siblings that [`write_dir_atomic`] leaves in
/// `dir` when its process is killed mid-write (their complete versions were never swapped in).
pub fn remove_stale_temps(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.contains(".tmp") || name.contains(".old")) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
