//! Where a run's report goes: the JSON report and the SVG plot, named by workload, target and
//! time.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::plot;
use crate::report::Report;

/// `bench/out` of this source tree when it exists (the `cargo run` case), else `./ordo-bench-out`.
pub fn default_out_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    if manifest.is_dir() {
        manifest.join("out")
    } else {
        PathBuf::from("ordo-bench-out")
    }
}

/// Writes `<out>/<name>.json` and `<out>/<name>.svg` (and `--json`), returning the paths.
pub fn write_outputs(
    report: &Report,
    out_dir: &Path,
    extra_json: Option<&Path>,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let stem = format!(
        "{}-{}-{}",
        report.config.workload,
        report.config.target,
        utc_stamp(SystemTime::now())
    );
    let json = report.json();
    let json_path = out_dir.join(format!("{stem}.json"));
    let svg_path = out_dir.join(format!("{stem}.svg"));
    std::fs::write(&json_path, &json)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&svg_path, plot::svg(report))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    let mut paths = vec![json_path, svg_path];
    if let Some(p) = extra_json {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
        paths.push(p.to_path_buf());
    }
    Ok(paths)
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_stamps_are_calendar_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_764_149_405); // 2025-11-26 09:30:05 UTC
        assert_eq!(utc_stamp(t), "20251126-093005");
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101-000000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(utc_stamp(leap), "20000229-000000");
    }
}
