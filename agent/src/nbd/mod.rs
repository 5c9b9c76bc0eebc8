//! Sources read through NBD: an NBD URL served by anyone (`qemu-nbd`,
//! QEMU's own NBD server for a running VM), or an image file in a format
//! QEMU reads (`--format qcow2|vmdk|vhdx|vdi`) for which diskferry starts
//! and stops a read-only `qemu-nbd` itself. The engine reads them as any
//! disk: [`NbdStorage`] is its [`Storage`], `base:allocation` its holes.

pub mod bitmap;
pub mod client;
mod connect;
mod direct;
mod error;
mod leftover;
mod qemu_img;
mod qemu_nbd;
pub mod qmp;
mod reader;
pub mod running;
pub mod storage_daemon;
mod stream;
pub mod url;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use diskferry_protocol::nbd::{BASE_ALLOCATION, STATE_ZERO};
use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::store::{DiskKind, FileId, Meta, OpenHow, RealFs, Stamp, Storage, Vfs};
use diskferry_sync_engine::Error;

use client::NbdClient;
use connect::{connect, dirty_extents};
pub use qemu_nbd::{Format, QemuNbd};
use url::NbdUrl;

/// An NBD export as the engine's storage: read-only.
#[derive(Debug)]
pub struct NbdStorage {
    client: Arc<NbdClient>,
    allocation: Option<u32>,
    /// For an image at rest behind diskferry's own QEMU: its plain
    /// data, read from its files without NBD's copies.
    direct: Option<direct::DirectMap>,
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "an NBD source is read-only")
}

