//! An envelope's headers: a few names and values, read far more often than changed.
//!
//! Read from the log, headers stay the JSON text they were stored as, checked once, and a
//! header asked for is found in that text. A consumer reads hundreds of thousands of
//! envelopes a second and asks each for one or two headers; parsing every object into a
//! map of owned strings was a fifth of what a notes drain spent reading the log (measured:
//! the readers' CPU per drain fell by a quarter with no headers parsed at all, and by only
//! a tenth when `serde_json` still checked each object borrowing its strings). So the text
//! the platform writes, `serde_json`'s compact form, is checked and searched by a scan
//! for quotes; any other JSON goes through `serde_json` into a map. A change turns them
//! into a map first.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// Header names to values.
#[derive(Clone, Default)]
pub struct Headers(Repr);

#[derive(Clone)]
enum Repr {
    /// A JSON object of strings in compact form with no escape sequence in it (see
    /// `each_pair`), as read from a store: each of its strings is its own text.
    Json(Box<str>),
    Map(BTreeMap<String, String>),
}

impl Default for Repr {
    fn default() -> Self {
        Repr::Map(BTreeMap::new())
    }
}

impl Headers {
    /// Headers stored as `json`, an object of strings; an error if it is not one.
    pub fn from_json(json: String) -> Result<Headers, serde_json::Error> {
        if each_pair(&json, |_, _| {}) {
            return Ok(Headers(Repr::Json(json.into_boxed_str())));
        }
        Ok(Headers(Repr::Map(serde_json::from_str(&json)?)))
    }

    /// The headers as a JSON object, for storing.
    pub fn to_json(&self) -> Result<Cow<'_, str>, serde_json::Error> {
        match &self.0 {
            Repr::Json(json) => Ok(Cow::Borrowed(json)),
            Repr::Map(map) => serde_json::to_string(map).map(Cow::Owned),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        match &self.0 {
            // A name whose text appears nowhere is not there.
            Repr::Json(json) if !json.contains(name) => None,
            Repr::Json(json) => {
                // The last of a repeated name, as a map would keep.
                let mut found = None;
                each_pair(json, |key, value| {
                    if key == name {
                        found = Some(value);
                    }
                });
                found
            }
            Repr::Map(map) => map.get(name).map(String::as_str),
        }
    }

    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.map().insert(name.into(), value.into());
    }

    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.get(name)?;
        self.map().remove(name)
    }

    /// Every header, by name.
    pub fn entries(&self) -> BTreeMap<&str, &str> {
        match &self.0 {
            Repr::Json(json) => {
                let mut entries = BTreeMap::new();
                each_pair(json, |name, value| {
                    entries.insert(name, value);
                });
                entries
            }
            Repr::Map(map) => map
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect(),
        }
    }

    fn map(&mut self) -> &mut BTreeMap<String, String> {
        if let Repr::Json(_) = &self.0 {
            let map = self
                .entries()
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect();
            self.0 = Repr::Map(map);
        }
        match &mut self.0 {
            Repr::Map(map) => map,
            Repr::Json(_) => unreachable!("turned into a map above"),
        }
    }
}

/// Calls `each` with every name and value of `json`, in order, and says whether `json` is
/// an object of strings in the compact form `serde_json::to_string` writes with no escape
/// sequence (`{}`, `{"a":"b","c":"d"}`). Text that is not in that form (escapes, spaces, or
/// not JSON) is false, after `each` has seen what came before the first difference.
fn each_pair<'a>(json: &'a str, mut each: impl FnMut(&'a str, &'a str)) -> bool {
    let Some(mut rest) = json
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
    else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    loop {
        let Some((name, after)) = string(rest) else {
            return false;
        };
        let Some((value, after)) = after.strip_prefix(':').and_then(string) else {
            return false;
        };
        each(name, value);
        match after.strip_prefix(',') {
            Some(next) => rest = next,
            None => return after.is_empty(),
        }
    }
}

