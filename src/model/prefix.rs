//! Prompt prefix cache: the model state after a prompt's shared prefix, so the next prompt with
//! the same prefix is prefilled from where it ends.
//!
//! Every note of a category starts with the same system turn and handbook guidance (~700 of a
//! prompt's ~750-900 tokens on the default model), so after the first note of a category only the
//! note itself is prefilled. The caller says where the shared part ends (the chat encoder knows
//! where the note begins: `EncodedPrompt::shared_prefix`) and always computes a prompt in those
//! two chunks, cached or not: the state after the first chunk is then the same bits whether it was
//! computed now or restored, so the cache never changes an output (chunking itself can: quantized
//! matmuls round activations to 8 bits, which turns summation-order differences into visible
//! ones, so one chunk and two chunks need not agree to the last bit).
//!
//! Entries are keyed by their exact token ids and evicted least recently used.

/// One cached prefix and the state after it.
struct Entry<T> {
    ids: Vec<u32>,
    state: T,
    used: u64,
}

/// A least-recently-used cache of model states after shared prompt prefixes.
pub struct PrefixCache<T> {
    entries: Vec<Entry<T>>,
    capacity: usize,
    clock: u64,
    /// Prompt tokens not computed thanks to the cache, since load.
    pub hit_tokens: u64,
}

/// Whether a prompt of `len` tokens whose first `shared_prefix` other prompts share computes that
/// prefix as a chunk of its own (and so can take it from, or add it to, the cache): the prefix is
/// at least [`PrefixCache::MIN_TOKENS`] long and short of the whole prompt. The prefill and the
/// scheduler's budget both follow this one rule.
pub fn is_chunk(shared_prefix: usize, len: usize) -> bool {
    shared_prefix >= PrefixCache::<()>::MIN_TOKENS && shared_prefix < len
}

impl<T> PrefixCache<T> {
    /// Shortest prefix worth its own chunk and entry.
    pub const MIN_TOKENS: usize = 64;

    /// A cache of at most `capacity` states (0 keeps none).
    pub fn new(capacity: usize) -> PrefixCache<T> {
        PrefixCache {
            entries: Vec::new(),
            capacity,
            clock: 0,
            hit_tokens: 0,
        }
    }

    /// The state after exactly `ids`, if held (counts a hit).
    pub fn get(&mut self, ids: &[u32]) -> Option<&T> {
        let i = self.entries.iter().position(|e| e.ids == ids)?;
        self.clock += 1;
        self.hit_tokens += ids.len() as u64;
        let e = &mut self.entries[i];
        e.used = self.clock;
        Some(&e.state)
    }

    /// Whether the state after exactly `ids` is held (no hit counted, recency unchanged).
    pub fn contains(&self, ids: &[u32]) -> bool {
        self.entries.iter().any(|e| e.ids == ids)
    }

    /// Stores the state after `ids`, evicting the least recently used entry when full.
    pub fn insert(&mut self, ids: &[u32], state: T) {
        if self.capacity == 0 {
            return;
        }
        self.entries.retain(|e| e.ids != ids);
        if self.entries.len() >= self.capacity {
            if let Some(lru) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used) {
                self.entries.swap_remove(lru);
            }
        }
        self.clock += 1;
        self.entries.push(Entry {
            ids: ids.to_vec(),
            state,
            used: self.clock,
        });
    }

    /// Whether it keeps entries at all.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_prefixes_hit_and_the_least_recently_used_goes() {
        let mut c = PrefixCache::<u32>::new(2);
        assert!(c.get(&[1, 2, 3]).is_none());
        c.insert(&[1, 2, 3], 10);
        c.insert(&[4, 5], 20);
        assert_eq!(c.get(&[1, 2, 3]), Some(&10));
        assert!(c.get(&[1, 2]).is_none(), "only the exact ids hit");
        assert_eq!(c.hit_tokens, 3);
        c.insert(&[6], 30); // [4, 5] was used least recently
        assert_eq!(c.len(), 2);
        assert!(c.get(&[4, 5]).is_none());
        assert_eq!(c.get(&[6]), Some(&30));
        c.insert(&[6], 31); // replaces, does not duplicate
        assert_eq!((c.len(), c.get(&[6])), (2, Some(&31)));
        let mut off = PrefixCache::<u32>::new(0);
        off.insert(&[1], 1);
        assert!(off.is_empty());
    }
}
