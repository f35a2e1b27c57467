//! The check that every stage type linked into a binary is registered whole:
//! under the same name with `typetag` (what `pipeline.toml` can name) and in
//! the catalogue (what `sink list` and `sink describe` show, and where
//! restart-only keys are found). [`#[stage]`](macro@crate::stage) cannot get
//! this wrong; two hand-written registrations can, and nothing else would
//! notice: the type runs, but under a name `describe` does not know, and a
//! restart-only key would change live.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, Visitor};

use crate::{ProcessorConfig, SinkConfig, SourceConfig, StageInfo, StageKind, registered_stages};

/// The stage types of this binary whose registrations disagree, each
/// explained in one sentence naming both names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationErrors(pub Vec<String>);

impl fmt::Display for RegistrationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stage types registered inconsistently in this binary (register each with \
             #[sink_api::stage(name = \"...\")], which registers both under one name):"
        )?;
        for problem in &self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RegistrationErrors {}

/// Checks that each stage type linked into this binary has one name: that the
/// `typetag` names of every kind are exactly the catalogue's names of that
/// kind, once each. The runtime runs it at startup and refuses to start on an
/// error.
///
/// ```standalone_crate
/// // Every type in this doc test is registered with #[sink_api::stage].
/// assert_eq!(sink_api::check_registrations(), Ok(()));
/// ```
pub fn check_registrations() -> Result<(), RegistrationErrors> {
    let mut typetag = Vec::new();
    collect_typetag::<dyn SourceConfig>(StageKind::Source, &mut typetag);
    collect_typetag::<dyn ProcessorConfig>(StageKind::Processor, &mut typetag);
    collect_typetag::<dyn SinkConfig>(StageKind::Sink, &mut typetag);
    let catalogue: Vec<&StageInfo> = registered_stages().collect();
    let problems = compare(&typetag, &catalogue);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RegistrationErrors(problems))
    }
}

/// One name that `typetag` knows.
#[derive(Debug)]
struct Tagged {
    kind: StageKind,
    name: &'static str,
    /// The name serde gives the config type (its struct name), when it
    /// could be found; `None` when two types share the name.
    type_name: Option<&'static str>,
    duplicate: bool,
}

fn compare(typetag: &[Tagged], catalogue: &[&StageInfo]) -> Vec<String> {
    let mut problems = Vec::new();
    let tagged: BTreeSet<(StageKind, &str)> = typetag.iter().map(|t| (t.kind, t.name)).collect();
    let mut listed: BTreeMap<(StageKind, &str), Vec<&StageInfo>> = BTreeMap::new();
    for info in catalogue {
        listed.entry((info.kind, info.name)).or_default().push(info);
    }
    for tag in typetag.iter().filter(|tag| tag.duplicate) {
        problems.push(format!(
            "more than one type is registered with typetag as {} `{}`",
            tag.kind, tag.name
        ));
    }
    for ((kind, name), infos) in &listed {
        if infos.len() > 1 {
            let crates: Vec<String> = infos
                .iter()
                .map(|info| {
                    format!(
                        "`{}` in crate {}",
                        (info.config_type)().name,
                        info.crate_name
                    )
                })
                .collect();
            problems.push(format!(
                "{kind} `{name}` is in the catalogue {} times: {}",
                infos.len(),
                crates.join(", ")
            ));
        }
    }
    let mut only_tagged: Vec<&Tagged> = typetag
        .iter()
        .filter(|tag| !listed.contains_key(&(tag.kind, tag.name)))
        .collect();
    for info in catalogue
        .iter()
        .filter(|info| !tagged.contains(&(info.kind, info.name)))
    {
        let config = (info.config_type)();
        // The same type under its typetag name: the two names disagree.
        let twin = only_tagged
            .iter()
            .position(|tag| tag.type_name == Some(config.short_name()));
        match twin.map(|at| only_tagged.remove(at)) {
            Some(tag) => problems.push(format!(
                "`{}` (crate {}) is registered as {} `{}` with #[typetag::serde] but as {} `{}` \
                 with register_stage!: pipeline.toml must say `{}` while `sink list` and \
                 `sink describe` show `{}`; give both the same name",
                config.name,
                info.crate_name,
                tag.kind,
                tag.name,
                info.kind,
                info.name,
                tag.name,
                info.name
            )),
            None => problems.push(format!(
                "register_stage! lists {} `{}` (`{}`, crate {}), but no \
                 #[typetag::serde(name = \"{}\")] impl {} for it is linked: pipeline.toml \
                 cannot use the name that `sink list` shows",
                info.kind,
                info.name,
                config.name,
                info.crate_name,
                info.name,
                trait_name(info.kind)
            )),
        }
    }
    for tag in only_tagged {
        let config = tag
            .type_name
            .map_or_else(String::new, |name| format!(" (`{name}`)"));
        problems.push(format!(
            "{} `{}`{config} is registered with #[typetag::serde] but has no catalogue \
             entry (register_stage!): `sink list` and `sink describe` do not show it, and \
             its restart-only keys would change live",
            tag.kind, tag.name
        ));
    }
    problems
}

fn trait_name(kind: StageKind) -> &'static str {
    match kind {
        StageKind::Source => "SourceConfig",
        StageKind::Processor => "ProcessorConfig",
        StageKind::Sink => "SinkConfig",
    }
}

