//! moderation: decides on every comment and publishes `CommentModerated`.
//!
//! The rule is the original's, made configurable: a comment whose text
//! contains a blocked word (`BLOCKED_WORDS`, comma-separated, "orange" by
//! default) is rejected, compared case-insensitively. Each comment is decided
//! once: the decision is keyed by comment id, so even a `CommentCreated`
//! published twice under different event ids yields one decision.

use axum::Router;
use blog_common::{
    CommentStatus, DomainEvent, Event, Node, Service,
    config::{self, CommonConfig, ConfigError},
    events::CommentData,
    inbox::Handler,
    node::BoxError,
    outbox,
    server::Shutdown,
};
use rusqlite::Connection;
use tokio::net::TcpListener;

pub const MIGRATIONS: &[&str] = &["CREATE TABLE decision (comment_id TEXT PRIMARY KEY, status TEXT NOT NULL) WITHOUT ROWID;"];

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub rule: Rule,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self { common: CommonConfig::from_env(Service::Moderation)?, rule: Rule::new(&config::list("BLOCKED_WORDS", "orange")) })
    }
}

/// The moderation rule: reject text containing any blocked word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    blocked: Vec<String>,
}

impl Rule {
    pub fn new(words: &[String]) -> Self {
        Self { blocked: words.iter().map(|w| w.to_lowercase()).filter(|w| !w.is_empty()).collect() }
    }

    pub fn decide(&self, content: &str) -> CommentStatus {
        let text = content.to_lowercase();
        if self.blocked.iter().any(|word| text.contains(word.as_str())) { CommentStatus::Rejected } else { CommentStatus::Approved }
    }
}

pub async fn run(listener: TcpListener, config: Config, shutdown: Shutdown) -> Result<(), BoxError> {
    let node = Node::open(Service::Moderation, &config.common, MIGRATIONS).await?;
    let inbox = node.inbox(Moderator { rule: config.rule });
    node.run(listener, Router::new(), Some(inbox), shutdown).await
}

struct Moderator {
    rule: Rule,
}

impl Handler for Moderator {
    fn handles(&self, event: &DomainEvent) -> bool {
        matches!(event, DomainEvent::CommentCreated(_))
    }

    fn apply(&self, conn: &Connection, envelope: &Event, event: &DomainEvent) -> rusqlite::Result<()> {
        let DomainEvent::CommentCreated(comment) = event else { return Ok(()) };
        let status = self.rule.decide(&comment.content);
        let decided = conn
            .prepare_cached("INSERT OR IGNORE INTO decision (comment_id, status) VALUES (?1, ?2)")?
            .execute([&comment.id, status.as_str()])?;
        if decided == 1 {
            let moderated = CommentData { status, ..comment.clone() };
            outbox::stage(conn, &Event::caused_by(envelope, &DomainEvent::CommentModerated(moderated)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(words: &[&str]) -> Rule {
        Rule::new(&words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn orange_is_rejected_case_insensitively_by_default() {
        let rule = rule(&["orange"]);
        assert_eq!(rule.decide("I like apples"), CommentStatus::Approved);
        assert_eq!(rule.decide("an orange"), CommentStatus::Rejected);
        assert_eq!(rule.decide("ORANGES!"), CommentStatus::Rejected);
        assert_eq!(rule.decide("Orangé"), CommentStatus::Approved);
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
