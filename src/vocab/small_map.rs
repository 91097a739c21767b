//! A string-keyed map for the few entries a tenant's month holds (one or two providers, a
//! handful of models): a sorted `Vec`, serialized as a JSON object. `BTreeMap` allocates a
//! node for eleven entries on the first insert, about 1 KiB per map with these values, which
//! was the largest part of byokd's memory per tenant at 10,000 tenants.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Keys in ascending order, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmallMap<V>(Vec<(Box<str>, V)>);

impl<V> Default for SmallMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> SmallMap<V> {
    fn find(&self, k: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(key, _)| (**key).cmp(k))
    }

    pub fn get(&self, k: &str) -> Option<&V> {
        self.find(k).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, k: &str) -> Option<&mut V> {
        self.find(k).ok().map(|i| &mut self.0[i].1)
    }

    /// The value of `k`, inserted as `V::default()` first if absent.
    pub fn entry_or_default(&mut self, k: &str) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(k) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (k.into(), V::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Sets `k` to `v`, returning the value it replaced.
    pub fn insert(&mut self, k: &str, v: V) -> Option<V> {
        match self.find(k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.0.insert(i, (k.into(), v));
                None
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.0.iter().map(|(k, v)| (&**k, v))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V> std::ops::Index<&str> for SmallMap<V> {
    type Output = V;

    /// Panics when `k` is absent, like `BTreeMap`'s index.
    fn index(&self, k: &str) -> &V {
        match self.get(k) {
            Some(v) => v,
            None => panic!("no entry `{k}` in the map"),
        }
    }
}

impl<'a, V> IntoIterator for &'a SmallMap<V> {
    type Item = (&'a str, &'a V);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Box<str>, V)>,
        fn(&'a (Box<str>, V)) -> (&'a str, &'a V),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (&**k, v))
    }
}

impl<V: Serialize> Serialize for SmallMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for SmallMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V_<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V_<V> {
            type Value = SmallMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut m = SmallMap(Vec::with_capacity(a.size_hint().unwrap_or(0).min(64)));
                while let Some((k, v)) = a.next_entry::<String, V>()? {
                    // A repeated key keeps its last value, as serde_json does for maps.
                    m.insert(&k, v);
                }
                Ok(m)
            }
        }
        d.deserialize_map(V_(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_unique_and_a_json_object() {
        let mut m: SmallMap<u32> = SmallMap::default();
        *m.entry_or_default("b") += 2;
        *m.entry_or_default("a") += 1;
        *m.entry_or_default("b") += 3;
        assert_eq!(m.insert("c", 9), None);
        assert_eq!(m.insert("c", 7), Some(9));
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            [("a", &1), ("b", &5), ("c", &7)]
        );
        assert_eq!(m["b"], 5);
        assert_eq!(m.get("z"), None);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"a":1,"b":5,"c":7}"#);
        let back: SmallMap<u32> = serde_json::from_str(r#"{"c":7,"a":1,"b":5,"a":4}"#).unwrap();
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            [("a", &4), ("b", &5), ("c", &7)]
        );
    }
}
