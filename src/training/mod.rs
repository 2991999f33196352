//! Offline, not on the serving path: teacher data from an OpenAI-compatible endpoint with the
//! paper's three steps ([`teacher`]), and the records -> SFT files for the student ([`distill`]).

pub mod distill;
pub mod teacher;