impl Storage for NbdStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.client.export().size)
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.direct {
            Some(map) => map.read_at(off, buf, |at, part| Ok(self.client.read_at(at, part)?)),
            None => Ok(self.client.read_at(off, buf)?),
        }
    }

    fn will_need(&self, off: u64, len: u64) {
        if let Some(map) = &self.direct {
            map.will_need(off, len);
        }
    }

    fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(read_only())
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn zero_range(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn reserve(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    /// Ranges `base:allocation` does not report as reading zeros (an
    /// unallocated range that is not known to read zeros may show a backing
    /// file: it is read).
    fn data_ranges(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let Some(ctx) = self.allocation else { return Ok(if len == 0 { Vec::new() } else { vec![(off, len)] }) };
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (at, l, flags) in self.client.extents(ctx, off, len)? {
            if flags & STATE_ZERO != 0 {
                continue;
            }
            match out.last_mut() {
                Some((o, ol)) if *o + *ol == at => *ol += l,
                _ => out.push((at, l)),
            }
        }
        Ok(out)
    }
}

/// A [`Vfs`] that is the host's, except that one pseudo path is the NBD
/// export (the engine opens its sources and keeps its state through one Vfs).
#[derive(Debug)]
pub struct NbdVfs {
    path: PathBuf,
    storage: Arc<NbdStorage>,
    /// The image file diskferry serves itself: its stamp is the source's.
    image: Option<PathBuf>,
    /// A running VM's node, and the bitmap started just before this read:
    /// while it counts no write, the disk stood still.
    witness: Option<(running::Node, String)>,
    /// A served-by-anyone export cannot say whether it was written: every
    /// look gives a new stamp, so such a read is fuzzy.
    looks: AtomicI64,
}

impl NbdVfs {
    fn meta(&self) -> io::Result<Option<Meta>> {
        let len = self.storage.client.export().size;
        if let Some(image) = &self.image {
            let Some(m) = RealFs.metadata(image)? else { return Ok(None) };
            return Ok(Some(Meta { kind: DiskKind::File, len, stamp: m.stamp, identity: m.identity }));
        }
        let mut look = self.looks.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some((node, bitmap)) = &self.witness {
            let written = node.dirty_bytes(bitmap).map_err(|e| io::Error::other(e.message))?;
            if written == 0 {
                look = 0;
            }
        }
        let identity: FileId = (u64::MAX - 1, u64::from_le_bytes(blake3_8(self.path.as_os_str().as_encoded_bytes())));
        let stamp = Stamp::File { len, mtime_ns: look, ctime_ns: look, ino: identity.1 };
        Ok(Some(Meta { kind: DiskKind::File, len, stamp, identity }))
    }
}

fn blake3_8(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(bytes);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    b
}

impl Vfs for NbdVfs {
    fn open(&self, path: &Path, how: OpenHow) -> io::Result<Arc<dyn Storage>> {
        if path == self.path {
            return match how {
                OpenHow::Read => Ok(self.storage.clone()),
                _ => Err(read_only()),
            };
        }
        RealFs.open(path, how)
    }

    fn metadata(&self, path: &Path) -> io::Result<Option<Meta>> {
        if path == self.path {
            return self.meta();
        }
        RealFs.metadata(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealFs.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        RealFs.remove_file(path)
    }

    fn remove_later(&self, path: &Path) -> io::Result<()> {
        RealFs.remove_later(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        RealFs.create_dir_all(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        RealFs.sync_dir(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealFs.list_dir(dir)
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        RealFs.lock(path)
    }
}

impl Source {
    /// The byte ranges the dirty bitmap `name` (exported with the source)
    /// marks as written; `None` if the server did not grant it.
    pub fn dirty_ranges(&self, name: &str) -> Result<Option<Vec<(u64, u64)>>, Error> {
        let Some(client) = &self.client else { return Ok(None) };
        let Some(ctx) = client.export().context(&format!("qemu:dirty-bitmap:{name}")) else { return Ok(None) };
        dirty_extents(client, ctx).map(Some)
    }
}

/// A source ready for the engine: the Vfs to read it through, the path to
/// read, and the disk its history belongs to.
#[derive(Debug)]
pub struct Source {
    /// What the engine opens the source with.
    pub vfs: Arc<dyn Vfs>,
    /// The path the engine reads (a pseudo path for an NBD export).
    pub read_path: PathBuf,
    /// The connection, when read through NBD.
    pub client: Option<Arc<NbdClient>>,
    /// The `qemu-nbd` diskferry started, stopped when this drops.
    pub server: Option<QemuNbd>,
    /// QEMU's export of a running VM's node, stopped when this drops
    /// (after the connection: fields drop in order).
    pub export: Option<running::Export>,
}

/// Opens `src`: a raw file or device as it is; an NBD URL through NBD; an
/// image in another format through a `qemu-nbd` started here.
pub fn open_source(src: &Path, format: Format, bitmap: Option<&str>) -> Result<Source, Error> {
    let text = src.to_string_lossy();
    let (url, server, image) = if url::is_nbd_url(&text) {
        if format != Format::Raw {
            return Err(Error::new(
                ErrorCode::Usage,
                "--format applies to image files; an NBD URL is read as its server exports it",
            ));
        }
        let url: NbdUrl = text.parse().map_err(|e: String| Error::new(ErrorCode::Usage, format!("{text}: {e}")))?;
        (url, None, None)
    } else if format == Format::Raw {
        return Ok(Source {
            vfs: Arc::new(RealFs),
            read_path: src.to_path_buf(),
            client: None,
            server: None,
            export: None,
        });
    } else {
        if !src.exists() {
            return Err(Error::new(ErrorCode::NotFound, format!("source {} does not exist", src.display())));
        }
        let (server, url) = QemuNbd::start(src, format, bitmap)?;
        (url, Some(server), Some(src.to_path_buf()))
    };
    let mut server = server;
    let client = connect(&url, bitmap, server.as_mut())?;
    let read_path = image.clone().unwrap_or_else(|| PathBuf::from(url.to_string()));
    let direct = image.as_deref().and_then(|image| direct_map(image, format, &client));
    let vfs = nbd_vfs(&client, read_path.clone(), image, None, direct);
    Ok(Source { vfs: Arc::new(vfs), read_path, client: Some(client), server, export: None })
}

/// Opens a running VM's node through QEMU's NBD server, with `bitmap`
/// exported; `pending` is the bitmap this pass started, the witness of
/// whether the guest wrote during the read.
pub fn open_running(node: &running::Node, bitmap: Option<&str>, pending: &str) -> Result<Source, Error> {
    let (export, url) = running::Export::start(node, bitmap)?;
    let client = connect(&url, bitmap, None)?;
    // Not the image's path: such a read's history gets no at-rest stamp
    // (whether the disk stood still is the pending bitmap's to say).
    let read_path = match node.image_at_rest() {
        Some(image) => PathBuf::from(format!("qemu-storage-daemon:{}", image.display())),
        None => PathBuf::from(format!("qmp:{}#{}", node.qmp_socket().display(), node.name)),
    };
    // An image at rest is read from its files where it can be: a hinted
    // read's hundreds of scattered ranges cost an NBD round trip each, and a
    // hint the spot check turns down is read in full.
    let direct = node.image_at_rest().and_then(|image| direct_map(image, Format::Qcow2, &client));
    let vfs = nbd_vfs(&client, read_path.clone(), None, Some((node.clone(), pending.to_string())), direct);
    Ok(Source { vfs: Arc::new(vfs), read_path, client: Some(client), server: None, export: Some(export) })
}

/// The map of the plain data of `image` (served through `client`), or
/// `None` when NBD must read it all.
fn direct_map(image: &Path, format: Format, client: &NbdClient) -> Option<direct::DirectMap> {
    match direct::DirectMap::load(image, format, client) {
        Ok(map) => {
            tracing::debug!(image = %image.display(), mapped_bytes = map.mapped_bytes(), "reading plain data from the image's files");
            Some(map)
        }
        Err(why) => {
            tracing::info!(image = %image.display(), %why, "reading the whole image through NBD");
            None
        }
    }
}

fn nbd_vfs(
    client: &Arc<NbdClient>,
    path: PathBuf,
    image: Option<PathBuf>,
    witness: Option<(running::Node, String)>,
    direct: Option<direct::DirectMap>,
) -> NbdVfs {
    let allocation = client.export().context(BASE_ALLOCATION);
    let storage = Arc::new(NbdStorage { client: client.clone(), allocation, direct });
    NbdVfs { path, storage, image, witness, looks: AtomicI64::new(0) }
}
