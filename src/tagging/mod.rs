//! The tagging use case, in the order a note goes through it: the [`handbook`] says what to tag
//! for its category, [`images`] are checked and decoded at the edge, [`prompt`] builds the chat
//! messages and [`grammar`] the answer's grammar, the model writes the answer, [`tags`] turns it
//! into normalized, handbook-checked tags, and [`tagger`] runs all of it with idempotency and
//! stores the result.

pub mod grammar;
pub mod handbook;
pub mod images;
pub mod prompt;
pub mod tagger;
pub mod tags;
