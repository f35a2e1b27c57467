//! The catalogue of stage types linked into a binary, for `sink list`,
//! `sink describe` and for telling live keys from keys that need a restart.
//!
//! Each entry is generated from the config type's own JSON schema (derived with
//! `schemars`), so the documentation a user reads cannot drift from the code.

use std::any::{Any, TypeId};
use std::fmt;

use serde_json::Value;

/// Which section of `pipeline.toml` a stage type belongs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StageKind {
    /// `[sources.<id>]`: produces batches.
    Source,
    /// `[processors.<id>]`: transforms batches.
    Processor,
    /// `[sinks.<id>]`: writes batches out.
    Sink,
}

impl StageKind {
    /// The singular word: `source`, `processor` or `sink`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Processor => "processor",
            Self::Sink => "sink",
        }
    }

    /// The `pipeline.toml` section: `sources`, `processors` or `sinks`.
    pub fn section(self) -> &'static str {
        match self {
            Self::Source => "sources",
            Self::Processor => "processors",
            Self::Sink => "sinks",
        }
    }
}

/// Honours width and alignment, so that `sink list` can pad it into a column.
///
/// ```
/// use sink_api::StageKind;
/// assert_eq!(format!("{:<10}|", StageKind::Sink), "sink      |");
/// ```
impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One registered stage type. Create it with [`#[stage]`](macro@crate::stage)
/// (or the older [`register_stage!`](crate::register_stage)).
#[derive(Debug)]
pub struct StageInfo {
    /// Its section.
    pub kind: StageKind,
    /// Its `type` name, the same as in its `#[typetag::serde(name = ...)]`.
    pub name: &'static str,
    /// The crate that defines it.
    pub crate_name: &'static str,
    /// The JSON schema of its config type.
    pub schema: fn() -> schemars::Schema,
    /// Its config type, which the runtime checks against the type that
    /// `typetag` knows by the same name.
    pub config_type: fn() -> ConfigType,
}

/// Which Rust type a stage type's config is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigType {
    /// Its [`TypeId`].
    pub id: TypeId,
    /// Its path, as [`std::any::type_name`] gives it.
    pub name: &'static str,
}

impl ConfigType {
    /// The config type `C`.
    ///
    /// ```
    /// let t = sink_api::ConfigType::of::<u8>();
    /// assert_eq!(t.name, "u8");
    /// ```
    pub fn of<C: Any>() -> Self {
        Self {
            id: TypeId::of::<C>(),
            name: std::any::type_name::<C>(),
        }
    }

    /// Its name without the module path: `FilterConfig`.
    pub fn short_name(&self) -> &'static str {
        let path = self.name.split('<').next().unwrap_or(self.name);
        path.rsplit("::").next().unwrap_or(path)
    }
}

inventory::collect!(StageInfo);

/// Registers a stage type's description under its `type` name, next to its
/// `#[typetag::serde(name = ...)]` impl: the older, two-step registration.
/// [`#[stage(name = ...)]`](macro@crate::stage) does both steps under one name
/// and is the way to register a new type; this macro stays for crates that use
/// it, and the runtime refuses to start when the two names disagree.
///
/// The description is the config type's doc comment; each key's doc comment,
/// type and default come from its schema. Mark a key that cannot change while
/// running with `#[schemars(extend("x-restart" = true))]`: a reload that
/// changes it is then refused as a topology change.
/// An optional key whose value changes live but whose presence does not
/// (adding or removing it would rebuild the stage) is marked
/// `#[schemars(extend("x-restart" = "presence"))]`.
///
/// ```
/// #[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// /// Keeps readings whose value is at least `min`.
/// struct AtLeast {
///     /// Smallest value kept.
///     min: i64,
/// }
/// sink_api::register_stage!(processor "at_least" => AtLeast);
///
/// let info = sink_api::registered_stages().find(|s| s.name == "at_least").unwrap();
/// assert_eq!(info.description(), "Keeps readings whose value is at least `min`.");
/// assert_eq!(info.keys()[0].name, "min");
/// ```
#[macro_export]
macro_rules! register_stage {
    (source $name:literal => $config:ty) => {
        $crate::register_stage!(@ Source $name $config);
    };
    (processor $name:literal => $config:ty) => {
        $crate::register_stage!(@ Processor $name $config);
    };
    (sink $name:literal => $config:ty) => {
        $crate::register_stage!(@ Sink $name $config);
    };
    (@ $kind:ident $name:literal $config:ty) => {
        $crate::inventory::submit! {
            $crate::StageInfo {
                kind: $crate::StageKind::$kind,
                name: $name,
                crate_name: env!("CARGO_PKG_NAME"),
                schema: || $crate::schemars::schema_for!($config),
                config_type: $crate::ConfigType::of::<$config>,
            }
        }
    };
}

