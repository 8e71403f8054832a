//! Acceptance 5 of the cluster issue: the README's run command works, serves `ordoctl put/get`
//! through its router, and a restart on the same `--dir` returns the same data.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A base port whose playground range (router, 3 config replicas, 3 groups × 3 replicas) is free.
pub(crate) fn free_base_port() -> u16 {
    let offsets: Vec<u16> = [0u16, 1, 2, 3]
        .into_iter()
        .chain((1..=3).flat_map(|g| (1..=3).map(move |r| 10 * g + r)))
        .collect();
    ordo_testkit::ports::free_base_port(&offsets)
}

fn ordoctl(router: &str, args: &[&str]) -> (bool, String) {
    ordo_testkit::bins!().ordoctl_within(&[router.to_string()], Duration::from_secs(20), args)
}

/// `ordo playground` on `port` with data in `dir` and `extra` arguments (e.g. `--groups 1`).
pub(crate) fn start_with(dir: &Path, port: u16, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ordo"))
        .args(["playground", "--port", &port.to_string()])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn start(dir: &Path, port: u16) -> Child {
    start_with(dir, port, &[])
}

/// Reads the playground's stdout until it prints the router line: then it serves.
pub(crate) fn wait_ready(child: &mut Child) -> String {
    use std::io::{BufRead, BufReader};
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("Router: ") {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the playground printed its router address within 60 s")
}

pub(crate) fn interrupt_and_wait(mut child: Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "the playground exits cleanly on Ctrl-C: {s:?}");
            return;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the playground did not stop within 20 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn playground_serves_ordoctl_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_base_port();
    let mut pg = start(dir.path(), port);
    let router = wait_ready(&mut pg);
    let (ok, out) = ordoctl(&router, &["put", "order-1", "", "created"]);
    assert!(ok, "{out}");
    let (ok, out) = ordoctl(&router, &["put", "order-1", "items/1", "sku-42"]);
    assert!(ok, "{out}");
    let (ok, out) = ordoctl(&router, &["get", "order-1", ""]);
    assert!(ok && out.contains("created"), "{out}");
    let (ok, out) = ordoctl(&router, &["status"]);
    assert!(
        ok && out.contains("map version") && out.contains("group 3"),
        "{out}"
    );
    interrupt_and_wait(pg);

    let mut pg = start(dir.path(), port);
    let router = wait_ready(&mut pg);
    let (ok, out) = ordoctl(&router, &["get", "order-1", "items/1"]);
    assert!(
        ok && out.contains("sku-42") && out.contains("version=1"),
        "after a restart: {out}"
    );
    let (ok, out) = ordoctl(&router, &["scan", "order-1"]);
    assert!(
        ok && out.contains("created") && out.contains("sku-42"),
        "{out}"
    );
    interrupt_and_wait(pg);
}
