//! The bundled tiny pipeline: `fixtures/sd3-tiny` (random weights, SD3-medium layout, made with diffusers by
//! `scripts/make_fixtures.py`), used when no `--model` is given. Its files are embedded at build time
//! (`build.rs`); at run time the source-tree copy is used when it is still there, otherwise the embedded files
//! are written once to a cache folder.

use std::path::{Path, PathBuf};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/bundled_tiny.rs"));
}

/// What the CLI prints about it.
pub const DESCRIPTION: &str = "the bundled tiny SD3 pipeline (fixtures/sd3-tiny: random weights, 64x64 by default)";

/// A folder holding the bundled model: the source tree's, or the embedded copy unpacked under the temp dir.
pub fn tiny_model_dir() -> std::io::Result<PathBuf> {
    if embedded::FILES.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "this build has no bundled model (fixtures/sd3-tiny was missing when it was built): pass --model DIR",
        ));
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd3-tiny");
    if matches_embedded(&source) {
        return Ok(source);
    }
    let hash = embedded::FILES.iter().fold(0xcbf29ce484222325u64, |h, (name, data)| {
        let h = name.bytes().fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        (h ^ data.len() as u64).wrapping_mul(0x100000001b3)
    });
    let dir = std::env::temp_dir().join(format!("sd3-tiny-{}-{hash:016x}", env!("CARGO_PKG_VERSION")));
    if !matches_embedded(&dir) {
        unpack_to(&dir)?;
    }
    Ok(dir)
}

/// Write the embedded model files under `dir`.
pub fn unpack_to(dir: &Path) -> std::io::Result<()> {
    for (name, data) in embedded::FILES {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap_or(dir))?;
        std::fs::write(path, data)?;
    }
    Ok(())
}

/// Whether `dir` holds every embedded file with the embedded size.
fn matches_embedded(dir: &Path) -> bool {
    !embedded::FILES.is_empty()
        && embedded::FILES
            .iter()
            .all(|(name, data)| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == data.len() as u64))
}