/// Every stage type linked into this binary, sorted by kind, then name.
pub fn registered_stages() -> impl Iterator<Item = &'static StageInfo> {
    let mut all: Vec<&'static StageInfo> = inventory::iter::<StageInfo>.into_iter().collect();
    all.sort_by_key(|info| (info.kind, info.name));
    all.into_iter()
}

/// One key of a stage's table, as the schema describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key as written in `pipeline.toml`.
    pub name: String,
    /// Its type in words: `integer`, `string`, `"value" | "batch"`, `table`...
    pub value_type: String,
    /// Its default as TOML, or `None` when the key is required.
    pub default: Option<String>,
    /// Whether a reload applies it without a restart.
    pub live: bool,
    /// Whether adding or removing it needs a restart even though a change of
    /// its value applies live (`x-restart = "presence"`; the grpc `tls` table).
    pub presence_needs_restart: bool,
    /// Its doc comment.
    pub doc: String,
}

impl KeyInfo {
    /// What a reload can do with the key, in words: `live`, `needs a restart`,
    /// or `live; adding or removing it needs a restart`.
    pub fn liveness(&self) -> &'static str {
        match (self.live, self.presence_needs_restart) {
            (false, _) => "needs a restart",
            (true, false) => "live",
            (true, true) => "live; adding or removing it needs a restart",
        }
    }
}

impl StageInfo {
    /// The first paragraph of the config type's doc comment.
    pub fn description(&self) -> String {
        let schema = (self.schema)();
        let text = schema
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("");
        text.split("\n\n").next().unwrap_or("").replace('\n', " ")
    }

    /// The keys of the stage's table, in declaration order.
    pub fn keys(&self) -> Vec<KeyInfo> {
        let schema = (self.schema)();
        let root = schema.as_value();
        let mut keys = Vec::new();
        collect_keys(root, root, "", true, &mut keys);
        keys
    }

