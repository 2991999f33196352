//! Compiles `proto/tagllm/v1/*.proto` with `protox` (no system `protoc` needed) into `OUT_DIR`, and
//! writes the encoded descriptor set that server reflection serves.
use std::{env, fs, path::PathBuf};

use anyhow::Context;
use prost::Message;

fn main() -> anyhow::Result<()> {
    let proto_dir = PathBuf::from("proto");
    let mut files: Vec<PathBuf> = fs::read_dir(proto_dir.join("tagllm/v1"))
        .context("reading proto/tagllm/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    // tonic-prost-build emits no rerun-if-changed lines on the compile_fds path: print our own.
    println!("cargo:rerun-if-changed=proto");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&proto_dir]).context("compiling protos")?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("tagllm_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // tonic's prost codec, decoding from contiguous bytes (src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::SliceCodec")
        // Hand-written so the server can send notes it encoded once (src/grpc/wire.rs).
        .extern_path(
            ".tagllm.v1.GetNoteFeaturesResponse",
            "crate::grpc::wire::GetNoteFeaturesResponse",
        )
        .compile_fds(fds)
        .context("generating code")?;
    Ok(())
}