/// A JSON string at the start of `text` that needs no unescaping, and what follows it.
fn string(text: &str) -> Option<(&str, &str)> {
    let body = text.strip_prefix('"')?;
    let end = body.find('"')?;
    let content = &body[..end];
    // JSON strings hold no raw control characters; a backslash would escape the quote.
    let plain = !content.bytes().any(|byte| byte < 0x20 || byte == b'\\');
    plain.then(|| (content, &body[end + 1..]))
}

impl From<BTreeMap<String, String>> for Headers {
    fn from(map: BTreeMap<String, String>) -> Self {
        Headers(Repr::Map(map))
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(headers: I) -> Self {
        Headers(Repr::Map(
            headers
                .into_iter()
                .map(|(name, value)| (name.into(), value.into()))
                .collect(),
        ))
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.entries() == other.entries()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.entries()).finish()
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.entries())
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(deserializer).map(Headers::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(json: &str) -> Headers {
        Headers::from_json(json.to_owned()).expect("an object of strings")
    }

    #[test]
    fn a_stored_header_is_found_in_its_text() {
        let headers = stored(r#"{"causation-id":"a","correlation-id":"b","revision":"2"}"#);
        assert_eq!(headers.get("correlation-id"), Some("b"));
        assert_eq!(headers.get("revision"), Some("2"));
        assert_eq!(headers.get("stream"), None);
        // A name that appears only as a value is not a header.
        assert_eq!(stored(r#"{"a":"stream"}"#).get("stream"), None);
    }

    #[test]
    fn the_last_of_a_repeated_name_counts_as_in_a_map() {
        let json = r#"{"a":"1","a":"2"}"#;
        let map: BTreeMap<String, String> = serde_json::from_str(json).expect("map");
        assert_eq!(stored(json).get("a"), map.get("a").map(String::as_str));
    }

    #[test]
    fn escaped_text_is_unescaped() {
        let headers = stored(r#"{"a":"say \"hi\"","b\u0021":"x"}"#);
        assert_eq!(headers.get("a"), Some(r#"say "hi""#));
        assert_eq!(headers.get("b!"), Some("x"));
    }

    #[test]
    fn json_in_another_form_is_read_as_serde_json_reads_it() {
        let spaced = stored(r#"{ "a" : "1" ,"b":"2" }"#);
        assert_eq!(spaced, [("a", "1"), ("b", "2")].into_iter().collect());
        assert_eq!(spaced.to_json().expect("json"), r#"{"a":"1","b":"2"}"#);
    }

    #[test]
    fn what_is_not_an_object_of_strings_is_refused() {
        let bad = [
            "",
            "{",
            "}",
            "[]",
            "null",
            r#"{"a":1}"#,
            r#"{"a":"b"} x"#,
            r#"{"a":"b""#,
            r#"{"a":"b",}"#,
            r#"{"a""b"}"#,
            r#"{"a":"b" "c":"d"}"#,
            "{\"a\":\"\u{1}\"}",
        ];
        for bad in bad {
            assert!(Headers::from_json(bad.to_owned()).is_err(), "{bad}");
        }
        assert_eq!(stored("{}").entries(), BTreeMap::new());
    }

    #[test]
    fn a_change_keeps_the_others_and_is_stored() {
        let mut headers = stored(r#"{"a":"1","b":"2"}"#);
        headers.insert("c", "3");
        assert_eq!(headers.remove("a").as_deref(), Some("1"));
        assert_eq!(headers.remove("zz"), None);
        let json = headers.to_json().expect("json").into_owned();
        assert_eq!(
            stored(&json),
            [("b", "2"), ("c", "3")].into_iter().collect()
        );
        assert_eq!(json, r#"{"b":"2","c":"3"}"#);
    }

    #[test]
    fn stored_and_built_headers_are_equal_and_serialize_alike() {
        let built: Headers = [("x", "1"), ("y", "2")].into_iter().collect();
        let read = stored(r#"{"y":"2","x":"1"}"#);
        assert_eq!(built, read);
        assert_eq!(
            serde_json::to_string(&built).expect("built"),
            serde_json::to_string(&read).expect("read")
        );
        assert_eq!(format!("{read:?}"), r#"{"x": "1", "y": "2"}"#);
    }
}
