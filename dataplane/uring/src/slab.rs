//! A minimal slab: stable `usize` keys into a `Vec`, reused through a free list.
//! Op slots are keyed by it (the key is the SQE `user_data`), as are tasks and timers.

#[derive(Debug)]
enum Entry<T> {
    Occupied(T),
    Vacant { next_free: usize },
}

/// Values addressed by small integer keys; a key stays valid until removed.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    /// Head of the free list; `entries.len()` when there is none.
    free: usize,
    len: usize,
}

impl<T> Slab<T> {
    pub(crate) const fn new() -> Self {
        Slab {
            entries: Vec::new(),
            free: 0,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The key the next `insert` will return.
    pub(crate) fn next_key(&self) -> usize {
        self.free
    }

    pub(crate) fn insert(&mut self, value: T) -> usize {
        let key = self.free;
        if key == self.entries.len() {
            self.entries.push(Entry::Occupied(value));
            self.free = self.entries.len();
        } else {
            let Entry::Vacant { next_free } = self.entries[key] else {
                unreachable!("free list points at an occupied entry");
            };
            self.free = next_free;
            self.entries[key] = Entry::Occupied(value);
        }
        self.len += 1;
        key
    }

    pub(crate) fn get(&self, key: usize) -> Option<&T> {
        match self.entries.get(key) {
            Some(Entry::Occupied(v)) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        match self.entries.get_mut(key) {
            Some(Entry::Occupied(v)) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn remove(&mut self, key: usize) -> Option<T> {
        let entry = self.entries.get_mut(key)?;
        if matches!(entry, Entry::Vacant { .. }) {
            return None;
        }
        let old = std::mem::replace(
            entry,
            Entry::Vacant {
                next_free: self.free,
            },
        );
        self.free = key;
        self.len -= 1;
        match old {
            Entry::Occupied(v) => Some(v),
            Entry::Vacant { .. } => None,
        }
    }

    /// Removes and returns every value (used at shutdown).
    pub(crate) fn drain(&mut self) -> Vec<T> {
        let entries = std::mem::take(&mut self.entries);
        self.free = 0;
        self.len = 0;
        entries
            .into_iter()
            .filter_map(|e| match e {
                Entry::Occupied(v) => Some(v),
                Entry::Vacant { .. } => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn keys_are_reused_after_remove() {
        let mut s = Slab::new();
        let a = s.insert('a');
        let b = s.insert('b');
        assert_eq!(s.remove(a), Some('a'));
        assert_eq!(s.remove(a), None);
        let c = s.insert('c');
        assert_eq!(c, a);
        assert_eq!(s.get(b), Some(&'b'));
        assert_eq!(s.len(), 2);
        assert_eq!(s.drain().len(), 2);
        assert_eq!(s.len(), 0);
    }
}
