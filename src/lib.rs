//! tagllm: a gRPC feature service that tags user notes with a handbook-guided LLM (TagLLM,
//! arXiv 2603.21481) and serves the tags to recommender systems as embedding ids and multi-hot
//! features.
//!
//! # Module map (the data flow `note -> prompt -> model -> tags -> features -> store -> api`)
//! - [`auth`]: optional bearer-token auth (tower layer), constant-time, health exempt.
//! - [`config`]: typed, validated configuration (defaults, file, `TAGLLM__` env).
//! - [`error`]: the domain error enum, named by what the caller should do.
//! - [`domain`]: `Note`, `NoteId`, `Tag`, request limits: plain types and pure logic.
//! - [`handbook`]: the User Interest Handbook: load, validate, render a category's guidance.
//! - [`images`]: inline images checked at the edge: format, header dimensions, decode under limits.
//! - [`prompt`]: note + handbook entry -> chat messages -> prompt text (the model's chat template).
//! - [`grammar`]: handbook entry + limits -> the grammar every answer must follow.
//! - [`model`]: candle only: GGUF loading, the tokenizer from GGUF metadata, greedy generation
//!   (constrained by the grammar through llguidance, or free), and the engine thread that owns
//!   the model.
//! - [`tags`]: model output -> normalized, deduplicated, handbook-checked tags.
//! - [`features`]: the feature schema, tag -> embedding id (vocabulary or stable hash), multi-hot.
//! - [`store`]: the durable embedded store (redb) and the moka cache in front of it.
//! - [`tagger`]: the tagging use case: idempotency, prompt, engine, parse, store.
//! - [`grpc`]: generated code, service impls, proto <-> domain conversion, `Status` mapping.
//! - [`metrics`]: Prometheus series, the per-RPC tower layer, the `/metrics` endpoint.
//! - [`backfill`]: `tagllm backfill`: a JSONL file through a server's TagNotes, resumable.
//! - [`replica`]: read-replica mode: follow a primary's tagging-time scan into the local store.
//! - [`upstream`]: how tagllm's own clients reach a server (URL, TLS, client certificates).
//! - [`server`]: builds the app: health, reflection, limits, graceful shutdown.
//!
//! # Invariants
//! - `domain`, `tags`, `features` and `store` never name tonic or candle; `grpc` never names candle.
//! - candle never runs on a Tokio worker thread: the model lives on its own OS thread
//!   ([`model::engine`]) fed by a bounded channel.
//! - Ids that leave the process never come from `std::hash`: the hash function and seed are pinned
//!   ([`features::stable_hash`]) and test vectors pin their outputs.
//! - An acknowledged TagNote is committed durably to the store before its response is sent.

pub mod auth;
pub mod backfill;
pub mod config;
pub mod distill;
pub mod domain;
pub mod error;
pub mod features;
pub mod grammar;
pub mod grpc;
pub mod handbook;
pub mod images;
pub mod metrics;
pub mod model;
pub mod prompt;
pub mod replica;
pub mod server;
pub mod store;
pub mod tagger;
pub mod tags;
pub mod teacher;
pub mod upstream;
