//! `diskferry bench`: what limits a full download and a delta between this
//! host and a peer. It measures this host's read (hot, and cold after
//! dropping the sample's cached pages), hash (blake3 over 64 KiB blocks on
//! every core, as a push hashes), fsync'd write, and — with a peer — QUIC
//! throughput to the peer's agent and the peer's fsync'd write (a bench
//! stream the peer drains without touching any target). A full download
//! streams read → hash → network → peer write, so it goes at the slowest
//! of them; a delta reads and hashes the whole disk and sends little.

use std::io::Seek;
use std::path::Path;
use std::time::{Duration, Instant};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::{Error, Place};
use rayon::prelude::*;
use serde::Serialize;

use crate::identity::Identity;

/// The most of a disk read for the read figures.
const READ_AT_MOST: u64 = 1 << 30;
/// The sample written (and read back) without `--disk`.
const SAMPLE: u64 = 256 << 20;
/// How long the network is measured.
const NET_FOR: Duration = Duration::from_secs(3);

/// Bytes a second of each stage; `None`: not measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rates {
    pub read_hot: f64,
    pub read_cold: f64,
    pub hash: f64,
    pub write_fsync: f64,
    pub quic: Option<f64>,
    pub peer_write_fsync: Option<f64>,
    /// One small write and fsync on the receiving side (a commit takes a few), seconds.
    pub fsync_latency: f64,
    /// The QUIC handshake to the peer, seconds.
    pub handshake: Option<f64>,
    /// The peer is this host: both agents share its cores.
    pub same_host: bool,
}

/// What a network measurement found: throughput, the peer's write and
/// fsync latency, the handshake.
pub struct Network {
    pub quic: f64,
    pub peer_write: Option<f64>,
    pub peer_fsync: Option<f64>,
    pub handshake: f64,
}

/// How long a move of `size_bytes` would take, and what limits it.
#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    pub seconds: f64,
    pub bottleneck: &'static str,
    pub bytes_per_s: f64,
}

/// Fsyncs a commit takes on the receiving side (journal, catalog, directories).
const COMMIT_FSYNCS: f64 = 6.0;

/// A full download: read (cold: a disk not read lately), hash, network,
/// peer write, streamed, so at the slowest; plus the handshake and the
/// commit's fsyncs. On one host both agents share its cores, and the
/// stages' times per byte add up instead (reading, hashing on both sides,
/// QUIC both ways, writing).
pub fn full_download(r: &Rates, size: u64) -> Estimate {
    let mut stages = vec![("read", r.read_cold), ("hash", r.hash)];
    match (r.quic, r.peer_write_fsync) {
        (Some(net), Some(w)) if w > 0.0 => stages.extend([("network", net), ("peer write", w)]),
        (Some(net), _) => stages.push(("network", net)),
        // Without a peer: this host's write stands for the receiver's.
        (None, _) => stages.push(("write", r.write_fsync)),
    }
    if let (true, Some(net)) = (r.same_host, r.quic) {
        // Both agents on one host's cores: the stages do not overlap as on
        // two hosts; their times per byte add up (the target hashes too).
        let write = r.peer_write_fsync.unwrap_or(r.write_fsync);
        stages.push(("one host's cores, shared", 1.0 / (1.0 / r.read_cold + 2.0 / r.hash + 1.0 / net + 1.0 / write)));
    }
    let fixed = r.handshake.unwrap_or(0.0) + COMMIT_FSYNCS * r.fsync_latency;
    slowest(&stages, size, fixed)
}

/// A delta without change tracking: the whole disk read and hashed.
pub fn delta(r: &Rates, size: u64) -> Estimate {
    let fixed = r.handshake.unwrap_or(0.0) + COMMIT_FSYNCS * r.fsync_latency;
    slowest(&[("read", r.read_cold), ("hash", r.hash)], size, fixed)
}

