//! moderation: decides on every comment and publishes `CommentModerated`.
//!
//! The rule is the original's, made configurable and hard to dodge: a comment
//! whose text contains a blocked word (`BLOCKED_WORDS`, comma-separated,
//! "orange" by default) is rejected. Both are compared in a folded form (see
//! `fold`), so text that reads as a blocked word is caught however it is
//! spelled in Unicode. Each comment is decided once: the decision is keyed by
//! comment id, so even a `CommentCreated` published twice under different
//! event ids yields one decision.

use axum::Router;
use blog_domain::{
    CommentData, CommentStatus, DomainEvent, Event, EventKind, Service,
    config::{self, ConfigError},
    text,
};
use blog_kit::{BoxError, Consumer, Outcome, ServiceKit, Shutdown, StoreError, Tx, config::CommonConfig, store::Migration};
use tokio::net::TcpListener;
use unicode_normalization::{UnicodeNormalization, char::is_combining_mark};

pub const MIGRATIONS: &[Migration] = &[Migration::per_engine(
    "CREATE TABLE decision (comment_id TEXT PRIMARY KEY, status TEXT NOT NULL) WITHOUT ROWID;",
    "CREATE TABLE decision (comment_id TEXT PRIMARY KEY, status TEXT NOT NULL);",
)];

/// The blocked word when `BLOCKED_WORDS` is not set: the original's.
pub const DEFAULT_BLOCKED_WORD: &str = "orange";

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub rule: Rule,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(Service::Moderation)?,
            rule: Rule::new(&config::list("BLOCKED_WORDS", DEFAULT_BLOCKED_WORD)),
        })
    }
}

/// The moderation rule: reject text whose folded form contains the folded
/// form of any blocked word. Only the decision uses the folded form; the
/// comment is stored and published exactly as the user sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The blocked words, folded once here instead of on every comment. A
    /// word that folds to nothing or to spaces would block everything, so it
    /// is dropped.
    blocked: Vec<String>,
}

impl Default for Rule {
    /// The rule when `BLOCKED_WORDS` is not set.
    fn default() -> Self {
        Self::new(&[DEFAULT_BLOCKED_WORD.to_owned()])
    }
}

impl Rule {
    pub fn new(words: &[String]) -> Self {
        Self { blocked: words.iter().map(|w| fold(w)).filter(|w| !w.chars().all(char::is_whitespace)).collect() }
    }

    pub fn decide(&self, content: &str) -> CommentStatus {
        if self.blocked.is_empty() {
            return CommentStatus::Approved;
        }
        let shown = [Some(fold(content)), displayed(content).map(|text| fold(&text))];
        let blocked = shown.iter().flatten().any(|text| self.blocked.iter().any(|word| text.contains(word.as_str())));
        if blocked { CommentStatus::Rejected } else { CommentStatus::Approved }
    }
}

/// The text in the order a screen shows it, when bidirectional formatting
/// characters may make that differ from the order it is stored in: under a
/// right-to-left override (U+202E) letters are shown last to first, so
/// `"\u{202E}egnaro"` reads "orange" (the Unicode Bidirectional Algorithm,
/// UAX #9, paragraph by paragraph). Without such a character Latin letters
/// are always shown in their stored order, so plain text is not reordered.
fn displayed(text: &str) -> Option<String> {
    let formatting = |c: char| matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(formatting) {
        return None;
    }
    let bidi = unicode_bidi::BidiInfo::new(text, None);
    Some(bidi.paragraphs.iter().map(|paragraph| bidi.reorder_line(paragraph, paragraph.range.clone())).collect())
}

/// Text as it reads, not as it is encoded, so that what looks like a blocked
/// word compares equal to it:
///
/// 1. Compatibility decomposition (NFKD): fullwidth `ｏ`, ligatures and
///    styled letters become plain ones, and accents come apart from their
///    letters (`é` becomes `e` and U+0301, like a typed `e\u{301}`).
/// 2. Dropped: combining marks (so `o\u{301}range` reads `orange`, and so
///    does `orangé`, which is canonically the same text as `orange\u{301}`),
///    invisible characters ([`text::is_invisible`]: soft hyphen, zero-width
///    space and joiners, other format characters) and control characters
///    other than whitespace (NUL).
/// 3. Latin small capitals (`ᴏʀᴀɴɢᴇ`, and the modifier letters that NFKD
///    turns into them) become their letters ([`small_capital`]), and the
///    text is lowercased, before the skeleton, which maps some capitals to
///    other letters (`I` to `l`, so `KIWI` would not read `kiwi`).
/// 4. The UTS #39 confusable skeleton: each character becomes its
///    prototype, so Cyrillic `о`, `а`, `е` and script `ɡ` read as Latin `o`,
///    `a`, `e`, `g`. Some prototypes are capitals or sequences (`0` reads
///    `O`, `m` reads `rn`), so the result is lowercased and stripped of marks
///    again.
///
/// Whitespace stays: `or ange` is two words and is approved. Joining the
/// words would reject innocent text across a word boundary ("a color angel"
/// reads "colorangel"), and spaces are visible, so this is not hiding.
fn fold(text: &str) -> String {
    let lowered = text.nfkd().filter(|&c| !unseen(c)).map(small_capital).collect::<String>().to_lowercase();
    let skeleton: String = unicode_security::skeleton(&lowered).collect();
    skeleton.to_lowercase().chars().filter(|&c| !unseen(c)).collect()
}

