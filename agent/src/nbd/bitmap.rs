//! Persistent dirty bitmaps of a qcow2 image at rest (`--changes
//! dirty-bitmap --format qcow2`): diskferry owns the bitmaps named
//! `diskferry-<generation>`, each started right after the push that made
//! that generation read the image, so it holds every write since. The next
//! push exports the image with that bitmap (`qemu-nbd -B`) and reads only
//! its dirty extents; after its commit the bitmap of the new generation is
//! added and the superseded ones removed. Adding a bitmap needs the image
//! unused: diskferry's own qemu-nbd has stopped by then.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use diskferry_protocol::{ErrorCode, Generation};
use diskferry_sync_engine::Error;

/// The bitmap that counts the writes since `generation`.
pub fn name_for(generation: Generation) -> String {
    format!("diskferry-{}", generation.to_hex())
}

/// A bitmap of the image: its name and whether it can be trusted to hold
/// every write since it started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// `in-use` (its writer died with the image open) or not `auto` (it was
    /// disabled and records nothing): not to be trusted.
    pub inconsistent: bool,
}

fn qemu_img(args: &[&OsStr]) -> Result<String, Error> {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| Error::new(ErrorCode::NotFound, format!("cannot run qemu-img: {e}")).hint("install qemu-utils"))?;
    if !o.status.success() {
        let shown: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        return Err(Error::new(
            ErrorCode::InvalidInput,
            format!("qemu-img {}: {}", shown.join(" "), String::from_utf8_lossy(&o.stderr).trim()),
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn bitmap_op(op: &str, image: &Path, name: &str) -> Result<(), Error> {
    qemu_img(&[OsStr::new("bitmap"), OsStr::new(op), image.as_os_str(), OsStr::new(name)]).map(|_| ())
}

/// The image's persistent bitmaps.
pub fn list(image: &Path) -> Result<Vec<Bitmap>, Error> {
    let args = [OsStr::new("info"), OsStr::new("--output=json"), OsStr::new("--force-share"), image.as_os_str()];
    let text = qemu_img(&args)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::new(ErrorCode::InvalidInput, format!("qemu-img info of {}: {e}", image.display())))?;
    let bitmaps = v["format-specific"]["data"]["bitmaps"].as_array().cloned().unwrap_or_default();
    Ok(bitmaps
        .iter()
        .filter_map(|b| {
            let name = b["name"].as_str()?.to_string();
            let flags = b["flags"].as_array().cloned().unwrap_or_default();
            let inconsistent = flags.iter().any(|f| f == "in-use") || !flags.iter().any(|f| f == "auto");
            Some(Bitmap { name, inconsistent })
        })
        .collect())
}

/// Starts the bitmap of `generation` and removes diskferry's other ones.
pub fn rotate(image: &Path, generation: Generation) -> Result<(), Error> {
    let new = name_for(generation);
    let have = list(image)?;
    if !have.iter().any(|b| b.name == new && !b.inconsistent) {
        if have.iter().any(|b| b.name == new) {
            bitmap_op("--remove", image, &new)?;
        }
        bitmap_op("--add", image, &new)?;
    }
    for old in have.iter().filter(|b| b.name.starts_with("diskferry-") && b.name != new) {
        bitmap_op("--remove", image, &old.name)?;
    }
    Ok(())
}

/// Removes diskferry's bitmaps (none can describe the target any more).
pub fn drop_all(image: &Path) -> Result<(), Error> {
    for b in list(image)?.iter().filter(|b| b.name.starts_with("diskferry-")) {
        bitmap_op("--remove", image, &b.name)?;
    }
    Ok(())
}
