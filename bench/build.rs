//! Generates the small etcd v3 client subset (`etcdserverpb.KV`) from `proto/etcd/` with the same
//! pure-Rust tools as `ordo-proto` (protox parses, prost and tonic generate): no protoc needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["etcdserverpb/rpc.proto", "mvccpb/kv.proto"];
    for f in files {
        println!("cargo:rerun-if-changed=proto/etcd/{f}");
    }
    let fds = protox::compile(files, ["proto/etcd"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