/// The letter a Latin small capital stands for. UTS #39 keeps most of them
/// apart from their letters (only `ᴄ`, `ᴏ`, `ꜱ`, `ᴜ`, `ᴠ`, `ᴡ`, `ʏ`, `ᴢ`, drawn
/// like their lowercase letters, have those as prototypes), yet in running
/// text `ʀ` reads as `r`. These are the "LATIN LETTER SMALL CAPITAL" letters
/// of the basic alphabet (there is none for x); the ligatures and turned or
/// barred ones are left as they are. IPA transcriptions use a few of them
/// (`ɪ`, `ʀ`, `ʏ`) and fold to plain letters too, which only matters when
/// that spells a blocked word.
fn small_capital(c: char) -> char {
    match c {
        '\u{1D00}' => 'a',
        '\u{0299}' => 'b',
        '\u{1D04}' => 'c',
        '\u{1D05}' => 'd',
        '\u{1D07}' => 'e',
        '\u{A730}' => 'f',
        '\u{0262}' => 'g',
        '\u{029C}' => 'h',
        '\u{026A}' => 'i',
        '\u{1D0A}' => 'j',
        '\u{1D0B}' => 'k',
        '\u{029F}' => 'l',
        '\u{1D0D}' => 'm',
        '\u{0274}' => 'n',
        '\u{1D0F}' => 'o',
        '\u{1D18}' => 'p',
        '\u{A7AF}' => 'q',
        '\u{0280}' => 'r',
        '\u{A731}' => 's',
        '\u{1D1B}' => 't',
        '\u{1D1C}' => 'u',
        '\u{1D20}' => 'v',
        '\u{1D21}' => 'w',
        '\u{028F}' => 'y',
        '\u{1D22}' => 'z',
        other => other,
    }
}

/// What the fold drops: combining marks, invisible characters, and control
/// characters that are not whitespace.
fn unseen(c: char) -> bool {
    is_combining_mark(c) || text::is_invisible(c) || (c.is_control() && !c.is_whitespace())
}

/// How this service's kit is opened.
pub fn kit() -> ServiceKit {
    ServiceKit::new(Service::Moderation).migrations(MIGRATIONS)
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let kit = kit().open(&config.common, &shutdown).await?;
    kit.serve(Router::new()).consumer(Moderator { rule: config.rule }).run(listener, shutdown).await
}

/// Decides on each `CommentCreated` and publishes the decision.
#[derive(Debug)]
pub struct Moderator {
    pub rule: Rule,
}

