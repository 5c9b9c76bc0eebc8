//! `diskferry bench`: prints the figures of [`crate::bench`], the
//! bottleneck of a full download and of a delta, and their estimates.

use anyhow::Result;
use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;
use serde_json::json;

use crate::bench::{self, Estimate, Rates};
use crate::cli::BenchArgs;
use crate::identity::{self, normalize_fingerprint};
use crate::output::print_json;
use crate::units::human_bytes;

pub fn run(a: BenchArgs) -> Result<()> {
    let root = super::target_arg::state_root(a.config.as_deref(), a.common.state_dir.clone())?;
    let size = match (&a.size, &a.disk) {
        (Some(s), _) => diskferry_protocol::parse_size(s)
            .filter(|n| *n > 0)
            .ok_or_else(|| Error::new(ErrorCode::Usage, format!("--size {s:?} is not a size like 2T or 500G")))?,
        (None, Some(d)) => std::fs::File::open(d)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .map_err(|e| Error::io(diskferry_sync_engine::Place::Source, "sizing", d, e))?,
        (None, None) => 1 << 40,
    };
    // The peer first: a refused fingerprint fails before minutes of measuring.
    let net = match (&a.peer, &a.peer_fingerprint) {
        (Some(peer), Some(fp)) => {
            let fp = normalize_fingerprint(fp).ok_or_else(|| {
                Error::new(ErrorCode::Usage, "--peer-fingerprint must be 64 hex digits (`diskferry id` on the peer)")
            })?;
            let id = identity::load(&root)?;
            let rt = super::net::runtime()?;
            let addr = rt.block_on(super::net::resolve(peer))?;
            Some((rt.block_on(bench::network(&id, addr, &fp, a.max_mtu))?, same_host(addr)))
        }
        _ => None,
    };
    let mut rates = bench::local(a.disk.as_deref(), &root, a.threads)?;
    if let Some((n, same)) = net {
        rates.quic = Some(n.quic);
        rates.peer_write_fsync = n.peer_write;
        rates.handshake = Some(n.handshake);
        rates.same_host = same;
        // The commit's fsyncs happen on the receiver.
        if let Some(f) = n.peer_fsync {
            rates.fsync_latency = f;
        }
    }
    let (full, delta) = (bench::full_download(&rates, size), bench::delta(&rates, size));
    if a.common.json {
        print_json(&json!({
            "size_bytes": size,
            "rates": rates,
            "full_download": full,
            "delta": delta,
            "peer": a.peer,
        }));
        return Ok(());
    }
    print_human(&rates, size, &full, &delta, a.peer.as_deref());
    Ok(())
}

/// Whether `addr` is this host (loopback, or one of its addresses).
fn same_host(addr: std::net::SocketAddr) -> bool {
    addr.ip().is_loopback() || std::net::UdpSocket::bind((addr.ip(), 0)).is_ok()
}

fn rate(r: f64) -> String {
    format!("{}/s", human_bytes(r as u64))
}

fn print_human(r: &Rates, size: u64, full: &Estimate, delta: &Estimate, peer: Option<&str>) {
    crate::outln!("this host");
    crate::outln!("  read, cold     {}", rate(r.read_cold));
    crate::outln!("  read, hot      {}", rate(r.read_hot));
    crate::outln!("  hash (blake3)  {}", rate(r.hash));
    crate::outln!("  write + fsync  {}", rate(r.write_fsync));
    if let (Some(peer), Some(q)) = (peer, r.quic) {
        crate::outln!("to {peer}");
        crate::outln!("  QUIC           {}", rate(q));
        if let Some(w) = r.peer_write_fsync {
            crate::outln!("  peer write     {}", rate(w));
        }
        if r.same_host {
            crate::outln!("  (the peer is this host: both agents share its cores)");
        }
    }
    let secs = |s: f64| match s {
        s if s >= 3600.0 => format!("{:.1} h", s / 3600.0),
        s if s >= 60.0 => format!("{:.0} min", s / 60.0),
        s => format!("{s:.1} s"),
    };
    crate::outln!("for a {} disk", human_bytes(size));
    crate::outln!(
        "  full download  {} (limited by {}, {})",
        secs(full.seconds),
        full.bottleneck,
        rate(full.bytes_per_s)
    );
    crate::outln!(
        "  delta          {} to read and hash it all (limited by {}, {}), plus the changed blocks",
        secs(delta.seconds),
        delta.bottleneck,
        rate(delta.bytes_per_s)
    );
}
