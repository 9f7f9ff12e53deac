//! Checks of user-supplied text, shared by every newtype that parses a
//! request field (a post title, a comment's content).
//!
//! What is stored is what the user sent, trimmed: these checks refuse text,
//! they never rewrite it. Text that only looks like something is the
//! problem they guard against: a title made of a zero-width space is shown
//! as nothing, and a NUL or BEL would reach every reader of the view and
//! every subscriber of the events as is.

use icu_properties::{
    CodePointMapData, CodePointSetData,
    props::{DefaultIgnorableCodePoint, GeneralCategory},
};

/// Why a text field was refused; its message is what the user is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("`{field}` must not be empty")]
    Empty { field: String },
    #[error("`{field}` must be at most {max_chars} characters")]
    TooLong { field: String, max_chars: usize },
    #[error("`{field}` must not contain control characters")]
    ControlCharacter { field: String },
}

/// A required text field: trimmed, not empty, without control characters, at
/// most `max_chars` characters.
///
/// - Empty means nothing visible: text made only of whitespace and
///   [invisible](is_invisible) characters (`"\u{200B}"`, `"\u{00AD} \u{2060}"`)
///   is refused as empty.
/// - Control characters (C0, DEL, C1: `char::is_control`) are refused
///   anywhere inside the text, except the whitespace ones: tab, line feed and
///   carriage return. The original app stored any text, and an API client's
///   multi-line comment is text, not an attack; a NUL, a BEL or a terminal
///   escape is neither readable nor harmless to every log and subscriber
///   that shows it. At either end, whitespace is trimmed.
pub fn required(field: &str, value: &str, max_chars: usize) -> Result<String, TextError> {
    let value = value.trim();
    if value.chars().all(|c| c.is_whitespace() || is_invisible(c)) {
        return Err(TextError::Empty { field: field.to_owned() });
    }
    if value.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        return Err(TextError::ControlCharacter { field: field.to_owned() });
    }
    if value.chars().count() > max_chars {
        return Err(TextError::TooLong { field: field.to_owned(), max_chars });
    }
    Ok(value.to_owned())
}

/// A character that shows nothing by itself: a Default_Ignorable_Code_Point
/// (zero-width space and joiners, soft hyphen, bidi controls, variation
/// selectors, Hangul fillers, tags) or any other format character (General
/// Category Cf). Whitespace and control characters are not in this set.
///
/// Moderation drops the same characters before it compares text with its
/// blocked words, so what counts as invisible is decided once, here.
pub fn is_invisible(c: char) -> bool {
    CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
        || CodePointMapData::<GeneralCategory>::new().get(c) == GeneralCategory::Format
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

    #[test]
    fn text_of_only_whitespace_and_invisible_characters_is_empty() {
        let empty = Err(TextError::Empty { field: "title".into() });
        for invisible in [
            "\u{200B}",                   // zero-width space
            " \u{200B}\u{200C}\u{200D} ", // and the joiners, between spaces
            "\u{00AD}",                   // soft hyphen
            "\u{2060}\u{FEFF}",           // word joiner, byte order mark
            "\u{202E}\u{2066}",           // bidi override and isolate
            "\u{3164}",                   // Hangul filler (a letter, but default-ignorable)
            "\u{FE0F}",                   // variation selector
            "\u{E0041}",                  // tag letter
            "\u{00A0}\u{3000}",           // no-break and ideographic spaces
        ] {
            assert_eq!(required("title", invisible, 200), empty, "{invisible:?}");
        }
        // Invisible characters next to visible text are kept as sent.
        assert_eq!(required("title", "a\u{200D}b", 200).unwrap(), "a\u{200D}b");
        assert_eq!(required("title", "👩\u{200D}💻", 200).unwrap(), "👩\u{200D}💻");
    }

    #[test]
    fn control_characters_are_refused_inside_the_text() {
        let refused = Err(TextError::ControlCharacter { field: "content".into() });
        for text in ["a\u{0}b", "\u{0}", "bell\u{7}", "a\u{1B}[31mred", "a\u{7F}", "a\u{85}b", "a\u{9B}b", "a\u{B}b", "a\u{C}b"] {
            assert_eq!(required("content", text, 200), refused, "{text:?}");
        }
        // Lines and tabs inside the text are kept, as the original kept them.
        for text in ["two\nlines", "a\tb", "a\r\nb"] {
            assert_eq!(required("content", text, 200).unwrap(), text);
        }
        // At either end, whitespace controls are trimmed, not refused.
        assert_eq!(required("content", "\thello\r\n", 200).unwrap(), "hello");
        assert_eq!(TextError::ControlCharacter { field: "title".into() }.to_string(), "`title` must not contain control characters");
    }
}