impl Consumer for Moderator {
    fn consumes(&self) -> &'static [EventKind] {
        &[EventKind::CommentCreated]
    }

    fn apply(&self, tx: &mut Tx<'_>, envelope: &Event, event: &DomainEvent) -> Result<Outcome, StoreError> {
        let DomainEvent::CommentCreated(comment) = event else { return Ok(Outcome::Ignored) };
        let status = self.rule.decide(&comment.content);
        let decided = tx.execute(
            "INSERT INTO decision (comment_id, status) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&comment.id, &status.as_str()],
        )?;
        if decided == 1 {
            let moderated = CommentData { status, ..comment.clone() };
            tx.publish(&Event::caused_by(envelope, &DomainEvent::CommentModerated(moderated)))?;
        }
        Ok(Outcome::Handled)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::{body::Body, http::Request};
    use blog_domain::EventKind;
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;

    const WITHIN: Duration = Duration::from_secs(10);

    async fn post_events(app: &Router, bearer: &str, body: Value) -> (axum::http::StatusCode, Value) {
        let request = Request::post("/events")
            .header("content-type", "application/json")
            .header("authorization", bearer)
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn created(event_id: &str, comment_id: &str, content: &str) -> Value {
        json!({"id": event_id, "type": "CommentCreated", "data": {"id": comment_id, "content": content, "postId": "p1", "status": "pending"}})
    }

    #[tokio::test]
    async fn each_comment_is_decided_once_and_the_decision_published_once() {
        let test = kit().for_test().await.unwrap();
        let app = test.app(test.kit.serve(Router::new()).consumer(Moderator { rule: rule(&["orange"]) }));
        let bearer = test.bearer();
        let (status, report) = post_events(&app, &bearer, created("e1", "c1", "an Orange")).await;
        assert_eq!((status, report["applied"].as_u64()), (axum::http::StatusCode::OK, Some(1)), "{report}");
        // The same event again, and the same comment under another event id.
        let (_, again) = post_events(&app, &bearer, json!([created("e1", "c1", "an Orange"), created("e2", "c1", "an Orange")])).await;
        assert_eq!((again["applied"].as_u64(), again["duplicates"].as_u64()), (Some(1), Some(1)), "{again}");
        post_events(&app, &bearer, created("e3", "c2", "apples")).await;
        // Not moderation's business: acknowledged, ignored.
        let (_, ignored) = post_events(&app, &bearer, json!({"id": "e4", "type": "PostCreated", "data": {"id": "p9", "title": "t"}})).await;
        assert_eq!(ignored["ignored"].as_u64(), Some(1), "{ignored}");

        let events = test.bus.wait_for(2, WITHIN).await.unwrap();
        let decisions: Vec<(String, String)> = events
            .iter()
            .map(|e| {
                assert_eq!(e.kind, EventKind::CommentModerated);
                (e.data["id"].as_str().unwrap().to_owned(), e.data["status"].as_str().unwrap().to_owned())
            })
            .collect();
        assert_eq!(decisions, [("c1".to_owned(), "rejected".to_owned()), ("c2".to_owned(), "approved".to_owned())]);
        let stored: i64 = test.kit.read(|tx| tx.query_row("SELECT count(*) FROM decision", &[], |r| r.get(0))).await.unwrap();
        assert_eq!(stored, 2);
    }

    #[tokio::test]
    async fn a_decision_on_a_disguised_word_publishes_the_text_as_sent() {
        let test = kit().for_test().await.unwrap();
        let app = test.app(test.kit.serve(Router::new()).consumer(Moderator { rule: rule(&["orange"]) }));
        let disguised = "an ｏｒ\u{430}\u{AD}nge";
        post_events(&app, &test.bearer(), created("e1", "c1", disguised)).await;
        let events = test.bus.wait_for(1, WITHIN).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].data["status"].as_str(), events[0].data["content"].as_str()), (Some("rejected"), Some(disguised)));
    }

    #[tokio::test]
    async fn malformed_events_are_refused_as_such_and_strangers_are_turned_away() {
        let test = kit().for_test().await.unwrap();
        let app = test.app(test.kit.serve(Router::new()).consumer(Moderator { rule: rule(&["orange"]) }));
        let bad = json!({"id": "e1", "type": "CommentCreated", "data": {"id": "c1"}});
        let request = |auth: &str| {
            Request::post("/events")
                .header("content-type", "application/json")
                .header("authorization", auth)
                .body(Body::from(bad.to_string()))
                .unwrap()
        };
        let refused = app.clone().oneshot(request(&test.bearer())).await.unwrap();
        assert_eq!(refused.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(refused.headers().contains_key(&blog_kit::internal::REFUSAL_HEADER), "marked as a refusal of the event");
        assert_eq!(
            app.clone().oneshot(request("Bearer not-the-secret-0123456")).await.unwrap().status(),
            axum::http::StatusCode::FORBIDDEN
        );
        assert!(test.bus.events().is_empty());
    }

    fn rule(words: &[&str]) -> Rule {
        Rule::new(&words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn orange_is_rejected_case_insensitively_by_default() {
        let rule = rule(&["orange"]);
        assert_eq!(rule.decide("I like apples"), CommentStatus::Approved);
        assert_eq!(rule.decide("an orange"), CommentStatus::Rejected);
        assert_eq!(rule.decide("ORANGES!"), CommentStatus::Rejected);
        // Accents are dropped: `é` is `e` + U+0301, which must not be a way around the rule.
        assert_eq!(rule.decide("Orangé"), CommentStatus::Rejected);
    }

    /// Each spelling reads as "orange" and was approved by the plain
    /// lowercase comparison.
    const BYPASSES: &[(&str, &str)] = &[
        ("soft hyphen", "ora\u{AD}nge"),
        ("zero-width space", "ora\u{200B}nge"),
        ("zero-width joiner and word joiner", "o\u{200D}ran\u{2060}ge"),
        ("byte order mark", "\u{FEFF}orange"),
        ("bidi override", "o\u{202E}range"),
        ("written backwards under a right-to-left override", "\u{202E}egnaro"),
        ("backwards inside a sentence, the override popped", "I ate an \u{202E}egnaro\u{202C} today"),
        ("backwards in an isolate", "see \u{2067}\u{202E}egnaro\u{202C}\u{2069}!"),
        ("variation selector", "ora\u{FE0F}nge"),
        ("NUL", "o\u{0}range"),
        ("BEL and ESC", "or\u{7}an\u{1B}ge"),
        ("fullwidth", "ｏｒａｎｇｅ"),
        ("fullwidth capitals", "ＯＲＡＮＧＥ"),
        ("Cyrillic o", "\u{43E}range"),
        ("Cyrillic a", "or\u{430}nge"),
        ("Cyrillic e", "orang\u{435}"),
        ("Cyrillic capitals", "\u{41E}R\u{410}NG\u{415}"),
        ("small capitals", "ᴏʀᴀɴɢᴇ"),
        ("modifier small capital n", "ora\u{1DB0}ge"),
        ("script g (U+0261)", "oran\u{261}e"),
        ("combining acute", "o\u{301}range"),
        ("precomposed accents", "òrängé"),
        ("mathematical bold", "𝐨𝐫𝐚𝐧𝐠𝐞"),
        ("circled letters", "ⓞⓡⓐⓝⓖⓔ"),
        ("digit zero for o", "0range"),
        ("inside a sentence", "I ate an \u{43E}r\u{430}ng\u{435} today"),
        ("everything at once", "Ｏ\u{AD}ʀ\u{430}\u{200B}n\u{301}\u{261}\u{0}е"),
    ];

    /// Near misses: text that does not read as "orange" stays approved.
    const NEAR_MISSES: &[(&str, &str)] = &[
        ("a prefix", "orang"),
        ("another word", "arrange"),
        ("a space inside", "or ange"),
        ("a line break inside", "or\nange"),
        ("across a word boundary", "a color angel"),
        ("another animal", "Orangutan"),
        ("shared letters", "an orchard"),
        ("a missing letter", "ornge"),
        ("backwards, shown backwards", "egnaro"),
        ("backwards under a left-to-right override", "\u{202D}egnaro\u{202C}"),
        ("right to left around Latin, which stays in order", "\u{202B}egnaro\u{202C} \u{2067}egnaro\u{2069}"),
        ("Russian for orange", "апельсин"),
        ("Greek", "πορτοκάλι"),
        ("Chinese", "橙子"),
        ("Arabic", "برتقال"),
        ("Hindi, with its vowel signs", "संतरा"),
        ("emoji", "🍊"),
        ("emoji with a joiner and a selector", "👩\u{200D}💻 ❤\u{FE0F}"),
        ("plain text", "I like apples"),
        ("an empty comment", ""),
    ];

    #[test]
    fn every_known_bypass_of_the_blocked_word_is_rejected() {
        let rule = rule(&["orange"]);
        for (what, text) in BYPASSES {
            assert_eq!(rule.decide(text), CommentStatus::Rejected, "{what}: {text:?} folds to {:?}", fold(text));
        }
    }

    #[test]
    fn near_misses_stay_approved() {
        let rule = rule(&["orange"]);
        for (what, text) in NEAR_MISSES {
            assert_eq!(rule.decide(text), CommentStatus::Approved, "{what}: {text:?} folds to {:?}", fold(text));
        }
    }

    #[test]
    fn configured_words_are_folded_like_the_text() {
        // A word configured in a lookalike spelling blocks the plain one, and the other way round.
        let cyrillic = rule(&["\u{43E}r\u{430}nge"]);
        assert_eq!(cyrillic.decide("orange"), CommentStatus::Rejected);
        assert_eq!(rule(&["Ｋｉｗｉ"]).decide("a kiwi"), CommentStatus::Rejected);
        assert_eq!(rule(&["kiwi"]).decide("KIWI"), CommentStatus::Rejected, "I must not read as l");
        assert_eq!(rule(&["café"]).decide("cafe"), CommentStatus::Rejected);
        // Words that fold to nothing visible would block every comment.
        assert_eq!(rule(&["\u{200B}", "\u{301}", "\u{A0}"]).decide("anything at all"), CommentStatus::Approved);
        // What is stored and published is not the folded form.
        assert_eq!(fold("ＯＲＡＮＧＥ"), "orange");
    }

    #[test]
    fn blocked_words_are_configurable() {
        let fruit = rule(&["Kiwi", "", "PLUM"]);
        assert_eq!(fruit.decide("kiwi"), CommentStatus::Rejected);
        assert_eq!(fruit.decide("a plum"), CommentStatus::Rejected);
        assert_eq!(fruit.decide("orange"), CommentStatus::Approved);
        assert_eq!(rule(&[]).decide("anything"), CommentStatus::Approved);
    }
}
