//! The one integration-test binary: a real server on 127.0.0.1:0 with the real default model (the
//! SmolLM2 GGUF fetched by `models/fetch_default_model.sh`), a real redb store in a temp dir, and
//! real gRPC over a real socket.

mod api;
mod common;
mod config_example;
mod constrain;
mod crash;
mod distill;
mod hostile;
mod image_proc;
mod kernels;
mod layers;
mod model;
mod ops;
mod qwen3vl;
mod replica;
mod security;
mod teacher;
