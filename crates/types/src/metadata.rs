use std::collections::BTreeMap;

use crate::{
    Violations,
    fields::{TextError, check_text},
};

/// An entry's labels: at most [`Metadata::MAX_KEYS`] keys of 1 to
/// [`Metadata::MAX_KEY_LEN`] characters from `A-Z a-z 0-9 . _ : -` (starting
/// with a letter or digit), each with a value of 1 to
/// [`Metadata::MAX_VALUE_LEN`] characters without control characters.
///
/// Kept in key order, so the same labels always read, store and fingerprint
/// alike whatever order a client's map arrived in.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    /// Most keys on one entry.
    pub const MAX_KEYS: usize = 16;
    /// Longest key, in characters.
    pub const MAX_KEY_LEN: usize = 40;
    /// Longest value, in characters.
    pub const MAX_VALUE_LEN: usize = 256;

    /// Parses the pairs of a request's `field` (a map), recording every
    /// problem: an invalid key under `field`, an invalid value under
    /// `field[key]`, too many keys under `field`.
    pub fn parse<'a>(
        field: &str,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        max_keys: usize,
        violations: &mut Violations,
    ) -> Option<Self> {
        let mut map = BTreeMap::new();
        let mut ok = true;
        for (key, value) in pairs {
            if let Err(e) = check_key(key) {
                violations.add(field, format!("key {key:?} {e}"));
                ok = false;
                continue;
            }
            if let Err(e) = check_value(value) {
                violations.add(format!("{field}[{key}]"), e.to_string());
                ok = false;
                continue;
            }
            map.insert(key.to_owned(), value.to_owned());
        }
        if map.len() > max_keys {
            violations.add(field, format!("must have at most {max_keys} keys, got {}", map.len()));
            ok = false;
        }
        ok.then_some(Self(map))
    }

    /// Labels read back from storage, where they were valid when written.
    pub fn from_stored(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self(pairs.into_iter().collect())
    }

    /// The pairs, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True without labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A canonical text of the labels (length-prefixed pairs in key order),
    /// for fingerprints and digests: no two different maps read alike.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.0 {
            out.push_str(&format!("{}:{k}{}:{v}", k.len(), v.len()));
        }
        out
    }
}

fn check_key(key: &str) -> Result<(), TextError> {
    let allowed = "letters, digits, '.', '_', ':' and '-', starting with a letter or digit";
    check_text(key, Metadata::MAX_KEY_LEN, allowed, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
    })?;
    match key.chars().next().filter(|c| !c.is_ascii_alphanumeric()) {
        Some(found) => Err(TextError::BadCharacter { allowed, found }),
        None => Ok(()),
    }
}

fn check_value(value: &str) -> Result<(), TextError> {
    check_text(value, Metadata::MAX_VALUE_LEN, "text without control characters", |c| !c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> (Option<Metadata>, Vec<String>) {
        let mut v = Violations::default();
        let m = Metadata::parse("metadata", pairs.iter().copied(), Metadata::MAX_KEYS, &mut v);
        (m, v.list().iter().map(|x| format!("{}: {}", x.field, x.description)).collect())
    }

    #[test]
    fn labels_are_kept_in_key_order() {
        let (m, errors) = parse(&[("order", "A-1"), ("channel", "pos"), ("bank:ref", "é 1")]);
        assert!(errors.is_empty(), "{errors:?}");
        let m = m.unwrap();
        assert_eq!(m.iter().map(|(k, _)| k).collect::<Vec<_>>(), ["bank:ref", "channel", "order"]);
        assert_eq!(m.get("order"), Some("A-1"));
    }

    #[test]
    fn every_bad_key_and_value_is_named() {
        let (m, errors) = parse(&[
            ("", "x"),
            ("-lead", "x"),
            ("a b", "x"),
            (&"k".repeat(41), "x"),
            ("empty", ""),
            ("ctl", "a\nb"),
            ("long", &"v".repeat(257)),
        ]);
        assert!(m.is_none());
        assert_eq!(errors.len(), 7, "{errors:?}");
        assert!(errors[0].starts_with("metadata: key \"\" is required"));
        assert!(errors[1].contains("found '-'"));
        assert!(errors[4].starts_with("metadata[empty]: is required"));
        assert!(errors[6].starts_with("metadata[long]: must be at most 256"));
    }

    #[test]
    fn the_number_of_keys_is_bounded() {
        let keys: Vec<String> = (0..17).map(|i| format!("k{i}")).collect();
        let pairs: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
        let (m, errors) = parse(&pairs);
        assert!(m.is_none());
        assert_eq!(errors, ["metadata: must have at most 16 keys, got 17"]);
        assert!(parse(&pairs[..16]).0.is_some());
    }

    #[test]
    fn canonical_text_tells_different_maps_apart() {
        let one = parse(&[("a", "b:c")]).0.unwrap();
        let two = parse(&[("a", "b"), ("c", "x")]).0.unwrap();
        assert_ne!(one.canonical(), two.canonical());
        let same = parse(&[("c", "x"), ("a", "b")]).0.unwrap();
        assert_eq!(two.canonical(), same.canonical());
        assert_eq!(Metadata::default().canonical(), "");
    }
}
