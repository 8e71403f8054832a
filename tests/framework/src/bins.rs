//! The product's binaries as a test runs them. Cargo tells only the root package's integration
//! tests where they are (`CARGO_BIN_EXE_*` at compile time), so the test crate names them with
//! [`bins!`] and hands them to the process harnesses.

use std::path::Path;
use std::time::Duration;

/// Paths of the `ordo` and `ordoctl` binaries.
#[derive(Clone, Copy, Debug)]
pub struct Bins {
    pub ordo: &'static str,
    pub ordoctl: &'static str,
}

/// The [`Bins`] of the integration test this expands in.
#[macro_export]
macro_rules! bins {
    () => {
        $crate::Bins {
            ordo: env!("CARGO_BIN_EXE_ordo"),
            ordoctl: env!("CARGO_BIN_EXE_ordoctl"),
        }
    };
}

/// How long an `ordoctl` command may take by default.
pub const ORDOCTL_TIMEOUT: Duration = Duration::from_secs(10);

impl Bins {
    /// Runs `ordoctl --endpoint <endpoints> --timeout 10s <args>`: (succeeded, stdout + stderr).
    pub fn ordoctl(&self, endpoints: &[String], args: &[&str]) -> (bool, String) {
        self.ordoctl_within(endpoints, ORDOCTL_TIMEOUT, args)
    }

    /// [`Bins::ordoctl`] with `--timeout <timeout>`.
    pub fn ordoctl_within(
        &self,
        endpoints: &[String],
        timeout: Duration,
        args: &[&str],
    ) -> (bool, String) {
        let timeout = format!("{}s", timeout.as_secs());
        self.run_ordoctl(endpoints, &[&["--timeout", &timeout], args].concat())
    }

    /// `ordoctl --endpoint <endpoints> <args>`, every other flag at its default (the
    /// `--timeout` a user gets without asking included).
    pub fn ordoctl_defaults(&self, endpoints: &[String], args: &[&str]) -> (bool, String) {
        self.run_ordoctl(endpoints, args)
    }

    fn run_ordoctl(&self, endpoints: &[String], args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new(Path::new(self.ordoctl))
            .args(["--endpoint", &endpoints.join(",")])
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}
