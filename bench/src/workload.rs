//! What the load generator sends: the workload mix, the key chooser and the seeded random source.
//!
//! Everything here is pure (no I/O, no clock) so that it can be unit-tested and so that a run is
//! reproducible from its `--seed`. The YCSB harness this grows into adds more [`Workload`]s and
//! key distributions (zipfian, latest) next to [`KeyChooser`].

use std::fmt;

use bytes::Bytes;

/// One kind of request the generator issues; a row of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// An unconditional `put`.
    Put,
    /// A linearizable `get`.
    Get,
}

impl Op {
    pub const ALL: [Op; 2] = [Op::Put, Op::Get];

    pub fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The request mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Only writes.
    Put,
    /// Only linearizable reads.
    Get,
    /// 50% reads, 50% writes.
    Mixed,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::Mixed => "mixed",
        }
    }

    /// The next operation of this mix.
    pub fn next_op(self, rng: &mut XorShift64) -> Op {
        match self {
            Workload::Put => Op::Put,
            Workload::Get => Op::Get,
            Workload::Mixed => {
                if rng.next_u64() >> 63 == 0 {
                    Op::Get
                } else {
                    Op::Put
                }
            }
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
        // splitmix64 spreads similar seeds apart and never yields the forbidden all-zero state
        // for more than one input; guard against it anyway.
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
}

/// Chooses the record a request touches: uniform over `0..keys`.
#[derive(Clone, Copy, Debug)]
pub struct KeyChooser {
    keys: u64,
}

impl KeyChooser {
    /// A chooser over `keys` records; `keys` must be at least 1.
    pub fn uniform(keys: u64) -> anyhow::Result<KeyChooser> {
        anyhow::ensure!(keys > 0, "--keys must be at least 1");
        Ok(KeyChooser { keys })
    }

    /// The next record number, in `0..keys`.
    pub fn next(&self, rng: &mut XorShift64) -> u64 {
        rng.below(self.keys)
    }
}

/// The shard key (order ID) of record `n`. Every record is the root item (key `""`) of its own
/// shard key.
pub fn shard_key(n: u64) -> String {
    format!("order-{n}")
}

/// The value every put writes: `size` printable bytes derived from `seed`. One shared buffer;
/// cloning the `Bytes` per request costs a reference count, not a copy.
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

    #[test]
    fn key_chooser_stays_in_range_and_covers_it() {
        let chooser = KeyChooser::uniform(10).unwrap();
        let mut rng = XorShift64::new(42, 0);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let n = chooser.next(&mut rng);
            assert!(n < 10, "{n}");
            seen[n as usize] += 1;
        }
        // Uniform: every record is hit, none wildly more than the expected 1000.
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");

        let one = KeyChooser::uniform(1).unwrap();
        assert!((0..100).all(|_| one.next(&mut rng) == 0));
        assert!(KeyChooser::uniform(0).is_err());

        let huge = KeyChooser::uniform(u64::MAX).unwrap();
        assert!((0..1000).all(|_| huge.next(&mut rng) < u64::MAX));
    }

    #[test]
    fn generators_are_reproducible_and_streams_differ() {
        let seq = |seed, stream| {
            let mut rng = XorShift64::new(seed, stream);
            (0..8).map(|_| rng.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(seq(1, 0), seq(1, 0));
        assert_ne!(seq(1, 0), seq(1, 1));
        assert_ne!(seq(1, 0), seq(2, 0));
        // Seed 0 is valid (xorshift must not start from the all-zero state).
        assert!(seq(0, 0).iter().any(|&x| x != 0));
    }

    #[test]
    fn mixed_is_about_half_reads() {
        let mut rng = XorShift64::new(7, 3);
        let gets = (0..10_000)
            .filter(|_| Workload::Mixed.next_op(&mut rng) == Op::Get)
            .count();
        assert!((4_700..5_300).contains(&gets), "{gets}");
        assert_eq!(Workload::Put.next_op(&mut rng), Op::Put);
        assert_eq!(Workload::Get.next_op(&mut rng), Op::Get);
    }

    #[test]
    fn keys_and_values_have_the_expected_shape() {
        assert_eq!(shard_key(0), "order-0");
        assert_eq!(shard_key(99_999), "order-99999");
        let v = value(128, 1);
        assert_eq!(v.len(), 128);
        assert!(v.iter().all(u8::is_ascii_alphanumeric));
        assert_eq!(v, value(128, 1));
        assert!(value(0, 1).is_empty());
    }
}
