//! The prefix store: the key/value states of few-shot prefixes kept between calls, so that each
//! prompt's shared leading ids are computed once. One store serves the [`crate::Embedder`] (one
//! prompt at a time, as a CLI run) and a server (one prefix per task preset or inline prompt in
//! use): bounded by bytes and optionally by entries, least recently used out first, and a state
//! larger than the whole budget is computed for its call but not kept. It also keeps what the cache
//! did ([`PrefixStats`]), updated by the engine loop as batches finish.
//!
//! The store is generic over the states ([`PrefixState`]) so that its policy is tested without a
//! model.

use crate::backend::Prefix;
use crate::error::Result;

/// What the store needs of a prefix's states: the ids they are the states of (the key) and their
/// size (the budget).
pub trait PrefixState {
    /// The prefix's token ids.
    fn ids(&self) -> &[u32];
    /// Bytes the states hold.
    fn bytes(&self) -> usize;
}

impl PrefixState for Prefix {
    fn ids(&self) -> &[u32] {
        Prefix::ids(self)
    }

    fn bytes(&self) -> usize {
        Prefix::bytes(self)
    }
}

/// What the prefix cache did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrefixStats {
    /// Length of the last prefix computed (tokens), and the size of its key/value states.
    pub prefix_tokens: usize,
    pub state_bytes: usize,
    /// Prefixes computed.
    pub prefixes: usize,
    /// Look-ups that found the states kept, and those that had to compute them.
    pub hits: usize,
    pub misses: usize,
    /// Bytes of states held now.
    pub bytes: usize,
    /// Rows embedded on top of a prefix.
    pub cached: usize,
    /// Rows computed in full because their ids do not start with the prefix's (a tokenizer
    /// merged tokens across the boundary).
    pub fallback: usize,
}

/// A prefix's states for one call: kept in the store (as its most recently used entry), or too
/// large to keep and held by the call alone. [`PrefixStore::states`] gives them either way.
#[derive(Debug)]
#[non_exhaustive]
pub enum Held<S> {
    Kept,
    Alone(S),
}

/// Prefix states keyed by their ids, least recently used out first.
#[derive(Debug)]
pub struct PrefixStore<S = Prefix> {
    /// Least recently used first.
    entries: Vec<S>,
    budget: usize,
    max_entries: Option<usize>,
    stats: PrefixStats,
}

impl<S: PrefixState> PrefixStore<S> {
    /// A store of at most `budget` bytes of states and, with `max_entries`, at most that many
    /// prefixes.
    pub fn new(budget: usize, max_entries: Option<usize>) -> PrefixStore<S> {
        PrefixStore {
            entries: Vec::new(),
            budget,
            max_entries,
            stats: PrefixStats::default(),
        }
    }

    /// Makes `ids`' states the most recently used, computing them with `compute` on a miss; the
    /// least recently used go until the new states fit. States that fit in no store of this budget
    /// are handed back ([`Held::Alone`]) instead of kept.
    pub fn get(
        &mut self,
        ids: &[u32],
        compute: impl FnOnce(&[u32]) -> Result<S>,
    ) -> Result<Held<S>> {
        if let Some(at) = self.entries.iter().position(|p| p.ids() == ids) {
            let hit = self.entries.remove(at);
            self.entries.push(hit);
            self.stats.hits += 1;
            return Ok(Held::Kept);
        }
        self.stats.misses += 1;
        let states = compute(ids)?;
        let size = states.bytes();
        self.stats.prefixes += 1;
        self.stats.prefix_tokens = ids.len();
        self.stats.state_bytes = size;
        if size > self.budget || self.max_entries == Some(0) {
            return Ok(Held::Alone(states));
        }
        while self.total() + size > self.budget || self.full() {
            self.entries.remove(0);
        }
        self.entries.push(states);
        self.stats.bytes = self.total();
        Ok(Held::Kept)
    }

    /// The states `held` stands for.
    pub fn states<'a>(&'a self, held: &'a Held<S>) -> &'a S {
        match held {
            Held::Kept => self
                .entries
                .last()
                .expect("a kept prefix is the newest entry"),
            Held::Alone(s) => s,
        }
    }

    /// Bytes of states held.
    pub fn bytes(&self) -> usize {
        self.stats.bytes
    }

