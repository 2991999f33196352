//! tagllm as a client of another tagllm server: how to reach it ([`upstream`]), a bulk backfill
//! through its TagNotes stream ([`backfill`]), and read-replica mode, which follows its store
//! ([`replica`]).

pub mod backfill;
pub mod replica;
pub mod upstream;
