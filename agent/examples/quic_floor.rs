//! What the transport alone costs the sender: the disk's non-empty 64 KiB
//! blocks, taken from the same shared maps a push sends, written to an
//! agent's bench stream (which drops them) on the agent's QUIC settings:
//! no hashing, no framing, no window. Prints the sender's CPU seconds for
//! the bytes sent, to set beside a full push's source CPU (issue 8's
//! "source agent CPU ≤ 2x one b3sum pass").
//!
//! `cargo run --release --example quic_floor -- STATE_DIR PEER FINGERPRINT DISK [maps|hot|hashed]`
//! (`hot`: send one 1 MiB buffer over and over instead, as many bytes,
//! counted before the clock starts: the transport without reading the
//! image; `hashed`: hash each block with blake3 right before it is written,
//! 1 MiB at a time, all on one thread, so that quinn's copy into its packets
//! could find the bytes in cache: whether hashing next to the sending saves
//! anything over hashing on other threads).

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use diskferry_agent::units::cpu_seconds;

const BLOCK: usize = 64 << 10;
const BATCH: u64 = 4 << 20;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [state, peer, fingerprint, disk, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: quic_floor STATE_DIR PEER FINGERPRINT DISK [maps|hot|hashed]");
    };
    let mode = rest.first().map(String::as_str).unwrap_or("maps");
    let (hot, hashed) = match mode {
        "maps" => (false, false),
        "hot" => (true, false),
        "hashed" => (false, true),
        other => anyhow::bail!("unknown mode {other}: maps (the default), hot or hashed"),
    };
    let id = diskferry_agent::identity::load(&PathBuf::from(state))?;
    let peer: std::net::SocketAddr = peer.parse()?;
    let disk = diskferry_sync_engine::Disk::open(&PathBuf::from(disk))?;
    // One thread when hashing: the connection's driver then copies each
    // block into its packets on the thread that just hashed it.
    let rt = if hashed {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("df-net").build()?
    };
    rt.block_on(async move {
        let (endpoint, conn) = diskferry_agent::push::connect_peer(
            &id,
            peer,
            fingerprint,
            None,
            diskferry_agent::transport::DEFAULT_IDLE_TIMEOUT,
        )
        .await?;
        let mut s = conn.open_uni().await?;
        s.write_all(&diskferry_agent::transport::BENCH_STREAM_MAGIC).await?;
        // The image's non-empty blocks, as slices of its maps, one 4 MiB
        // batch at a time (a push hashes them from the same maps).
        let mut scratch = Vec::new();
        let mut batch_at = |off: u64| -> std::io::Result<Vec<Bytes>> {
            let len = BATCH.min(disk.len() - off) as usize;
            disk.with_bytes(off, len, &mut scratch, |bytes, owner| {
                let owner = owner.cloned().unwrap_or_else(|| Bytes::copy_from_slice(bytes));
                (0..len)
                    .step_by(BLOCK)
                    .map(|at| at..(at + BLOCK).min(len))
                    .filter(|r| !diskferry_sync_engine::hash::is_zero(&bytes[r.clone()]))
                    .map(|r| owner.slice(r))
                    .collect()
            })
        };
        let batches = disk.len().div_ceil(BATCH);
        // `hot`: as many bytes, counted before the clock starts, sent from
        // one buffer in 4 MiB writes, without touching the image.
        let hot_bytes = if hot {
            let mut n = 0;
            for b in 0..batches {
                n += batch_at(b * BATCH)?.iter().map(|c| c.len() as u64).sum::<u64>();
            }
            n
        } else {
            0
        };
        let one = Bytes::from(vec![0x5a; 1 << 20]);
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        let mut sent = 0u64;
        if hot {
            while sent < hot_bytes {
                let n = (hot_bytes - sent).min(BATCH) as usize;
                let mut chunks: Vec<Bytes> =
                    std::iter::repeat_n(one.clone(), n / one.len()).chain([one.slice(..n % one.len())]).collect();
                s.write_all_chunks(&mut chunks).await?;
                sent += n as u64;
            }
        } else {
            for b in 0..batches {
                let mut chunks = batch_at(b * BATCH)?;
                sent += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
                if !hashed {
                    s.write_all_chunks(&mut chunks).await?;
                    continue;
                }
                for group in chunks.chunks(16) {
                    for block in group {
                        std::hint::black_box(blake3::hash(block));
                    }
                    s.write_all_chunks(&mut group.to_vec()).await?;
                }
            }
        }
        s.finish()?;
        let _ = s.stopped().await;
        let (cpu, secs) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
        println!(
            "{{\"bytes_sent\": {sent}, \"seconds\": {secs:.3}, \"cpu_seconds\": {cpu:.3}, \"mode\": \"{mode}\", \"mb_per_cpu_second\": {:.0}}}",
            sent as f64 / cpu / 1e6
        );
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        Ok(())
    })
}
