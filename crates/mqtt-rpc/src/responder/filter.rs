//! MQTT topic filter matching (MQTT 5 section 4.7), for dispatching requests to handlers.
//!
//! A broker delivers a message once per matching subscription, carrying only the concrete
//! topic. Finding the handler by the topic string would miss every wildcard registration, so
//! each registration keeps its parsed filter and is matched level by level.

/// A parsed topic filter. `$share/<group>/` is stripped: it chooses who receives, not what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    /// The filter as subscribed, `$share/...` included.
    subscription: String,
    /// The filter's levels, without any `$share/<group>/` prefix.
    levels: Vec<String>,
}

/// Why a filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// The empty filter.
    #[error("topic filter must not be empty")]
    Empty,
    /// `#` not alone in the last level.
    #[error("'#' must be the last level of a topic filter, alone in its level")]
    MisplacedHash,
    /// `+` sharing its level with other text.
    #[error("'+' must stand alone in its level")]
    MisplacedPlus,
    /// `$share/` without a group and a filter.
    #[error("a shared subscription needs the form $share/<group>/<filter>")]
    BadShare,
    /// A NUL character.
    #[error("topic filter must not contain NUL")]
    Nul,
}

impl TopicFilter {
    /// Parses a filter (MQTT 5 section 4.7, plus `$share/<group>/<filter>`).
    pub fn parse(raw: &str) -> Result<Self, FilterError> {
        if raw.contains('\0') {
            return Err(FilterError::Nul);
        }
        let inner = match raw.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((group, filter))
                    if !group.is_empty() && !group.contains(['+', '#']) && !filter.is_empty() =>
                {
                    filter
                }
                _ => return Err(FilterError::BadShare),
            },
            None => raw,
        };
        if inner.is_empty() {
            return Err(FilterError::Empty);
        }
        let levels: Vec<String> = inner.split('/').map(str::to_owned).collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (level != "#" || i + 1 != levels.len()) {
                return Err(FilterError::MisplacedHash);
            }
            if level.contains('+') && level != "+" {
                return Err(FilterError::MisplacedPlus);
            }
        }
        Ok(Self {
            subscription: raw.to_owned(),
            levels,
        })
    }

    /// The filter's levels, without any `$share/<group>/` prefix.
    pub(crate) fn levels(&self) -> &[String] {
        &self.levels
    }

    /// The filter to subscribe to.
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// Matches a concrete topic; on a match, returns the topic levels the wildcards stood for
    /// (one per `+`, then the rest of the topic for a `#`, joined with `/`).
    pub fn matches(&self, topic: &str) -> Option<Vec<String>> {
        // Wildcards at the first level never match topics starting with '$' (section 4.7.2).
        if topic.starts_with('$') && matches!(self.levels[0].as_str(), "+" | "#") {
            return None;
        }
        let mut captured = Vec::new();
        let mut topic_levels = topic.split('/');
        for level in &self.levels {
            match level.as_str() {
                "#" => {
                    // "a/#" matches "a" too ('#' includes the parent level); then the
                    // capture is empty.
                    let rest: Vec<&str> = topic_levels.collect();
                    captured.push(rest.join("/"));
                    return Some(captured);
                }
                "+" => captured.push(topic_levels.next()?.to_owned()),
                exact => {
                    if topic_levels.next()? != exact {
                        return None;
                    }
                }
            }
        }
        topic_levels.next().is_none().then_some(captured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, topic: &str) -> Option<Vec<String>> {
        TopicFilter::parse(filter).unwrap().matches(topic)
    }

    #[test]
    fn exact_and_wildcard_matching() {
        assert_eq!(m("devices/d1/echo", "devices/d1/echo"), Some(vec![]));
        assert_eq!(m("devices/d1/echo", "devices/d2/echo"), None);
        assert_eq!(
            m("devices/+/echo", "devices/d7/echo"),
            Some(vec!["d7".into()])
        );
        assert_eq!(
            m("devices/+/+", "devices/d7/get_config"),
            Some(vec!["d7".into(), "get_config".into()])
        );
        assert_eq!(m("devices/+/echo", "devices/d7/echo/x"), None);
        assert_eq!(
            m("devices/#", "devices/d7/echo"),
            Some(vec!["d7/echo".into()])
        );
        assert_eq!(m("devices/#", "devices"), Some(vec!["".into()]));
        assert_eq!(m("#", "$SYS/x"), None);
        assert_eq!(m("+/x", "$SYS/x"), None);
        assert_eq!(
            m("$share/g/devices/+/echo", "devices/a/echo"),
            Some(vec!["a".into()])
        );
        assert_eq!(m("devices/+", "devices/"), Some(vec!["".into()]));
    }

    #[test]
    fn malformed_filters_are_refused() {
        assert_eq!(TopicFilter::parse("a/#/b"), Err(FilterError::MisplacedHash));
        assert_eq!(TopicFilter::parse("a/b#"), Err(FilterError::MisplacedHash));
        assert_eq!(TopicFilter::parse("a/b+"), Err(FilterError::MisplacedPlus));
        assert_eq!(TopicFilter::parse("$share/g"), Err(FilterError::BadShare));
        assert_eq!(TopicFilter::parse(""), Err(FilterError::Empty));
    }
}
