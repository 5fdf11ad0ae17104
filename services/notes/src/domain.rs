//! Notes and their rules. No IO.

platform::uuid_id!(
    /// A note's id: a UUIDv7 minted when the API accepts the note, so ids sort by the time
    /// they were accepted.
    NoteId
);

/// The longest content accepted, in characters.
pub const MAX_CONTENT_CHARS: usize = 16 * 1024;
/// How many notes a page lists unless asked.
pub const DEFAULT_PAGE: u32 = 100;
/// The most notes one page lists.
pub const MAX_PAGE: u32 = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub id: NoteId,
    pub content: String,
    /// When the API accepted it, in Unix milliseconds.
    pub created_at: i64,
}

/// A rule a request broke, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        field,
        message: message.into(),
    }
}

/// A note's content: present, not blank, at most `MAX_CONTENT_CHARS` characters.
pub fn content(content: Option<String>) -> Result<String, Invalid> {
    let content = content.ok_or_else(|| invalid("content", "is required"))?;
    if content.trim().is_empty() {
        return Err(invalid("content", "must not be blank"));
    }
    if content.chars().count() > MAX_CONTENT_CHARS {
        return Err(invalid(
            "content",
            format!("must be at most {MAX_CONTENT_CHARS} characters"),
        ));
    }
    Ok(content)
}

/// Which notes a list shows: newest first, `limit` of them, older than `before` if given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    pub before: Option<NoteId>,
}

impl Page {
    pub fn new(limit: Option<i64>, before: Option<&str>) -> Result<Page, Invalid> {
        let limit = match limit {
            None => DEFAULT_PAGE,
            Some(limit) => u32::try_from(limit)
                .ok()
                .filter(|limit| (1..=MAX_PAGE).contains(limit))
                .ok_or_else(|| invalid("limit", format!("must be from 1 to {MAX_PAGE}")))?,
        };
        let before = before
            .map(|id| NoteId::parse(id).ok_or_else(|| invalid("before", "must be a note's id")))
            .transpose()?;
        Ok(Page { limit, before })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_required_not_blank_and_bounded() {
        assert_eq!(content(None).unwrap_err().field, "content");
        assert!(content(Some(" \n\t".into())).is_err());
        assert!(content(Some("x".repeat(MAX_CONTENT_CHARS + 1))).is_err());
        // Characters, not bytes: the longest content in a multi-byte script is accepted.
        let longest = "é".repeat(MAX_CONTENT_CHARS);
        assert_eq!(content(Some(longest.clone())), Ok(longest));
    }

    #[test]
    fn a_page_defaults_to_a_hundred_and_takes_at_most_a_thousand() {
        assert_eq!(
            Page::new(None, None).map(|page| page.limit),
            Ok(DEFAULT_PAGE)
        );
        assert_eq!(Page::new(Some(1000), None).map(|page| page.limit), Ok(1000));
        for refused in [0, -1, 1001, i64::MAX] {
            assert_eq!(Page::new(Some(refused), None).unwrap_err().field, "limit");
        }
    }

    #[test]
    fn paging_starts_before_a_note_id() {
        let id = NoteId::new();
        let page = Page::new(None, Some(&id.to_string())).expect("a note id");
        assert_eq!(page.before, Some(id));
        assert_eq!(
            Page::new(None, Some("yesterday")).unwrap_err().field,
            "before"
        );
    }
}
