//! `topic_pattern`: which levels of a topic name the sensor and which are
//! labels, so that `sensors/north/boiler-1` becomes the reading `boiler-1`
//! labelled `site=north`.

use sink_api::Labels;

/// The field of a pattern that becomes the reading's name.
const NAME_FIELD: &str = "sensor_name";

/// One level of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    /// Must be exactly this text.
    Literal(String),
    /// `{sensor_name}`: the reading's name.
    Name,
    /// `{key}`: the label `key`.
    Label(String),
}

/// A parsed `topic_pattern` such as `sensors/{site}/{sensor_name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    levels: Vec<Level>,
}

/// What a topic says about its readings: their name (when the pattern names
/// one) and labels.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TopicFields<'a> {
    /// The level matched by `{sensor_name}`, or the whole topic without a pattern.
    pub sensor_name: Option<&'a str>,
    /// The other `{key}` levels.
    pub labels: Labels,
}

impl TopicPattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let mut levels = Vec::new();
        for level in pattern.split('/') {
            if level.contains(['+', '#']) {
                return Err(format!(
                    "`{level}`: a pattern names levels with `{{key}}`; MQTT wildcards belong in `topics`"
                ));
            }
            let field = level
                .strip_prefix('{')
                .and_then(|rest| rest.strip_suffix('}'));
            let parsed = match field {
                Some(name) if name.is_empty() || name.contains(['{', '}']) => {
                    return Err(format!("`{level}` is not a `{{key}}` level"));
                }
                Some(NAME_FIELD) => Level::Name,
                Some(key) => Level::Label(key.to_owned()),
                None if level.contains(['{', '}']) => {
                    return Err(format!(
                        "`{level}`: a `{{key}}` must be a whole level, between slashes"
                    ));
                }
                None => Level::Literal(level.to_owned()),
            };
            if !matches!(parsed, Level::Literal(_)) && levels.contains(&parsed) {
                return Err(format!("`{level}` appears twice"));
            }
            levels.push(parsed);
        }
        Ok(Self { levels })
    }

    /// The name and labels of `topic`, or `None` when it does not fit the
    /// pattern (another number of levels, a literal level that differs, or an
    /// empty level where a name or label is expected).
    pub fn fields<'a>(&self, topic: &'a str) -> Option<TopicFields<'a>> {
        let mut fields = TopicFields::default();
        let mut parts = topic.split('/');
        let mut pairs = Vec::new();
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(text) if text == part => {}
                Level::Literal(_) => return None,
                _ if part.is_empty() => return None,
                Level::Name => fields.sensor_name = Some(part),
                Level::Label(key) => pairs.push((key.clone(), part.to_owned())),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        fields.labels = Labels::from_pairs(pairs);
        Some(fields)
    }
}

/// The fields of `topic` under `pattern`, or the whole topic as the name
/// without one; `None` when the topic does not fit.
pub fn topic_fields<'a>(pattern: Option<&TopicPattern>, topic: &'a str) -> Option<TopicFields<'a>> {
    match pattern {
        Some(pattern) => pattern.fields(topic),
        None => Some(TopicFields {
            sensor_name: Some(topic),
            labels: Labels::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_come_from_their_levels() {
        let pattern = TopicPattern::parse("sensors/{site}/{sensor_name}").unwrap();
        let fields = pattern.fields("sensors/north/boiler-1").unwrap();
        assert_eq!(fields.sensor_name, Some("boiler-1"));
        assert_eq!(fields.labels, Labels::from_iter([("site", "north")]));
    }

    #[test]
    fn a_topic_that_does_not_fit_is_refused() {
        let pattern = TopicPattern::parse("sensors/{site}/{sensor_name}").unwrap();
        for topic in [
            "sensors/north",
            "sensors/north/boiler-1/extra",
            "actuators/north/boiler-1",
            "sensors//boiler-1",
            "sensors/north/",
        ] {
            assert_eq!(pattern.fields(topic), None, "{topic}");
        }
    }

    #[test]
    fn a_pattern_without_a_name_labels_only() {
        let pattern = TopicPattern::parse("{building}/{floor}").unwrap();
        let fields = pattern.fields("b1/f3").unwrap();
        assert_eq!(fields.sensor_name, None);
        assert_eq!(fields.labels.len(), 2);
    }

    #[test]
    fn bad_patterns_say_why() {
        for (pattern, needle) in [
            ("sensors/+/{sensor_name}", "wildcards"),
            ("sensors/#", "wildcards"),
            ("sensors/x{site}", "whole level"),
            ("sensors/{}", "not a `{key}`"),
            ("{site}/{site}", "twice"),
            ("{sensor_name}/{sensor_name}", "twice"),
        ] {
            let err = TopicPattern::parse(pattern).unwrap_err();
            assert!(err.contains(needle), "{pattern}: {err}");
        }
        assert!(TopicPattern::parse("a/a/{sensor_name}").is_ok());
    }

    #[test]
    fn without_a_pattern_the_topic_is_the_name() {
        let fields = topic_fields(None, "sensors/north/boiler-1").unwrap();
        assert_eq!(fields.sensor_name, Some("sensors/north/boiler-1"));
        assert!(fields.labels.is_empty());
    }
}
