//! Checks of user-supplied text, shared by every newtype that parses a
//! request field (a post title, a comment's content).

/// Why a text field was refused; its message is what the user is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("`{field}` must not be empty")]
    Empty { field: String },
    #[error("`{field}` must be at most {max_chars} characters")]
    TooLong { field: String, max_chars: usize },
}

/// A required text field: trimmed, not empty, at most `max_chars` characters.
pub fn required(field: &str, value: &str, max_chars: usize) -> Result<String, TextError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(TextError::Empty { field: field.to_owned() });
    }
    if value.chars().count() > max_chars {
        return Err(TextError::TooLong { field: field.to_owned(), max_chars });
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_trimmed_and_bounded_in_characters() {
        assert_eq!(required("title", "  hi ", 2).unwrap(), "hi");
        assert_eq!(required("title", " \t", 2), Err(TextError::Empty { field: "title".into() }));
        assert_eq!(required("title", "ééé", 2), Err(TextError::TooLong { field: "title".into(), max_chars: 2 }));
        assert_eq!(required("title", "éé", 2).unwrap(), "éé");
    }
}
