//! sled's cost for the records of one Ordo write, outside Ordo: per write, a read and an
//! overwrite of one of 10,000 items (300 bytes), then as many of these as asked: an event
//! appended to its slot's feed (300 bytes), the slot's feed meta overwritten, and a dedup
//! entry appended (60 bytes); `per_txn` writes per sled transaction, with the applied index in
//! a second tree, as Ordo's apply does. Prints writes/s and CPU microseconds per write.
//!
//!   sled-floor [PER_TXN (12)] [RECORDS 1..4 (4)]
//!
//! With `OVERWRITE=1` the feed events overwrite 10,000 keys instead of appending, to tell the
//! cost of a second record from the cost of the tree's growth.
use sled::Transactional;
use std::time::Instant;
fn main() {
    let dir = std::env::temp_dir().join(format!("sledbench-{}", std::process::id()));
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(256 << 20)
        .mode(sled::Mode::HighThroughput)
        .open()
        .unwrap();
    let data = db.open_tree("data").unwrap();
    let sys = db.open_tree("sys").unwrap();
    let per_txn: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(12);
    let recs: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(4);
    assert!((1..=4).contains(&recs), "RECORDS is 1 to 4, not {recs}");
    // Read once, not per write: an environment lookup takes a lock and scans the environment.
    let overwrite = std::env::var_os("OVERWRITE").is_some();
    let val = vec![7u8; 300];
    let x = std::cell::Cell::new(88172645463325252u64);
    let seq = std::cell::Cell::new(0u64);
    // warm: 10k items
    for i in 0..10_000u64 {
        data.insert(format!("item/{:08}", i).as_bytes(), &val[..])
            .unwrap();
    }
    let n_txn = 4000;
    let t0 = Instant::now();
    let c0 = cpu();
    for t in 0..n_txn {
        (&data, &sys)
            .transaction(|(d, s)| {
                for _ in 0..per_txn {
                    let mut y = x.get();
                    y ^= y << 13;
                    y ^= y >> 7;
                    y ^= y << 17;
                    x.set(y);
                    let k = y % 10_000;
                    let slot = k % 1024;
                    let item = format!("item/{:08}", k);
                    let _ = d.get(item.as_bytes())?;
                    d.insert(item.as_bytes(), &val[..])?;
                    seq.set(seq.get() + 1);
                    let sq = seq.get();
                    if recs > 1 {
                        d.insert(feed_key(slot, sq, overwrite).as_bytes(), &val[..])?;
                    }
                    if recs > 2 {
                        d.insert(format!("meta/{:04}", slot).as_bytes(), &[1u8; 24][..])?;
                    }
                    if recs > 3 {
                        d.insert(
                            format!("dedup/{:04}/{:016}/{:016x}", slot, sq, y).as_bytes(),
                            &[2u8; 60][..],
                        )?;
                    }
                }
                s.insert(b"applied", &(t as u64).to_be_bytes())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .unwrap();
    }
    let el = t0.elapsed().as_secs_f64();
    let cpu_s = cpu() - c0;
    let writes = (n_txn * per_txn) as f64;
    println!(
        "per_txn={per_txn} recs={recs}: {:.0} writes/s, {:.1} us cpu per write, {:.1} us per txn",
        writes / el,
        cpu_s * 1e6 / writes,
        cpu_s * 1e6 / n_txn as f64
    );
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
}
/// This process's user + system CPU seconds, from `/proc/self/stat` (in clock ticks of 1/100 s).
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// The feed event's key: appended per slot, or one of 10,000 keys under `OVERWRITE=1`.
fn feed_key(slot: u64, seq: u64, overwrite: bool) -> String {
    let seq = if overwrite { seq % 10_000 } else { seq };
    format!("feed/{:04}/{:012}", slot, seq)
}
