//! [`NoteCache`], the read path: notes with their features, computed once per note, in front of
//! the store.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex, OnceLock,
};

use bytes::Bytes;
use compact_str::CompactString;
use dashmap::DashMap;
use moka::sync::Cache;

use super::{Store, StoreError, StoredNote};
use crate::{
    features::{Features, Schema},
    metrics::time_store,
};

/// A stored note with its features, as held in the cache.
#[derive(Debug)]
pub struct CachedNote {
    /// The stored record.
    pub record: StoredNote,
    /// Its features under the current schema (same order as `schema.groups`).
    pub features: Features,
    /// The gRPC layer's encoding of the note's most-read form (`NoteFeatures` with every group
    /// and no tags), made on the first read that asks for it and kept with the entry.
    pub wire: OnceLock<Bytes>,
}

/// The notes a [`NoteCache`] holds, looked up by id.
/// Ids are kept inline in the map's buckets (up to 24 bytes), so most comparisons read no other
/// memory.
type Index = DashMap<CompactString, Arc<CachedNote>, foldhash::fast::RandomState>;

/// The read path: notes with their features, computed once per note, in front of the store.
///
/// Two structures hold the same entries. moka decides which notes stay (its TinyLFU admission and
/// LRU eviction, bounded by note count); a sharded hash map (`index`) answers reads. moka's own
/// lookup records every access for its policy (a concurrent-hash-table probe plus a queued read
/// that its housekeeping later replays into its access-order deque), which cost ~0.5 ms of a
/// 500-note call; a read of the index is a hash and a shard's read lock. So reads look up the
/// index, and one in [`CacheConfig::record_hits_every`](crate::config::CacheConfig) hits is
/// replayed into moka, so its policy still sees which notes are read, at a fraction of the cost.
///
/// Invariants: an entry enters both structures together, under `writes`, and leaves the index
/// only through moka's eviction listener, and only if the index still holds that very entry (a
/// newer one for the same id stays). So the index holds what moka holds, once moka's
/// housekeeping has run.
pub struct NoteCache {
    store: Arc<dyn Store>,
    schema: Arc<Schema>,
    index: Arc<Index>,
    policy: Cache<CompactString, Arc<CachedNote>, foldhash::fast::RandomState>,
    /// Serializes inserts, so the index and the policy agree on each id's entry.
    writes: Mutex<()>,
    /// Replay one in this many hits into `policy`.
    record_every: u64,
    /// Hits so far, to choose which to replay.
    hits: AtomicU64,
    /// Hits replayed so far.
    recorded: AtomicU64,
}

impl NoteCache {
    /// A cache of at most `max_notes` notes over `store`; one in `record_hits_every` hits is
    /// recorded in the eviction policy (1 records every hit).
    pub fn new(
        store: Arc<dyn Store>,
        schema: Arc<Schema>,
        max_notes: u64,
        record_hits_every: u64,
    ) -> NoteCache {
        let index: Arc<Index> = Arc::new(DashMap::with_hasher(Default::default()));
        let evicted = Arc::downgrade(&index);
        let policy = Cache::builder()
            .max_capacity(max_notes)
            .eviction_listener(move |id: Arc<CompactString>, e: Arc<CachedNote>, _cause| {
                // Replaced: the index already holds the newer entry. Otherwise (evicted, or not
                // admitted at all): drop it from the index unless a newer entry took its place.
                if let Some(index) = evicted.upgrade() {
                    index.remove_if(id.as_str(), |_, cur| Arc::ptr_eq(cur, &e));
                }
            })
            .build_with_hasher(Default::default());
        NoteCache {
            store,
            schema,
            index,
            policy,
            writes: Mutex::new(()),
            record_every: record_hits_every.max(1),
            hits: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
        }
    }

