//! Generates the ordo.v1 code from `ordo/v1/*.proto` with pure-Rust tools (protox parses, prost and
//! tonic generate), so a fresh machine needs no protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "ordo/v1/kv.proto",
        "ordo/v1/peer.proto",
        "ordo/v1/cluster.proto",
        "ordo/v1/txn.proto",
        "ordo/v1/feed.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