/// Adds every name typetag knows for the trait object `T` of `kind`.
///
/// typetag keeps its names private; it tells them in the error for an unknown
/// one, which [`Probe`] catches as a list, not as text. For each name, a
/// second probe catches the name the config type gives serde.
fn collect_typetag<T: ?Sized>(kind: StageKind, out: &mut Vec<Tagged>)
where
    Box<T>: DeserializeOwned,
{
    const NO_TYPE: &str = "\0not a stage type";
    let names = match tag_as::<T>(NO_TYPE, &Cell::new(None)) {
        Err(Probe::Names(names)) => names,
        _ => Vec::new(),
    };
    for name in names {
        let type_name = Cell::new(None);
        let outcome = tag_as::<T>(name, &type_name);
        let duplicate =
            matches!(&outcome, Err(Probe::Other(message)) if message.contains("non-unique"));
        out.push(Tagged {
            kind,
            name,
            type_name: type_name.get(),
            duplicate,
        });
    }
}

/// Deserializes `{ name: <a value that only tells its type's name> }` as a
/// `Box<T>`; it fails, having told what it found.
fn tag_as<T: ?Sized>(name: &str, type_name: &Cell<Option<&'static str>>) -> Result<Box<T>, Probe>
where
    Box<T>: DeserializeOwned,
{
    let entry = std::iter::once((name, TypeNameProbe(type_name)));
    Box::<T>::deserialize(de::value::MapDeserializer::new(entry))
}

/// What a probe learnt, as a serde error.
#[derive(Debug)]
enum Probe {
    /// The names typetag knows, from its error for an unknown one.
    Names(Vec<&'static str>),
    /// Anything else.
    Other(String),
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Names(names) => write!(f, "names {names:?}"),
            Self::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Probe {}

impl de::Error for Probe {
    fn custom<M: fmt::Display>(message: M) -> Self {
        Self::Other(message.to_string())
    }

    fn unknown_variant(_: &str, expected: &'static [&'static str]) -> Self {
        Self::Names(expected.to_vec())
    }
}

/// A deserializer that notes the name a derived `Deserialize` passes for its
/// type, then fails.
struct TypeNameProbe<'a>(&'a Cell<Option<&'static str>>);

impl<'a> IntoDeserializer<'_, Probe> for TypeNameProbe<'a> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl TypeNameProbe<'_> {
    fn found<T>(&self, name: &'static str) -> Result<T, Probe> {
        self.0.set(Some(name));
        Err(Probe::Other("probed".into()))
    }
}

impl<'de> Deserializer<'de> for TypeNameProbe<'_> {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probe> {
        Err(Probe::Other("not a named type".into()))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Probe> {
        self.found(name)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        _: V,
    ) -> Result<V::Value, Probe> {
        self.found(name)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        _: V,
    ) -> Result<V::Value, Probe> {
        self.found(name)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        _: usize,
        _: V,
    ) -> Result<V::Value, Probe> {
        self.found(name)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Probe> {
        self.found(name)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit seq tuple map identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConfigType;

    #[derive(Debug)]
    struct FilterConfig;

    fn info(kind: StageKind, name: &'static str) -> StageInfo {
        StageInfo {
            kind,
            name,
            crate_name: "my-stages",
            schema: || schemars::json_schema!({}),
            config_type: ConfigType::of::<FilterConfig>,
        }
    }

    fn tag(kind: StageKind, name: &'static str, type_name: &'static str) -> Tagged {
        Tagged {
            kind,
            name,
            type_name: Some(type_name),
            duplicate: false,
        }
    }

    #[test]
    fn agreeing_names_pass() {
        let filter = info(StageKind::Processor, "filter");
        let tags = [tag(StageKind::Processor, "filter", "FilterConfig")];
        assert!(compare(&tags, &[&filter]).is_empty());
    }

    #[test]
    fn two_names_for_one_type_are_named_both() {
        let filter = info(StageKind::Processor, "filtr");
        let tags = [tag(StageKind::Processor, "filter", "FilterConfig")];
        let problems = compare(&tags, &[&filter]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("processor `filter` with #[typetag::serde]")
                && problems[0].contains("processor `filtr` with register_stage!"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_half_registered_type_is_refused() {
        let listed = info(StageKind::Sink, "orphan");
        let problems = compare(&[tag(StageKind::Sink, "tagged", "Other")], &[&listed]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("no #[typetag::serde(name = \"orphan\")] impl SinkConfig"));
        assert!(problems[1].contains("sink `tagged` (`Other`) is registered with #[typetag::serde] but has no catalogue entry"));
    }

    #[test]
    fn a_name_listed_twice_is_refused() {
        let (a, b) = (info(StageKind::Sink, "x"), info(StageKind::Sink, "x"));
        let problems = compare(&[tag(StageKind::Sink, "x", "FilterConfig")], &[&a, &b]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("in the catalogue 2 times"),
            "{problems:?}"
        );
    }

    #[test]
    fn typetag_names_and_types_are_found() {
        let mut found = Vec::new();
        collect_typetag::<dyn ProcessorConfig>(StageKind::Processor, &mut found);
        let deaf = found
            .iter()
            .find(|tag| tag.name == "testkit_deaf")
            .expect("the test kit's test processor");
        assert_eq!(deaf.type_name, Some("Deaf"));
        assert!(!deaf.duplicate);
    }
}
