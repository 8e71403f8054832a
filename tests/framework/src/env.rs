//! Knobs of the long tests, read from the environment (seeds, soak lengths, parallelism).

/// The number in variable `name`, if it is set. A value that is not a number is a mistake of
/// whoever ran the test, so it panics naming the variable rather than running the default.
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
    )
}