    /// The ids of the prefixes kept, least recently used first.
    pub fn kept(&self) -> impl Iterator<Item = &[u32]> {
        self.entries.iter().map(PrefixState::ids)
    }

    /// What the store did so far.
    pub fn stats(&self) -> &PrefixStats {
        &self.stats
    }

    /// Counts the rows of a finished batch: `on_prefix` of `rows` ran on a prefix, the others in
    /// full. The engine loop calls it; callers never need to.
    pub(crate) fn count_rows(&mut self, rows: usize, on_prefix: usize) {
        self.stats.cached += on_prefix;
        self.stats.fallback += rows - on_prefix;
    }

    fn total(&self) -> usize {
        self.entries.iter().map(PrefixState::bytes).sum()
    }

    fn full(&self) -> bool {
        self.max_entries.is_some_and(|m| self.entries.len() >= m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// States for tests: (ids, bytes).
    type S = (Vec<u32>, usize);

    impl PrefixState for S {
        fn ids(&self) -> &[u32] {
            &self.0
        }
        fn bytes(&self) -> usize {
            self.1
        }
    }

    /// Gets prefix `[id]` of `bytes` bytes: `Ok(id)` when kept, `Err(id)` when held alone.
    fn get(store: &mut PrefixStore<S>, id: u32, bytes: usize) -> Result<u32, u32> {
        let held = store.get(&[id], |ids| Ok((ids.to_vec(), bytes))).unwrap();
        let got = store.states(&held).0[0];
        match held {
            Held::Kept => Ok(got),
            Held::Alone(_) => Err(got),
        }
    }

    fn kept(store: &PrefixStore<S>) -> Vec<u32> {
        store.kept().map(|ids| ids[0]).collect()
    }

    #[test]
    fn the_store_keeps_what_fits_and_evicts_the_least_recently_used() {
        let mut store = PrefixStore::new(100, None);
        assert_eq!(get(&mut store, 1, 40), Ok(1));
        assert_eq!(get(&mut store, 2, 40), Ok(2));
        assert_eq!(get(&mut store, 1, 40), Ok(1)); // a hit: 1 is now the most recent
        assert_eq!(get(&mut store, 3, 40), Ok(3)); // 2 goes, the least recently used
        assert_eq!(kept(&store), vec![1, 3]);
        assert_eq!(store.bytes(), 80);
        assert_eq!(get(&mut store, 4, 150), Err(4)); // larger than the budget: not kept
        assert_eq!(kept(&store), vec![1, 3]);
        let s = store.stats();
        assert_eq!((s.hits, s.misses, s.prefixes, s.bytes), (1, 4, 4, 80));
        assert_eq!((s.prefix_tokens, s.state_bytes), (1, 150));
    }

    #[test]
    fn the_entry_bound_keeps_the_most_recent_prefixes() {
        let mut store = PrefixStore::new(1000, Some(2));
        for id in [1, 2, 1, 3] {
            assert_eq!(get(&mut store, id, 10), Ok(id));
        }
        assert_eq!(kept(&store), vec![1, 3]);
        assert_eq!(store.bytes(), 20);
        let mut none = PrefixStore::new(1000, Some(0));
        assert_eq!(get(&mut none, 1, 10), Err(1));
        assert_eq!(
            get(&mut none, 1, 10),
            Err(1),
            "nothing kept, so computed again"
        );
        assert_eq!(none.stats().prefixes, 2);
    }

    #[test]
    fn a_failed_computation_is_a_miss_that_keeps_nothing() {
        let mut store: PrefixStore<S> = PrefixStore::new(100, None);
        let failed = store.get(&[1], |_| Err(crate::Error::internal("no model")));
        assert!(failed.is_err());
        let s = store.stats();
        assert_eq!((s.misses, s.prefixes, s.bytes), (1, 0, 0));
        assert_eq!(kept(&store), Vec::<u32>::new());
    }

    #[test]
    fn rows_are_counted_on_the_prefix_or_in_full() {
        let mut store: PrefixStore<S> = PrefixStore::new(100, None);
        store.count_rows(5, 3);
        store.count_rows(2, 2);
        assert_eq!((store.stats().cached, store.stats().fallback), (5, 2));
    }
}
