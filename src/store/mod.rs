//! The durable store of tagged notes and the cache in front of it.
//!
//! [`Store`] is the persistence boundary (one trait: another backend, such as a shared online
//! store for several replicas, is a new file here); [`RedbStore`] ([`redb`](self::redb)) is the
//! embedded default, whose commits are durable before they return, so an acknowledged TagNote
//! survives a crash at any point. [`NoteCache`] ([`cache`]) keeps notes with their features
//! ready to serve.

pub mod cache;
pub mod redb;

pub use self::cache::{CachedNote, NoteCache};
pub use self::redb::RedbStore;

use serde::{Deserialize, Serialize};

use crate::domain::{Tag, Versions};

/// Everything stored about one tagged note. Features are not stored: they are a pure function of
/// the tags and the schema, so a schema change needs no re-tagging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredNote {
    /// The caller's note id.
    pub note_id: String,
    /// Category as the caller sent it.
    pub category: String,
    /// Handbook entry that tagged it (the fallback's key for unknown categories).
    pub handbook_category: String,
    /// [`crate::domain::Note::content_hash`] of the tagged content.
    pub content_hash: String,
    /// Model and handbook versions.
    pub versions: Versions,
    /// The tags.
    pub tags: Vec<Tag>,
    /// When it was tagged (ms since the epoch).
    pub tagged_at_ms: i64,
    /// The model's raw output.
    pub raw_output: String,
    /// Candidates the parser dropped.
    pub dropped_tags: u32,
    /// Prompt tokens of the generation.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub generated_tokens: u32,
}

/// A storage failure (the store is broken or full, not the caller's fault).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's directory or file could not be created or opened.
    #[error("store: opening {path}: {source}")]
    Open {
        /// The directory or file.
        path: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database failed: I/O, a full disk, a damaged file. (Boxed: redb's error is large,
    /// and every store call returns this type.)
    #[error("store: {0}")]
    Db(#[source] Box<::redb::Error>),
    /// A record does not encode or decode.
    #[error("store: a record does not encode or decode: {0}")]
    Record(#[from] serde_json::Error),
    /// The store contradicts itself (an index entry without its note).
    #[error("store: corrupt: {0}")]
    Corrupt(String),
}

// redb's operations each have their own error type; all of them are a `redb::Error`.
macro_rules! from_redb {
    ($($t:ident),*) => {$(
        impl From<::redb::$t> for StoreError {
            fn from(e: ::redb::$t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    DatabaseError,
    TransactionError,
    TableError,
    StorageError,
    CommitError
);

/// Persistence of tagged notes.
pub trait Store: Send + Sync + 'static {
    /// The notes with these ids, in order (`None` = never stored).
    fn get_many(&self, ids: &[&str]) -> Result<Vec<Option<StoredNote>>, StoreError>;
    /// Stores a note durably, replacing any earlier version; returns once it is on disk.
    fn put(&self, note: &StoredNote) -> Result<(), StoreError>;
    /// Stores several notes in one durable commit (all or none).
    fn put_many(&self, notes: &[StoredNote]) -> Result<(), StoreError> {
        notes.iter().try_for_each(|n| self.put(n))
    }
    /// Up to `limit` notes with ids strictly after `after` (all from the start when `None`), in id
    /// order: the page of a scan.
    fn scan_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<StoredNote>, StoreError>;
    /// Up to `limit` notes tagged at or after `since_ms`, in `(tagged_at_ms, note_id)` order,
    /// strictly after the cursor `after`: the page of an incremental scan (what replicas follow).
    fn scan_since(
        &self,
        since_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredNote>, StoreError>;
    /// The latest `tagged_at_ms` stored (`None` when empty).
    fn latest_tagged_at(&self) -> Result<Option<i64>, StoreError>;
    /// Number of stored notes.
    fn len(&self) -> Result<u64, StoreError>;
    /// Whether the store holds no note.
    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

/// A stored note for tests: one `brand` tag of value `v`.
#[cfg(test)]
pub(crate) fn test_note(id: &str, v: &str) -> StoredNote {
    StoredNote {
        note_id: id.into(),
        category: "sneakers".into(),
        handbook_category: "sneakers".into(),
        content_hash: "h".into(),
        versions: Versions::default(),
        tags: vec![Tag {
            dimension: "brand".into(),
            value: v.into(),
            score: 1.0,
        }],
        tagged_at_ms: 1,
        raw_output: String::new(),
        dropped_tags: 0,
        prompt_tokens: 0,
        generated_tokens: 0,
    }
}
