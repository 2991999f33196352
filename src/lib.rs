//! tagllm: a gRPC feature service that tags user notes with a handbook-guided LLM (TagLLM,
//! arXiv 2603.21481) and serves the tags to recommender systems as embedding ids and multi-hot
//! features.
//!
//! # Module map, in the order a note flows: `note -> prompt -> model -> tags -> features -> store -> api`
//! - [`domain`]: the bottom layer, names nothing else of the crate: `Note`, `NoteId`, `Tag`,
//!   request [`domain::Limits`], [`domain::normalize`], the domain [`domain::error::Error`].
//! - [`tagging`]: the tagging use case: the handbook, image checks, the prompt, the answer's
//!   grammar, model output -> tags, and [`tagging::tagger`], which runs them and stores the result.
//! - [`model`]: candle only, a leaf (no handbook, tag or feature): loading, chat encoding,
//!   constrained generation, batching through cache slots, and the engine thread with its
//!   [`model::scheduler`].
//! - [`features`]: the feature schema: tag -> embedding id (vocabulary or stable hash), multi-hot.
//! - [`store`]: the durable store (the [`store::Store`] trait, redb) and the cache in front of it.
//! - [`grpc`]: generated code, the two services, proto <-> domain, `Status` mapping, codec, auth.
//! - [`server`]: builds the app: health, reflection, layers, graceful shutdown.
//! - [`client`]: tagllm as a client of a tagllm server: upstream connections, backfill, replicas.
//! - [`training`]: offline: teacher data (three steps) and SFT files for the student.
//! - Cross-cutting: [`config`] (typed, validated configuration: defaults, file, `TAGLLM__` env)
//!   and [`metrics`] (Prometheus series, the per-RPC layer, `/metrics`), which any layer may use.
//!
//! The `tagllm` binary (`src/main.rs`, one file per subcommand under `src/cli/`) is glue over
//! these modules.
//!
//! # Invariants
//! - Dependencies point down the data flow: `domain` names nothing else of the crate, `model`
//!   only `domain`; `domain`, `tagging`, `features` and `store` never name tonic or candle, `grpc`
//!   and `client` never name candle (checked by `tests/it/layers.rs`).
//! - candle never runs on a Tokio worker thread: the model lives on its own OS thread
//!   ([`model::engine`]) fed by a bounded channel.
//! - Ids that leave the process never come from `std::hash`: the hash function and seed are pinned
//!   ([`features::stable_hash`]) and test vectors pin their outputs.
//! - An acknowledged TagNote is committed durably to the store before its response is sent.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod domain;
pub mod features;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod server;
pub mod store;
pub mod tagging;
pub mod training;