    /// The schema features are computed with.
    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Caches `e` (the only way entries enter the cache, so the size gauge is kept here, off
    /// the read path). `replace: false` keeps an entry already cached for the id: a read that
    /// missed and then loaded the store must not put back a record older than one a concurrent
    /// write cached meanwhile. Returns the entry the cache holds for the id.
    fn insert(&self, e: Arc<CachedNote>, replace: bool) -> Arc<CachedNote> {
        let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        if !replace {
            if let Some(cur) = self.index.get(e.record.note_id.as_str()) {
                return cur.clone();
            }
        }
        let id = CompactString::from(e.record.note_id.as_str());
        self.index.insert(id.clone(), e.clone());
        self.policy.insert(id, e.clone());
        metrics::gauge!("tagllm_cache_entries").set(self.policy.entry_count() as f64);
        e
    }

    fn entry(&self, record: StoredNote) -> Arc<CachedNote> {
        let features = self.schema.features(&record.tags);
        Arc::new(CachedNote {
            record,
            features,
            wire: OnceLock::new(),
        })
    }

    /// Runs the eviction policy's pending work now (tests and shutdown; it otherwise runs as
    /// reads and writes go).
    pub fn run_pending_tasks(&self) {
        self.policy.run_pending_tasks();
    }

    /// Notes cached now (the policy's count, which the index follows).
    pub fn len(&self) -> u64 {
        self.policy.entry_count()
    }

    /// Whether no note is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cache hits replayed into the eviction policy so far.
    pub fn recorded_hits(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Cached notes only (never touches the store): cheap enough for an async thread.
    pub fn get_cached(&self, ids: &[&str]) -> Vec<Option<Arc<CachedNote>>> {
        let found: Vec<Option<Arc<CachedNote>>> = ids
            .iter()
            .map(|id| self.index.get(*id).map(|e| e.clone()))
            .collect();
        let hits = found.iter().filter(|f| f.is_some()).count() as u64;
        if hits > 0 {
            // Hits numbered n..n+hits; those divisible by record_every go to the policy.
            let n = self.hits.fetch_add(hits, Ordering::Relaxed);
            let mut next = (self.record_every - n % self.record_every) % self.record_every;
            let mut recorded = 0;
            for f in found.iter().flatten() {
                if next == 0 {
                    let _ = self.policy.get(f.record.note_id.as_str());
                    recorded += 1;
                    next = self.record_every;
                }
                next -= 1;
            }
            self.recorded.fetch_add(recorded, Ordering::Relaxed);
        }
        metrics::counter!("tagllm_cache_lookups_total", "result" => "hit").increment(hits);
        metrics::counter!("tagllm_cache_lookups_total", "result" => "miss")
            .increment(ids.len() as u64 - hits);
        found
    }

    /// Fills the `None` slots of `found` from the store (blocking I/O) and caches what it finds.
    pub fn fill_from_store(
        &self,
        ids: &[&str],
        found: &mut [Option<Arc<CachedNote>>],
    ) -> Result<(), StoreError> {
        let missing: Vec<usize> = (0..ids.len()).filter(|&i| found[i].is_none()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let miss_ids: Vec<&str> = missing.iter().map(|&i| ids[i]).collect();
        let records = time_store("get_many", || self.store.get_many(&miss_ids))?;
        for (&i, rec) in missing.iter().zip(records) {
            if let Some(rec) = rec {
                found[i] = Some(self.insert(self.entry(rec), false));
            }
        }
        Ok(())
    }

    /// Cache then store (blocking on a miss).
    pub fn get_many(&self, ids: &[&str]) -> Result<Vec<Option<Arc<CachedNote>>>, StoreError> {
        let mut found = self.get_cached(ids);
        self.fill_from_store(ids, &mut found)?;
        Ok(found)
    }

    /// Stores durably (blocking), then caches; returns the entry.
    pub fn put(&self, record: StoredNote) -> Result<Arc<CachedNote>, StoreError> {
        time_store("put", || self.store.put(&record))?;
        Ok(self.insert(self.entry(record), true))
    }

    /// Stores several notes in one durable commit (blocking), then caches them.
    pub fn put_many(&self, records: Vec<StoredNote>) -> Result<(), StoreError> {
        time_store("put_many", || self.store.put_many(&records))?;
        for r in records {
            // Only refresh notes already hot: a replica's catch-up must not evict them.
            if self.index.contains_key(r.note_id.as_str()) {
                self.insert(self.entry(r), true);
            }
        }
        Ok(())
    }

    /// A page of an incremental scan by tagging time (blocking; bypasses the cache).
    pub fn scan_since(
        &self,
        since_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<Arc<CachedNote>>, StoreError> {
        Ok(time_store("scan_since", || {
            self.store.scan_since(since_ms, after, limit)
        })?
        .into_iter()
        .map(|r| self.entry(r))
        .collect())
    }

    /// A page of a full scan with features (blocking; bypasses the cache so a scan does not evict
    /// the ranking path's hot notes).
    pub fn scan_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Arc<CachedNote>>, StoreError> {
        Ok(
            time_store("scan_page", || self.store.scan_page(after, limit))?
                .into_iter()
                .map(
                    |r| match self.index.get(r.note_id.as_str()).map(|e| e.clone()) {
                        Some(e) if e.record == r => e,
                        _ => self.entry(r),
                    },
                )
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{test_note as note, RedbStore};

    fn cache(max_notes: u64, record_every: u64) -> (tempfile::TempDir, NoteCache) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let schema = Arc::new(
            Schema::load(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/features.toml"),
            )
            .unwrap(),
        );
        (dir, NoteCache::new(store, schema, max_notes, record_every))
    }

    /// After churn far past capacity, the read index holds exactly what the eviction policy
    /// holds (evicted and refused entries leave it), and every note is still in the store.
    #[test]
    fn cache_index_follows_the_policy_and_the_store_keeps_everything() {
        let (_dir, c) = cache(8, 1);
        let ids: Vec<String> = (0..200).map(|i| format!("n{i:03}")).collect();
        for (i, id) in ids.iter().enumerate() {
            c.put(note(id, "nike")).unwrap();
            if i % 3 == 0 {
                let _ = c.get_cached(&[ids[0].as_str(), id.as_str()]);
            }
        }
        c.run_pending_tasks();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let hits: Vec<String> = c
            .get_cached(&refs)
            .into_iter()
            .flatten()
            .map(|e| e.record.note_id.clone())
            .collect();
        assert!(c.len() <= 8, "{} cached", c.len());
        assert_eq!(hits.len() as u64, c.len());
        assert_eq!(c.index.len() as u64, c.len());
        for id in &hits {
            assert!(
                c.policy.contains_key(id.as_str()),
                "{id} is in the index only"
            );
        }
        // Misses come back from the store, with their features.
        let all = c.get_many(&refs).unwrap();
        assert!(all.iter().all(Option::is_some));
    }

    /// A read that missed and loaded the store never puts back a record older than one a write
    /// cached meanwhile; a write always replaces.
    #[test]
    fn a_miss_fill_never_replaces_a_newer_entry() {
        let (_dir, c) = cache(100, 1);
        c.put(note("a", "new")).unwrap();
        let kept = c.insert(c.entry(note("a", "old")), false);
        assert_eq!(kept.record.tags[0].value, "new");
        let got = c.get_cached(&["a"]);
        assert_eq!(got[0].as_ref().unwrap().record.tags[0].value, "new");
        c.put(note("a", "newer")).unwrap();
        c.run_pending_tasks();
        let got = c.get_cached(&["a"]);
        assert_eq!(got[0].as_ref().unwrap().record.tags[0].value, "newer");
        // The replaced entry's eviction notice did not take the new one out of the index.
        assert_eq!(c.index.len(), 1);
        assert_eq!(c.len(), 1);
    }

    /// xorshift64: the next value of `x` (reproducible test randomness).
    fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Writers and readers at once, over a cache far smaller than the ids: afterwards the read
    /// index and the eviction policy hold the very same entries.
    #[test]
    fn index_and_policy_agree_under_concurrent_reads_and_writes() {
        let (_dir, c) = cache(16, 1);
        let ids: Vec<String> = (0..64).map(|i| format!("n{i:02}")).collect();
        std::thread::scope(|s| {
            for w in 0..2u64 {
                let (c, ids) = (&c, &ids);
                s.spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ w;
                    for i in 0..150 {
                        let id = &ids[(xorshift(&mut x) % 64) as usize];
                        c.put(note(id, &format!("v{w}-{i}"))).unwrap();
                    }
                });
            }
            for r in 0..2u64 {
                let (c, ids) = (&c, &ids);
                s.spawn(move || {
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ r;
                    for _ in 0..400 {
                        let x = xorshift(&mut x);
                        let a = (x % 56) as usize;
                        let batch: Vec<&str> = ids[a..a + 8].iter().map(String::as_str).collect();
                        if x.is_multiple_of(3) {
                            let _ = c.get_many(&batch).unwrap();
                        } else {
                            let _ = c.get_cached(&batch);
                        }
                    }
                });
            }
        });
        c.run_pending_tasks();
        assert!(c.len() <= 16, "{} cached", c.len());
        assert_eq!(c.index.len() as u64, c.len());
        // Collected first: no index guard may be held while moka runs (its listener writes).
        let entries: Vec<(CompactString, Arc<CachedNote>)> = c
            .index
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        for (id, e) in entries {
            let held = c.policy.get(id.as_str()).expect("in the policy too");
            assert!(Arc::ptr_eq(&held, &e), "{id} differs");
        }
    }

    /// One hit in `record_hits_every` reaches the eviction policy, counted across calls.
    #[test]
    fn one_hit_in_n_is_recorded_in_the_policy() {
        let (_dir, c) = cache(100, 4);
        for i in 0..10 {
            c.put(note(&format!("n{i}"), "nike")).unwrap();
        }
        let ids: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        let mut refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        refs.push("missing"); // misses are not hits
        for _ in 0..3 {
            let _ = c.get_cached(&refs);
        }
        // Hits 0..30; 0, 4, ..., 28 are recorded.
        assert_eq!(c.recorded_hits(), 8);
        let (_dir, every) = cache(100, 1);
        every.put(note("x", "nike")).unwrap();
        let _ = every.get_cached(&["x", "x", "y"]);
        assert_eq!(every.recorded_hits(), 2);
    }
}
