//! What the load generator sends: workloads (op mixes), key choosers and the seeded random source.
//!
//! Everything here is pure (no I/O, no clock) so that it can be unit-tested and so that a run is
//! reproducible from its `--seed`.
//!
//! * YCSB core workloads A–F: records are items `(user<n / per_shard>, <n % per_shard>)`, so a
//!   shard key holds `--items-per-shard` consecutive records and workload E's scans stay inside one
//!   shard key. Key choosers: uniform, (scrambled) zipfian and latest, as YCSB's.
//! * `orders`: each order is a shard key `<prefix>o<n>` holding a root item `""` (status + payload),
//!   line items `items/<i>` and outbox entries `outbox/<version>`; see [`crate::ops`].

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;

/// One kind of request the generator issues; a row of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// Get one record (YCSB read).
    Read,
    /// Overwrite one existing record (YCSB update).
    Update,
    /// Write a new record (YCSB insert): D and E grow the key space with it.
    Insert,
    /// A short range read inside one shard key (YCSB scan).
    Scan,
    /// Read, then write back through a `Txn` that compares the version read (YCSB F).
    Rmw,
    /// Create an order aggregate atomically: root + line items + an outbox entry, one `Txn`.
    OrderCreate,
    /// Move an order to its next status by compare-and-set on the root's version.
    OrderAdvance,
    /// Read an order: `Get` of the root and `Scan` of its line items.
    OrderRead,
    /// A `Txn` writing two records of two shard keys that one group owns.
    Txn1,
    /// A `Txn` writing two records of shard keys that two groups own (two-phase commit).
    Txn2,
}

impl Op {
    pub const ALL: [Op; 10] = [
        Op::Read,
        Op::Update,
        Op::Insert,
        Op::Scan,
        Op::Rmw,
        Op::OrderCreate,
        Op::OrderAdvance,
        Op::OrderRead,
        Op::Txn1,
        Op::Txn2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Update => "update",
            Op::Insert => "insert",
            Op::Scan => "scan",
            Op::Rmw => "rmw",
            Op::OrderCreate => "order_create",
            Op::OrderAdvance => "order_advance",
            Op::OrderRead => "order_read",
            Op::Txn1 => "txn1",
            Op::Txn2 => "txn2",
        }
    }

    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Whether the op belongs to the order model (and so uses order IDs rather than records).
    pub fn is_order(self) -> bool {
        matches!(self, Op::OrderCreate | Op::OrderAdvance | Op::OrderRead)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The named workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// YCSB A: 50% read, 50% update (zipfian).
    A,
    /// YCSB B: 95% read, 5% update (zipfian).
    B,
    /// YCSB C: read only (zipfian).
    C,
    /// YCSB D: 95% read, 5% insert, reads favour recent inserts (latest).
    D,
    /// YCSB E: 95% short scans inside one shard key, 5% insert (zipfian).
    E,
    /// YCSB F: 50% read, 50% read-modify-write through a version-compared Txn (zipfian).
    F,
    /// Order system: 20% create (one Txn), 50% status CAS, 30% read (Get + Scan) (latest).
    Orders,
    /// Two-record `Txn`s: 50% inside one group, 50% across two groups (uniform).
    Txn,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::A => "a",
            Workload::B => "b",
            Workload::C => "c",
            Workload::D => "d",
            Workload::E => "e",
            Workload::F => "f",
            Workload::Orders => "orders",
            Workload::Txn => "txn",
        }
    }

    /// The op mix of this workload (YCSB's proportions for A–F).
    pub fn default_mix(self) -> Mix {
        use Op::*;
        let weights: &[(Op, u32)] = match self {
            Workload::A => &[(Read, 50), (Update, 50)],
            Workload::B => &[(Read, 95), (Update, 5)],
            Workload::C => &[(Read, 100)],
            Workload::D => &[(Read, 95), (Insert, 5)],
            Workload::E => &[(Scan, 95), (Insert, 5)],
            Workload::F => &[(Read, 50), (Rmw, 50)],
            Workload::Orders => &[(OrderCreate, 20), (OrderAdvance, 50), (OrderRead, 30)],
            Workload::Txn => &[(Txn1, 50), (Txn2, 50)],
        };
        Mix::new(weights.to_vec()).expect("built-in mixes are valid")
    }

    /// YCSB's request distribution for the workload.
    pub fn default_distribution(self) -> Distribution {
        match self {
            Workload::D | Workload::Orders => Distribution::Latest,
            Workload::Txn => Distribution::Uniform,
            _ => Distribution::Zipfian,
        }
    }

    pub fn is_orders(self) -> bool {
        self == Workload::Orders
    }

    /// Records (YCSB) or orders loaded before the measured run when `--records` is not given.
    pub fn default_records(self) -> u64 {
        if self.is_orders() {
            1_000
        } else {
            10_000
        }
    }
}