    /// Keys that a reload cannot change while running.
    pub fn restart_keys(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|key| !key.live)
            .map(|key| key.name)
            .collect()
    }

    /// Keys whose value changes live but which a reload cannot add or remove.
    pub fn presence_restart_keys(&self) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|key| key.presence_needs_restart)
            .map(|key| key.name)
            .collect()
    }

    /// A ready-to-paste `pipeline.toml` table for this type, every key at its
    /// default and required keys left for the user to fill in.
    pub fn example_toml(&self, id: &str) -> String {
        let mut out = format!("[{}.{id}]\ntype = \"{}\"\n", self.kind.section(), self.name);
        if self.kind != StageKind::Source {
            out.push_str("inputs = [\"<upstream id>\"]\n");
        }
        for key in self.keys() {
            let line = match (key.default.as_deref(), key.value_type.as_str()) {
                // A nested key stays commented out: writing it would enable
                // its optional table.
                (default, kind) if key.name.contains('.') => {
                    let placeholder = format!("<{kind}>");
                    let shown = default.filter(|d| *d != "(none)").unwrap_or(&placeholder);
                    format!("# {} = {shown}", key.name)
                }
                // Required: a placeholder that parses, for the user to fill in.
                (None, "string" | "duration") => format!("{} = \"\"   # required", key.name),
                (None, "integer") => format!("{} = 0   # required", key.name),
                (None, kind) => format!("# {} = <{kind}>   (required)", key.name),
                (Some("(none)"), kind) => format!("# {} = <{kind}>", key.name),
                (Some(default), _) => format!("{} = {default}", key.name),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

/// Appends the keys of the object schema `object` to `keys`, each named after
/// `prefix`, and the keys of nested tables (`rate_limit.burst_bytes`) after
/// their table. A nested key is live when its table is.
fn collect_keys(object: &Value, root: &Value, prefix: &str, live: bool, keys: &mut Vec<KeyInfo>) {
    let required: Vec<&str> = object
        .get("required")
        .and_then(Value::as_array)
        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = object.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (name, property) in properties {
        let key = KeyInfo {
            name: format!("{prefix}{name}"),
            value_type: describe_type(property, root),
            default: property
                .get("default")
                .map(json_to_toml)
                .or_else(|| (!required.contains(&name.as_str())).then(|| "(none)".into())),
            live: live && property.get("x-restart") != Some(&Value::Bool(true)),
            presence_needs_restart: property.get("x-restart")
                == Some(&Value::String("presence".into())),
            doc: property
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("")
                .replace('\n', " "),
        };
        let nested_live = key.live;
        keys.push(key);
        if let Some(table) = table_schema(property, root) {
            collect_keys(table, root, &format!("{prefix}{name}."), nested_live, keys);
        }
    }
}

/// The object schema a property holds, through a `$ref` and an optional's
/// `anyOf`/`oneOf`, if it is a table with keys of its own.
fn table_schema<'a>(property: &'a Value, root: &'a Value) -> Option<&'a Value> {
    if let Some(reference) = property.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next()?;
        return table_schema(root.get("$defs")?.get(name)?, root);
    }
    if let Some(variants) = property.get("anyOf").or_else(|| property.get("oneOf")) {
        return variants
            .as_array()?
            .iter()
            .find_map(|v| table_schema(v, root));
    }
    property.get("properties").map(|_| property)
}

/// A short, human reading of a property's JSON schema type.
fn describe_type(property: &Value, root: &Value) -> String {
    if let Some(reference) = property.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        return match root.get("$defs").and_then(|defs| defs.get(name)) {
            Some(target) => describe_type(target, root),
            None => name.to_string(),
        };
    }
    match property.get("format").and_then(Value::as_str) {
        Some("duration") => return "duration".into(),
        Some("size") => return "size".into(),
        _ => {}
    }
    if let Some(constant) = property.get("const") {
        return constant.to_string();
    }
    if let Some(options) = property.get("enum").and_then(Value::as_array) {
        return options
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" | ");
    }
    if let Some(variants) = property.get("oneOf").or_else(|| property.get("anyOf")) {
        let parts: Vec<String> = variants
            .as_array()
            .into_iter()
            .flatten()
            .map(|variant| describe_type(variant, root))
            .filter(|part| part != "null")
            .collect();
        return parts.join(" | ");
    }
    match property.get("type") {
        Some(Value::String(kind)) if kind == "object" => "table".into(),
        Some(Value::String(kind)) if kind == "array" => "array".into(),
        Some(Value::String(kind)) => kind.clone(),
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .filter(|kind| *kind != "null")
            .collect::<Vec<_>>()
            .join(" | "),
        _ => "any".into(),
    }
}

/// Renders a JSON default as the TOML a user would write.
fn json_to_toml(value: &Value) -> String {
    match value {
        Value::Null => "(none)".into(),
        Value::Object(map) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k} = {}", json_to_toml(v)))
                .collect();
            format!("{{ {} }}", fields.join(", "))
        }
        Value::Array(items) => {
            format!(
                "[{}]",
                items
                    .iter()
                    .map(json_to_toml)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        other => other.to_string(),
    }
}
