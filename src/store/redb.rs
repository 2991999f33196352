//! [`RedbStore`], the embedded default: redb is a pure-Rust, ACID, copy-on-write B-tree whose
//! commits are durable (fsync'd) before `commit` returns. Notes are kept by id, with an index by
//! tagging time kept in the same transactions (what incremental scans and replicas follow).

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{Store, StoreError, StoredNote};

const NOTES: TableDefinition<&str, &[u8]> = TableDefinition::new("notes_v1");
/// Index of `NOTES` by tagging time, kept in the same transactions: `(tagged_at_ms, note_id)`.
const BY_TAGGED: TableDefinition<(i64, &str), ()> = TableDefinition::new("notes_by_tagged_v1");

/// The embedded default store: one redb file, `notes.redb`, in the data directory.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            source: e.into(),
        })?;
        let path = dir.join("notes.redb");
        let db = Database::create(&path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        // Create the tables up front so readers never see them missing. A store written before
        // the time index existed (or whose index disagrees with it) gets the index rebuilt here,
        // in one transaction.
        let tx = db.begin_write()?;
        {
            let notes = tx.open_table(NOTES)?;
            let mut index = tx.open_table(BY_TAGGED)?;
            let (n, i) = (notes.len()?, index.len()?);
            if n != i {
                tracing::info!(notes = n, indexed = i, "rebuilding the tagging-time index");
                index.retain(|_, _| false)?;
                for item in notes.iter()? {
                    let (k, v) = item?;
                    let rec = decode(v.value())?;
                    index.insert((rec.tagged_at_ms, k.value()), ())?;
                }
            }
        }
        tx.commit()?;
        Ok(RedbStore { db })
    }

    /// Writes `notes` in the open transaction `tx`, keeping the time index in step.
    fn write(tx: &redb::WriteTransaction, notes: &[StoredNote]) -> Result<(), StoreError> {
        let mut table = tx.open_table(NOTES)?;
        let mut index = tx.open_table(BY_TAGGED)?;
        for note in notes {
            let bytes = serde_json::to_vec(note)?;
            let old = table
                .insert(note.note_id.as_str(), bytes.as_slice())?
                .map(|v| decode(v.value()))
                .transpose()?;
            if let Some(old) = old {
                index.remove((old.tagged_at_ms, note.note_id.as_str()))?;
            }
            index.insert((note.tagged_at_ms, note.note_id.as_str()), ())?;
        }
        Ok(())
    }
}

fn decode(bytes: &[u8]) -> Result<StoredNote, StoreError> {
    serde_json::from_slice(bytes).map_err(StoreError::from)
}

impl Store for RedbStore {
    fn get_many(&self, ids: &[&str]) -> Result<Vec<Option<StoredNote>>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(NOTES)?;
        ids.iter()
            .map(|id| match table.get(*id)? {
                Some(v) => decode(v.value()).map(Some),
                None => Ok(None),
            })
            .collect()
    }

    fn put(&self, note: &StoredNote) -> Result<(), StoreError> {
        self.put_many(std::slice::from_ref(note))
    }

    fn put_many(&self, notes: &[StoredNote]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        RedbStore::write(&tx, notes)?;
        // Durability::Immediate is redb's default: commit returns after fsync.
        Ok(tx.commit()?)
    }

    fn scan_since(
        &self,
        since_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<StoredNote>, StoreError> {
        use std::ops::Bound;
        let tx = self.db.begin_read()?;
        let notes = tx.open_table(NOTES)?;
        let index = tx.open_table(BY_TAGGED)?;
        let lower = match after {
            Some(a) if a >= (since_ms, "") => Bound::Excluded(a),
            _ => Bound::Included((since_ms, "")),
        };
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in index
            .range::<(i64, &str)>((lower, Bound::Unbounded))?
            .take(limit)
        {
            let (k, _) = item?;
            let (_, id) = k.value();
            match notes.get(id)? {
                Some(v) => out.push(decode(v.value())?),
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "index names {id:?}, which is not stored"
                    )))
                }
            }
        }
        Ok(out)
    }

    fn latest_tagged_at(&self) -> Result<Option<i64>, StoreError> {
        let tx = self.db.begin_read()?;
        let index = tx.open_table(BY_TAGGED)?;
        let last = index.last()?.map(|(k, _)| k.value().0);
        Ok(last)
    }

    fn scan_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<StoredNote>, StoreError> {
        use std::ops::Bound;
        let tx = self.db.begin_read()?;
        let table = tx.open_table(NOTES)?;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in table.range::<&str>((lower, Bound::Unbounded))?.take(limit) {
            let (_, v) = item?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    fn len(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(NOTES)?;
        Ok(table.len()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_note as note;

    #[test]
    fn put_get_scan_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            for i in 0..25 {
                s.put(&note(&format!("n{i:02}"), "nike")).unwrap();
            }
            s.put(&note("n03", "adidas")).unwrap();
            let got = s.get_many(&["n03", "missing", "n24"]).unwrap();
            assert_eq!(got[0].as_ref().unwrap().tags[0].value, "adidas");
            assert!(got[1].is_none());
            assert_eq!(s.len().unwrap(), 25);
        }
        let s = RedbStore::open(dir.path()).unwrap();
        let mut ids = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.scan_page(after.as_deref(), 10).unwrap();
            if page.is_empty() {
                break;
            }
            after = Some(page.last().unwrap().note_id.clone());
            ids.extend(page.into_iter().map(|n| n.note_id));
        }
        assert_eq!(ids.len(), 25);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    fn at(id: &str, t: i64) -> StoredNote {
        StoredNote {
            tagged_at_ms: t,
            ..note(id, "nike")
        }
    }

    fn since(s: &RedbStore, t: i64, page: usize) -> Vec<(i64, String)> {
        let mut out = Vec::new();
        let mut after: Option<(i64, String)> = None;
        loop {
            let got = s
                .scan_since(t, after.as_ref().map(|(t, id)| (*t, id.as_str())), page)
                .unwrap();
            if got.is_empty() {
                return out;
            }
            let last = got.last().unwrap();
            after = Some((last.tagged_at_ms, last.note_id.clone()));
            out.extend(got.into_iter().map(|n| (n.tagged_at_ms, n.note_id)));
        }
    }

    #[test]
    fn time_index_follows_rewrites_and_is_rebuilt_for_old_stores() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RedbStore::open(dir.path()).unwrap();
            s.put_many(&[at("a", 30), at("b", 10), at("c", 20), at("d", 20)])
                .unwrap();
            // Re-tagging moves a note in time; the old index entry goes.
            s.put(&at("b", 40)).unwrap();
            let all = since(&s, 0, 2);
            let ids: Vec<&str> = all.iter().map(|(_, id)| id.as_str()).collect();
            assert_eq!(ids, ["c", "d", "a", "b"]);
            assert_eq!(since(&s, 21, 10), [(30, "a".into()), (40, "b".into())]);
            assert_eq!(s.latest_tagged_at().unwrap(), Some(40));
        }
        // A store from before the index: drop it, reopen, and it is rebuilt.
        {
            let db = Database::create(dir.path().join("notes.redb")).unwrap();
            let tx = db.begin_write().unwrap();
            tx.delete_table(BY_TAGGED).unwrap();
            tx.commit().unwrap();
        }
        let s = RedbStore::open(dir.path()).unwrap();
        assert_eq!(since(&s, 0, 3).len(), 4);
        assert_eq!(since(&s, 25, 3), [(30, "a".into()), (40, "b".into())]);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            RedbStore::open(empty.path())
                .unwrap()
                .latest_tagged_at()
                .unwrap(),
            None
        );
    }
}