/// Weighted op choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    weights: Vec<(Op, u32)>,
    total: u64,
}

impl Mix {
    pub fn new(weights: Vec<(Op, u32)>) -> anyhow::Result<Mix> {
        let weights: Vec<(Op, u32)> = weights.into_iter().filter(|(_, w)| *w > 0).collect();
        let total: u64 = weights.iter().map(|(_, w)| *w as u64).sum();
        ensure!(total > 0, "the op mix has no op with a weight above zero");
        let orders = weights.iter().filter(|(op, _)| op.is_order()).count();
        ensure!(
            orders == 0 || orders == weights.len(),
            "a mix cannot combine order ops with YCSB record ops"
        );
        Ok(Mix { weights, total })
    }

    /// The next op, each with probability weight / total.
    pub fn pick(&self, rng: &mut XorShift64) -> Op {
        let mut x = rng.below(self.total);
        for &(op, w) in &self.weights {
            if x < w as u64 {
                return op;
            }
            x -= w as u64;
        }
        unreachable!("x < total")
    }

    pub fn is_orders(&self) -> bool {
        self.weights[0].0.is_order()
    }

    /// The ops the mix draws (weight above zero).
    pub fn ops(&self) -> impl Iterator<Item = Op> + '_ {
        self.weights.iter().map(|&(op, _)| op)
    }

    /// The fraction of draws that should be `op`.
    #[cfg(test)]
    pub fn share(&self, op: Op) -> f64 {
        let w: u64 = self
            .weights
            .iter()
            .filter(|(o, _)| *o == op)
            .map(|(_, w)| *w as u64)
            .sum();
        w as f64 / self.total as f64
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .weights
            .iter()
            .map(|(op, w)| format!("{op}={w}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for Mix {
    type Err = anyhow::Error;

    /// `read=50,update=50`; `create`, `advance` and `read` also name the order ops when every
    /// name is an order op (`create=20,advance=50,read=30`).
    fn from_str(s: &str) -> anyhow::Result<Mix> {
        let mut parsed = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .with_context(|| format!("mix entry {part:?} is not op=weight"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .with_context(|| format!("mix entry {part:?}: weight is not a number"))?;
            parsed.push((name.trim().to_string(), weight));
        }
        let order_alias = |n: &str| match n {
            "create" => Some(Op::OrderCreate),
            "advance" => Some(Op::OrderAdvance),
            "read" => Some(Op::OrderRead),
            _ => None,
        };
        let orders_only = parsed
            .iter()
            .all(|(n, _)| order_alias(n).is_some() || Op::from_name(n).is_some_and(Op::is_order))
            && parsed.iter().any(|(n, _)| n != "read");
        let mut weights = Vec::new();
        for (name, w) in parsed {
            let op = if orders_only {
                order_alias(&name).or_else(|| Op::from_name(&name))
            } else {
                Op::from_name(&name)
            };
            let Some(op) = op else {
                bail!(
                    "unknown op {name:?} in the mix (ops: read, update, insert, scan, rmw; \
                     orders: create, advance, read)"
                );
            };
            weights.push((op, w));
        }
        Mix::new(weights)
    }
}

/// How requests choose the record (or order) they touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Distribution {
    /// Every existing record equally likely.
    Uniform,
    /// Zipfian (theta 0.99) over the records, the popular ones scattered over the key space.
    Zipfian,
    /// Zipfian over recency: the most recently inserted records are the most popular.
    Latest,
}

impl Distribution {
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Uniform => "uniform",
            Distribution::Zipfian => "zipfian",
            Distribution::Latest => "latest",
        }
    }
}

/// A small, fast, seedable PRNG (xorshift64*). Not cryptographic; good enough to spread keys.
#[derive(Clone, Debug)]
pub struct XorShift64 {
    state: u64,
}