fn slowest(stages: &[(&'static str, f64)], size: u64, fixed_seconds: f64) -> Estimate {
    let (name, rate) = stages
        .iter()
        .copied()
        .filter(|(_, r)| *r > 0.0)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("nothing measured", f64::INFINITY));
    Estimate { seconds: size as f64 / rate + fixed_seconds, bottleneck: name, bytes_per_s: rate }
}

/// A scratch file's name in `dir`: `bench-PID-RANDOM.tmp` (this process's,
/// so [`sweep`] knows a dead one's).
pub fn scratch_path(dir: &Path) -> std::path::PathBuf {
    dir.join(format!("bench-{}-{:016x}.tmp", std::process::id(), rand::random::<u64>()))
}

/// Removes the scratch files of bench runs whose process is gone (killed
/// before it removed them).
pub fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix("bench-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            tracing::info!(pid, "removing a killed bench's scratch file {name}");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A 4 KiB write and fsync in `dir`, three times: the median, seconds.
pub fn fsync_latency(dir: &Path) -> Result<f64, Error> {
    let path = scratch_path(dir);
    let io = |e| Error::io(Place::State, "writing", &path, e);
    let mut times = Vec::new();
    let measured = (|| {
        for _ in 0..3 {
            let start = Instant::now();
            let mut f = std::fs::File::create(&path)?;
            std::io::Write::write_all(&mut f, &[7u8; 4096])?;
            f.sync_all()?;
            times.push(start.elapsed().as_secs_f64());
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    measured.map_err(io)?;
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}

/// A file's or block device's size (seeking to its end works for both).
fn disk_len(path: &Path) -> Result<u64, Error> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(Place::Source, "opening", path, e))?;
    f.seek(std::io::SeekFrom::End(0)).map_err(|e| Error::io(Place::Source, "sizing", path, e))
}

/// Reads `len` bytes of `path` from its start as a push's source does, in
/// 4 MiB pieces spread over `threads` (the hashing threads): bytes a
/// second. One thread reading in turn measured half what a push read on
/// this project's VM, where filling fresh page-cache pages costs CPU, and
/// the estimate came out at twice the push (2.14 s against 0.99 s).
fn read_rate(path: &Path, len: u64, cold: bool, threads: Option<usize>) -> Result<f64, Error> {
    const PIECE: u64 = 4 << 20;
    let io = |e| Error::io(Place::Source, "reading", path, e);
    let f = std::fs::File::open(path).map_err(io)?;
    if cold {
        // Only this file's cached pages go: nothing else on the host is evicted.
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).map_err(|e| io(e.into()))?;
    }
    let pool = diskferry_sync_engine::thread_pool(threads)
        .map_err(|e| Error::new(ErrorCode::Internal, format!("thread pool: {e}")))?;
    let start = Instant::now();
    let done: std::io::Result<u64> = pool.install(|| {
        (0..len.div_ceil(PIECE))
            .into_par_iter()
            .map_init(
                || vec![0u8; PIECE as usize],
                |buf, i| {
                    let off = i * PIECE;
                    let want = PIECE.min(len - off) as usize;
                    let mut got = 0;
                    while got < want {
                        match std::os::unix::fs::FileExt::read_at(&f, &mut buf[got..want], off + got as u64)? {
                            0 => break,
                            n => got += n,
                        }
                    }
                    Ok(got as u64)
                },
            )
            .sum()
    });
    Ok(done.map_err(io)? as f64 / start.elapsed().as_secs_f64().max(1e-6))
}

/// blake3 over 64 KiB blocks on every core, for at least half a second.
fn hash_rate(threads: Option<usize>) -> Result<f64, Error> {
    let pool = diskferry_sync_engine::thread_pool(threads)
        .map_err(|e| Error::new(ErrorCode::Internal, format!("thread pool: {e}")))?;
    let mut buf = vec![0u8; 64 << 20];
    rand::fill(&mut buf[..]);
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < Duration::from_millis(500) {
        pool.install(|| buf.par_chunks(64 << 10).map(blake3::hash).count());
        done += buf.len() as u64;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// Writes `len` incompressible bytes to `path` as an apply does (writeback
/// started behind the writes, one fsync at the end), twice: the better
/// rate, in bytes a second (one run can meet another's writeback). The
/// file is removed.
pub fn write_rate(path: &Path, len: u64) -> Result<f64, Error> {
    let first = write_once(path, len / 2)?;
    Ok(first.max(write_once(path, len / 2)?))
}

fn write_once(path: &Path, len: u64) -> Result<f64, Error> {
    use diskferry_sync_engine::store::{OpenHow, RealFs, Vfs};
    let io = |e| Error::io(Place::State, "writing", path, e);
    let mut block = vec![0u8; 1 << 20];
    rand::fill(&mut block[..]);
    let start = Instant::now();
    let written = (|| {
        let disk = RealFs.open(path, OpenHow::Truncate)?;
        let mut off = 0;
        while off < len {
            disk.write_at(off, &block)?;
            off += block.len() as u64;
            if off % (8 << 20) == 0 {
                disk.start_writeback(off - (8 << 20), 8 << 20);
            }
        }
        disk.sync()
    })();
    let seconds = start.elapsed().as_secs_f64().max(1e-6);
    let _ = std::fs::remove_file(path);
    written.map_err(io)?;
    Ok(len as f64 / seconds)
}

fn write_sample(path: &Path, len: u64) -> Result<(), Error> {
    let io = |e| Error::io(Place::State, "writing", path, e);
    let mut block = vec![0u8; 1 << 20];
    rand::fill(&mut block[..]);
    let mut f = std::fs::File::create(path).map_err(io)?;
    for _ in 0..len / block.len() as u64 {
        std::io::Write::write_all(&mut f, &block).map_err(io)?;
    }
    f.sync_all().map_err(io)
}

/// This host's figures: on `disk` if given (its first GiB), else on a
/// sample written in `scratch` (and removed).
pub fn local(disk: Option<&Path>, scratch: &Path, threads: Option<usize>) -> Result<Rates, Error> {
    sweep(scratch);
    let sample = scratch_path(scratch);
    let write_fsync = write_rate(&scratch_path(scratch), SAMPLE);
    let measured = (|| {
        let write_fsync = write_fsync?;
        // The sample is read back below: written again, since measuring removed it.
        if disk.is_none() {
            write_sample(&sample, SAMPLE)?;
        }
        let (path, len) = match disk {
            Some(d) => (d.to_path_buf(), disk_len(d)?.min(READ_AT_MOST)),
            None => (sample.clone(), SAMPLE),
        };
        let read_cold = read_rate(&path, len, true, threads)?;
        let read_hot = read_rate(&path, len, false, threads)?;
        Ok(Rates {
            read_hot,
            read_cold,
            hash: hash_rate(threads)?,
            write_fsync,
            quic: None,
            peer_write_fsync: None,
            fsync_latency: fsync_latency(scratch)?,
            handshake: None,
            same_host: false,
        })
    })();
    let _ = std::fs::remove_file(&sample);
    measured
}

/// QUIC throughput to the agent at `peer` (bytes a second), and its fsync'd write.
pub async fn network(
    id: &Identity,
    peer: std::net::SocketAddr,
    fingerprint: &str,
    max_mtu: Option<u16>,
) -> Result<Network, Error> {
    let began = Instant::now();
    let (endpoint, conn) =
        crate::push::connect_peer(id, peer, fingerprint, max_mtu, crate::transport::DEFAULT_IDLE_TIMEOUT).await?;
    let handshake = began.elapsed().as_secs_f64();
    // A refusal comes after the handshake (TLS 1.3): said as a push says it.
    let lost = |e: &dyn std::fmt::Display| match conn.close_reason() {
        Some(reason) => crate::push::connection_error(reason, true, peer, id),
        None => Error::new(ErrorCode::Connection, format!("bench stream to {peer}: {e}")),
    };
    let mut s = conn.open_uni().await.map_err(|e| lost(&e))?;
    s.write_all(&crate::transport::BENCH_STREAM_MAGIC).await.map_err(|e| lost(&e))?;
    let mut block = vec![0u8; 1 << 20];
    rand::fill(&mut block[..]);
    let block = bytes::Bytes::from(block);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < NET_FOR {
        match s.write_chunk(block.clone()).await {
            Ok(()) => sent += block.len() as u64,
            // The agent takes one bench at a time.
            Err(quinn::WriteError::Stopped(code)) if code == quinn::VarInt::from_u32(1) => {
                return Err(Error::new(ErrorCode::Busy, format!("the agent at {peer} is running another bench"))
                    .hint("run it again in a minute"))
            }
            Err(e) => return Err(lost(&e)),
        }
    }
    s.finish().map_err(|e| lost(&e))?;
    // Resolves once the peer read it all.
    let _ = s.stopped().await;
    let seconds = start.elapsed().as_secs_f64();
    let answer = tokio::time::timeout(Duration::from_secs(60), async {
        let mut r = conn.accept_uni().await.map_err(|e| lost(&e))?;
        r.read_to_end(4096).await.map_err(|e| lost(&e))
    })
    .await
    .map_err(|_| Error::new(ErrorCode::Connection, format!("{peer} did not answer the bench session")))??;
    if answer.is_empty() {
        return Err(lost(&"no answer"));
    }
    conn.close(0u32.into(), b"bench done");
    endpoint.wait_idle().await;
    let v: serde_json::Value = serde_json::from_slice(&answer)
        .map_err(|e| Error::new(ErrorCode::Protocol, format!("the peer's bench answer: {e}")))?;
    let received = v["received_bytes"].as_u64().unwrap_or(0);
    if received < sent {
        return Err(Error::new(ErrorCode::Protocol, format!("the peer read {received} of {sent} bench bytes")));
    }
    let peer_write = match (v["write_bytes"].as_f64(), v["write_seconds"].as_f64()) {
        (Some(b), Some(s)) if b > 0.0 && s > 0.0 => Some(b / s),
        _ => None,
    };
    Ok(Network { quic: sent as f64 / seconds, peer_write, peer_fsync: v["fsync_seconds"].as_f64(), handshake })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slowest_stage_is_named() {
        let r = Rates {
            read_hot: 3e9,
            read_cold: 1e9,
            hash: 2e9,
            write_fsync: 5e8,
            quic: Some(4e8),
            peer_write_fsync: Some(6e8),
            fsync_latency: 0.01,
            handshake: Some(0.04),
            same_host: false,
        };
        let f = full_download(&r, 4_000_000_000);
        assert_eq!(f.bottleneck, "network");
        assert!((f.seconds - 10.1).abs() < 1e-9, "{}", f.seconds);
        let d = delta(&r, 4_000_000_000);
        assert_eq!(d.bottleneck, "read");
        let alone = Rates { quic: None, peer_write_fsync: None, handshake: None, ..r.clone() };
        assert_eq!(full_download(&alone, 1).bottleneck, "write");
        // One host: hashing twice and QUIC both ways share its cores.
        let one = Rates { same_host: true, quic: Some(1e9), hash: 2e9, ..r };
        assert_eq!(full_download(&one, 1).bottleneck, "one host's cores, shared");
    }
}
