//! CPU time used: this process's own (getrusage), and other processes' from `/proc/<pid>/stat`;
//! and resident memory, from `/proc/<pid>/status`.

use std::time::Duration;

use anyhow::{bail, Context};

/// User + system CPU time this process has used so far (all threads).
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// User + system CPU time process `pid` has used so far (all its threads).
pub fn pid_cpu(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_s = if ticks_per_s > 0 {
        ticks_per_s as u64
    } else {
        100
    };
    let ticks = stat_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))?;
    Ok(Duration::from_secs_f64(ticks as f64 / ticks_per_s as f64))
}

/// utime + stime (fields 14 and 15, in clock ticks) of a `/proc/<pid>/stat` line. The command
/// name (field 2) is in parentheses and may contain spaces, so fields are counted after the last
/// `)`.
pub fn stat_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let Some(close) = stat.rfind(')') else {
        bail!("no command name in {stat:?}");
    };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state), so field n is fields[n - 3].
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("field {n} missing"))?
            .parse()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok(field(14)? + field(15)?)
}

/// Resident set size (`VmRSS`) of process `pid`, in bytes.
pub fn pid_rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status_rss(&status).with_context(|| format!("parsing {path}"))
}

/// The `VmRSS:` line of a `/proc/<pid>/status` (in kB), in bytes.
pub fn status_rss(status: &str) -> anyhow::Result<u64> {
    let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:")) else {
        bail!("no VmRSS line");
    };
    let kb: u64 = line["VmRSS:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("{line:?}"))?;
    Ok(kb * 1024)
}

/// CPU per 1,000 operations, in seconds.
pub fn per_thousand_ops(cpu: Duration, ops: u64) -> Option<f64> {
    (ops > 0).then(|| cpu.as_secs_f64() * 1000.0 / ops as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "1234 (ordo node) S 1 1234 1234 0 -1 4194560 5000 0 0 0 250 75 0 0 20 0 \
                    9 0 100 1000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(stat_cpu_ticks(line).unwrap(), 325);
        let tricky = "7 (a) b) c) R 1 1 1 0 -1 0 0 0 0 0 10 5 0 0";
        assert_eq!(stat_cpu_ticks(tricky).unwrap(), 15);
        assert!(stat_cpu_ticks("garbage").is_err());
        assert!(stat_cpu_ticks("1 (x) S 1").is_err());
    }

    #[test]
    fn rss_lines_parse() {
        let status = "Name:\tordo\nVmPeak:\t  900 kB\nVmRSS:\t  51200 kB\nThreads:\t9\n";
        assert_eq!(status_rss(status).unwrap(), 51200 * 1024);
        assert!(status_rss("Name:\tx\n").is_err());
        assert!(pid_rss(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn own_and_proc_cpu_are_readable() {
        let me = pid_cpu(std::process::id()).unwrap();
        let own = self_cpu();
        // Both count this process; they differ by tick granularity and the time between calls.
        assert!(own + Duration::from_secs(1) >= me, "{own:?} vs {me:?}");
        assert_eq!(per_thousand_ops(Duration::from_secs(2), 4000), Some(0.5));
        assert_eq!(per_thousand_ops(Duration::from_secs(2), 0), None);
    }
}