impl XorShift64 {
    /// A generator for `seed`; `stream` separates the generators of concurrent tasks so that two
    /// tasks with the same `--seed` do not walk the same key sequence.
    pub fn new(seed: u64, stream: u64) -> XorShift64 {
        // splitmix64 spreads similar seeds apart; guard against the forbidden all-zero state.
        let mut z = seed
            .wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        XorShift64 {
            state: if z == 0 { 0x2545_F491_4F6C_DD1D } else { z },
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`), by multiply-shift; the bias is below `n / 2^64`.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A float in `[0, 1)` with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// YCSB's zipfian constant.
pub const ZIPFIAN_THETA: f64 = 0.99;
/// Largest key space the choosers accept (zeta is summed once per record).
pub const RECORDS_MAX: u64 = 100_000_000;

/// Gray et al.'s zipfian generator over `0..n` (rank 0 most popular), as YCSB's
/// `ZipfianGenerator`, with zeta extended incrementally when `n` grows.
#[derive(Clone, Debug)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zeta2: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    pub fn new(n: u64, theta: f64) -> Zipfian {
        let mut z = Zipfian {
            n: 0,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta2: 1.0 + 0.5f64.powf(theta),
            zetan: 0.0,
            eta: 0.0,
        };
        z.grow(n);
        z
    }

    /// Extends the range to `0..n` (never shrinks).
    pub fn grow(&mut self, n: u64) {
        if n <= self.n {
            return;
        }
        for i in self.n + 1..=n {
            self.zetan += 1.0 / (i as f64).powf(self.theta);
        }
        self.n = n;
        self.eta =
            (1.0 - (2.0 / n as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2 / self.zetan);
    }

    #[cfg(test)]
    pub fn n(&self) -> u64 {
        self.n
    }

    /// A rank in `0..n` (`n > 0`).
    pub fn next(&self, rng: &mut XorShift64) -> u64 {
        debug_assert!(self.n > 0);
        if self.n == 1 {
            return 0;
        }
        let u = rng.unit();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let rank = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.n - 1)
    }
}

/// A bijection of `0..n` that scatters neighbouring ranks, so that zipfian's popular records are
/// not all next to each other (YCSB's "scrambled zipfian"). Cycle-walks a bijection of the
/// enclosing power of two, so every value stays in range and no two ranks collide.
pub fn scramble(rank: u64, n: u64) -> u64 {
    debug_assert!(rank < n);
    if n <= 2 {
        return rank;
    }
    let bits = 64 - (n - 1).leading_zeros();
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let half = bits.div_ceil(2);
    let mut x = rank;
    loop {
        // Each step is a bijection of 0..2^bits: odd multiply, add, xor with the high half.
        x = x
            .wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1)
            .wrapping_add(0x632B_E59B)
            & mask;
        x ^= x >> half;
        if x < n {
            return x;
        }
    }
}

/// Chooses the record a request touches among the `n` that exist. Each task owns one (the
/// zipfian state grows with `n`).
#[derive(Clone, Debug)]
pub enum KeyChooser {
    Uniform,
    Zipfian(Zipfian),
    /// Rank 0 is the newest record.
    Latest(Zipfian),
}

impl KeyChooser {
    pub fn new(distribution: Distribution, n: u64) -> KeyChooser {
        match distribution {
            Distribution::Uniform => KeyChooser::Uniform,
            Distribution::Zipfian => KeyChooser::Zipfian(Zipfian::new(n, ZIPFIAN_THETA)),
            Distribution::Latest => KeyChooser::Latest(Zipfian::new(n, ZIPFIAN_THETA)),
        }
    }

    /// A record in `0..n`, or `None` when there is none yet.
    pub fn next(&mut self, rng: &mut XorShift64, n: u64) -> Option<u64> {
        if n == 0 {
            return None;
        }
        Some(match self {
            KeyChooser::Uniform => rng.below(n),
            KeyChooser::Zipfian(z) => {
                z.grow(n);
                // A grown generator may draw from a larger range than `n` only if n shrank,
                // which the counters never do; clamp anyway.
                scramble(z.next(rng).min(n - 1), n)
            }
            KeyChooser::Latest(z) => {
                z.grow(n);
                n - 1 - z.next(rng).min(n - 1)
            }
        })
    }
}

/// Where YCSB record `n` lives: `--items-per-shard` consecutive records share a shard key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub items_per_shard: u64,
    /// Largest number of items one scan asks for (drawn uniformly from 1 to it).
    pub scan_length_max: u32,
}

impl Layout {
    /// `(shard_key, key)` of record `n`.
    pub fn record(&self, n: u64) -> (String, String) {
        (
            format!("user{}", n / self.items_per_shard),
            format!("{:08}", n % self.items_per_shard),
        )
    }

    /// The number of items a scan asks for.
    pub fn scan_length(&self, rng: &mut XorShift64) -> u32 {
        1 + rng.below(self.scan_length_max.max(1) as u64) as u32
    }
}

/// The shard key (order ID) of order `n` in a run with key prefix `prefix`.
pub fn order_id(prefix: &str, n: u64) -> String {
    format!("{prefix}o{n}")
}

/// The statuses an order moves through, in order; the last one is final.
pub const ORDER_STATUSES: [&str; 5] = ["created", "paid", "packed", "shipped", "delivered"];

/// The status after `status`, or `None` when it is final (or unknown).
pub fn next_status(status: &str) -> Option<&'static str> {
    let i = ORDER_STATUSES.iter().position(|s| *s == status)?;
    ORDER_STATUSES.get(i + 1).copied()
}

/// An order root's value: its status, `;`, then the payload.
pub fn order_root_value(status: &str, payload: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(status.len() + 1 + payload.len());
    v.extend_from_slice(status.as_bytes());
    v.push(b';');
    v.extend_from_slice(payload);
    v.into()
}

/// The status stored in an order root's value.
pub fn order_status(root: &[u8]) -> &str {
    let end = root.iter().position(|&b| b == b';').unwrap_or(root.len());
    std::str::from_utf8(&root[..end]).unwrap_or("")
}

/// `size` printable bytes derived from `seed`. One shared buffer; cloning the `Bytes` per request
/// costs a reference count, not a copy.
pub fn value(size: usize, seed: u64) -> Bytes {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = XorShift64::new(seed, u64::MAX);
    (0..size)
        .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
        .collect::<Vec<u8>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAWS: usize = 100_000;

    #[test]
    fn generators_are_reproducible_and_streams_differ() {
        let seq = |seed, stream| {
            let mut rng = XorShift64::new(seed, stream);
            (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(seq(1, 0), seq(1, 0));
        assert_ne!(seq(1, 0), seq(1, 1));
        assert_ne!(seq(1, 0), seq(2, 0));
        assert!(seq(0, 0).iter().any(|&x| x != 0));
        let mut rng = XorShift64::new(3, 3);
        assert!((0..10_000).all(|_| (0.0..1.0).contains(&rng.unit())));
    }

    #[test]
    fn every_workload_mix_matches_its_ratios() {
        for w in [
            Workload::A,
            Workload::B,
            Workload::C,
            Workload::D,
            Workload::E,
            Workload::F,
            Workload::Orders,
        ] {
            let mix = w.default_mix();
            let mut rng = XorShift64::new(7, 3);
            let mut counts = std::collections::BTreeMap::<Op, usize>::new();
            for _ in 0..DRAWS {
                *counts.entry(mix.pick(&mut rng)).or_default() += 1;
            }
            for op in Op::ALL {
                let got = *counts.get(&op).unwrap_or(&0) as f64 / DRAWS as f64;
                let want = mix.share(op);
                assert!((got - want).abs() < 0.01, "{w:?} {op}: {got} vs {want}");
            }
        }
        assert_eq!(Workload::A.default_mix().share(Op::Read), 0.5);
        assert_eq!(Workload::B.default_mix().share(Op::Update), 0.05);
        assert_eq!(Workload::C.default_mix().share(Op::Read), 1.0);
        assert_eq!(Workload::E.default_mix().share(Op::Scan), 0.95);
        assert_eq!(Workload::F.default_mix().share(Op::Rmw), 0.5);
        assert!(Workload::Orders.default_mix().is_orders());
    }

    #[test]
    fn mixes_parse_and_refuse_nonsense() {
        let m: Mix = "read=90, update=10".parse().unwrap();
        assert_eq!(m.share(Op::Read), 0.9);
        assert_eq!(m.to_string(), "read=90,update=10");
        let o: Mix = "create=1,advance=2,read=1".parse().unwrap();
        assert!(o.is_orders());
        assert_eq!(o.share(Op::OrderAdvance), 0.5);
        assert_eq!(o.share(Op::OrderRead), 0.25);
        let full: Mix = "order_create=1,order_read=1".parse().unwrap();
        assert_eq!(full.share(Op::OrderRead), 0.5);
        for bad in [
            "",
            "read",
            "read=x",
            "fly=3",
            "read=0",
            "update=1,order_create=1",
        ] {
            assert!(bad.parse::<Mix>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn uniform_stays_in_range_and_covers_it() {
        let mut c = KeyChooser::new(Distribution::Uniform, 10);
        let mut rng = XorShift64::new(42, 0);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[c.next(&mut rng, 10).unwrap() as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
        assert_eq!(c.next(&mut rng, 0), None);
        assert!((0..100).all(|_| c.next(&mut rng, 1) == Some(0)));
    }

    #[test]
    fn zipfian_is_skewed_and_in_range() {
        const N: u64 = 1_000;
        let mut c = KeyChooser::new(Distribution::Zipfian, N);
        let mut rng = XorShift64::new(1, 1);
        let mut counts = vec![0u64; N as usize];
        for _ in 0..DRAWS {
            let k = c.next(&mut rng, N).unwrap();
            assert!(k < N);
            counts[k as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let uniform_share = DRAWS as f64 / N as f64; // 100 per key
                                                     // theta 0.99 over 1000 keys: the hottest key gets ~13% of the draws, over 100× uniform.
        assert!(
            counts[0] as f64 > 50.0 * uniform_share,
            "hottest {}",
            counts[0]
        );
        // The 10 hottest keys (1%) get well over a third of all draws.
        let top10: u64 = counts[..10].iter().sum();
        assert!(top10 as f64 > 0.35 * DRAWS as f64, "top 10: {top10}");
        // And still a long tail: most keys are drawn at least once.
        assert!(counts.iter().filter(|&&c| c > 0).count() > 500);
    }

    #[test]
    fn scrambling_is_a_permutation_that_spreads_hot_ranks() {
        for n in [1u64, 2, 3, 10, 1000, 1024, 1025] {
            let mut seen: Vec<u64> = (0..n).map(|r| scramble(r, n)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n={n}");
        }
        // The hottest ranks do not land next to each other.
        let hot: Vec<u64> = (0..4).map(|r| scramble(r, 100_000)).collect();
        assert!(hot.windows(2).all(|w| w[0].abs_diff(w[1]) > 1), "{hot:?}");
    }

    #[test]
    fn zipfian_grows_like_a_fresh_one() {
        let mut grown = Zipfian::new(10, ZIPFIAN_THETA);
        grown.grow(5_000);
        let fresh = Zipfian::new(5_000, ZIPFIAN_THETA);
        assert!((grown.zetan - fresh.zetan).abs() < 1e-9);
        assert!((grown.eta - fresh.eta).abs() < 1e-9);
        grown.grow(100); // never shrinks
        assert_eq!(grown.n(), 5_000);
    }

    #[test]
    fn latest_favours_recent_inserts() {
        let mut c = KeyChooser::new(Distribution::Latest, 1_000);
        let mut rng = XorShift64::new(9, 2);
        let mut n = 1_000;
        let mut newest_10 = 0;
        let mut oldest_half = 0;
        for i in 0..DRAWS {
            if i % 10 == 0 {
                n += 1; // inserts keep arriving
            }
            let k = c.next(&mut rng, n).unwrap();
            assert!(k < n);
            if k >= n - 10 {
                newest_10 += 1;
            }
            if k < n / 2 {
                oldest_half += 1;
            }
        }
        assert!(newest_10 as f64 > 0.3 * DRAWS as f64, "{newest_10}");
        assert!((oldest_half as f64) < 0.15 * DRAWS as f64, "{oldest_half}");
    }

    #[test]
    fn record_layout_groups_records_into_shard_keys() {
        let l = Layout {
            items_per_shard: 10,
            scan_length_max: 10,
        };
        assert_eq!(l.record(0), ("user0".to_string(), "00000000".to_string()));
        assert_eq!(l.record(9), ("user0".to_string(), "00000009".to_string()));
        assert_eq!(l.record(10), ("user1".to_string(), "00000000".to_string()));
        assert_eq!(l.record(12_345).0, "user1234");
        // Keys inside a shard key sort like the record numbers (fixed width).
        assert!(l.record(3).1 < l.record(4).1);
        let mut rng = XorShift64::new(1, 1);
        let lens: Vec<u32> = (0..1000).map(|_| l.scan_length(&mut rng)).collect();
        assert!(lens.iter().all(|n| (1..=10).contains(n)));
        assert!(lens.contains(&1) && lens.contains(&10));
        let one = Layout {
            items_per_shard: 1,
            scan_length_max: 1,
        };
        assert_eq!(one.record(7), ("user7".to_string(), "00000000".to_string()));
    }

    #[test]
    fn orders_move_through_their_statuses() {
        assert_eq!(order_id("r1-", 42), "r1-o42");
        assert_eq!(next_status("created"), Some("paid"));
        assert_eq!(next_status("shipped"), Some("delivered"));
        assert_eq!(next_status("delivered"), None);
        assert_eq!(next_status("bogus"), None);
        let root = order_root_value("paid", b"xyz");
        assert_eq!(&root[..], b"paid;xyz");
        assert_eq!(order_status(&root), "paid");
        assert_eq!(order_status(b"created"), "created");
    }

    #[test]
    fn values_have_the_expected_shape() {
        let v = value(128, 1);
        assert_eq!(v.len(), 128);
        assert!(v.iter().all(u8::is_ascii_alphanumeric));
        assert_eq!(v, value(128, 1));
        assert!(value(0, 1).is_empty());
    }
}
