//! The recipe: kiln's public interface, parsed from TOML and validated.
//!
//! Every error names the file, line, column and the dotted field path
//! (`service[0].image`), whether it comes from TOML syntax, the schema
//! (unknown keys, wrong types) or validation (impossible combinations).

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A recipe problem, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}:{column}: {field}: {message}", file.display())]
pub struct RecipeError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending field, e.g. `kernel.debian`; `(recipe)`
    /// when the problem is the document as a whole.
    pub field: String,
    pub message: String,
}

/// Errors from reading a recipe.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] Box<RecipeError>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: Spanned<String>,
    pub version: Spanned<String>,
    pub kernel: Kernel,
    #[serde(default)]
    pub onboot: Vec<ContainerSpec>,
    #[serde(default, rename = "service")]
    pub services: Vec<ContainerSpec>,
    #[serde(default, rename = "file")]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub host: Host,
    #[serde(default)]
    pub disk: Disk,
    #[serde(default)]
    pub output: Output,
}

/// Default Debian suite: the current stable.
pub const DEFAULT_SUITE: &str = "trixie";
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub debian: Option<Spanned<String>>,
    pub suite: Option<Spanned<String>>,
    pub mirror: Option<Spanned<String>>,
    pub image: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub modules: Option<Spanned<String>>,
    pub cmdline: Option<Spanned<String>>,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A registry reference, `oci-layout:DIR[:TAG]` or `docker-archive:FILE`.
    Ref(String),
    /// An image assembled from Debian packages (and their dependencies).
    Debian {
        packages: Vec<String>,
        suite: Option<String>,
    },
}

impl<'de> Deserialize<'de> for ImageSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an image reference string or { debian = [PACKAGES] }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ImageSource, E> {
                Ok(ImageSource::Ref(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ImageSource, A::Error> {
                let mut packages: Option<Vec<String>> = None;
                let mut suite = None;
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "debian" => packages = Some(map.next_value()?),
                        "suite" => suite = Some(map.next_value()?),
                        other => return Err(de::Error::unknown_field(other, &["debian", "suite"])),
                    }
                }
                let packages = packages.ok_or_else(|| de::Error::missing_field("debian"))?;
                Ok(ImageSource::Debian { packages, suite })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: Spanned<String>,
    pub image: Spanned<ImageSource>,
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub net: Option<Spanned<String>>,
    #[serde(default)]
    pub binds: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: Spanned<String>,
    pub contents: Option<String>,
    pub source: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub hostname: Option<Spanned<String>>,
    pub when_done: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub size: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub formats: Option<Spanned<Vec<String>>>,
}

/// A bind mount as written in a recipe: `SRC:DST[:ro|rw]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindSpec {
    pub source: String,
    pub target: String,
    pub readonly: bool,
}

/// A recipe that passed validation, with defaults applied, plus where it
/// came from (relative `source` paths resolve against its directory).
#[derive(Debug, Clone)]
pub struct Validated {
    pub path: PathBuf,
    pub recipe: Recipe,
    /// Disk size in bytes.
    pub disk_size: u64,
    pub formats: Vec<String>,
}

impl Validated {
    pub fn name(&self) -> &str {
        self.recipe.name.get_ref()
    }
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
    pub fn hostname(&self) -> String {
        self.recipe
            .host
            .hostname
            .as_ref()
            .map(|h| h.get_ref().clone())
            .unwrap_or_else(|| self.name().to_string())
    }
    pub fn poweroff_when_done(&self) -> bool {
        self.recipe
            .host
            .when_done
            .as_ref()
            .map(|w| w.get_ref().as_str())
            == Some("poweroff")
    }
    pub fn cmdline(&self) -> String {
        self.recipe
            .kernel
            .cmdline
            .as_ref()
            .map(|c| c.get_ref().clone())
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string())
    }
    /// Onboot containers then services, in recipe order.
    pub fn containers(&self) -> impl Iterator<Item = &ContainerSpec> {
        self.recipe.onboot.iter().chain(self.recipe.services.iter())
    }
}

pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
pub const DEFAULT_DISK_SIZE: &str = "1G";
/// Output formats this version writes.
pub const SUPPORTED_FORMATS: &[&str] = &["raw"];

/// Reads, parses and validates the recipe at `path`.
pub fn load(path: &Path) -> Result<Validated, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse(path, &text)?)
}

/// Parses and validates recipe `text`; `path` is used in errors and to
/// resolve relative paths.
pub fn parse(path: &Path, text: &str) -> Result<Validated, Box<RecipeError>> {
    let locate = Locator { path, text };
    let recipe: Recipe = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        locate.error(span, e.message().trim_end())
    })?;
    validate(&locate, recipe)
}

/// Turns byte spans into file:line:column and field paths.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> Box<RecipeError> {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
        let field = field_at(self.text, &span).unwrap_or_else(|| "(recipe)".to_string());
        Box::new(RecipeError {
            file: self.path.to_path_buf(),
            line,
            column,
            field,
            message: message.into(),
        })
    }

    fn at<T>(&self, s: &Spanned<T>, message: impl Into<String>) -> Box<RecipeError> {
        self.error(s.span(), message)
    }
}

/// The dotted path of the innermost key or value covering `span`.
fn field_at(text: &str, span: &Range<usize>) -> Option<String> {
    fn covers(r: &Range<usize>, s: &Range<usize>) -> bool {
        r.start <= s.start && s.end <= r.end.max(r.start + 1)
    }
    fn walk_table(t: &DeTable, span: &Range<usize>, path: &mut Vec<String>) -> bool {
        for (k, v) in t {
            if covers(&k.span(), span) {
                path.push(k.get_ref().to_string());
                return true;
            }
            if covers(&v.span(), span) {
                path.push(k.get_ref().to_string());
                walk_value(v.get_ref(), span, path);
                return true;
            }
        }
        // Array-of-tables entries have no span for the whole header
        // block, so also look inside values that do not cover the span.
        for (k, v) in t {
            let mut sub = vec![k.get_ref().to_string()];
            if walk_value(v.get_ref(), span, &mut sub) {
                path.extend(sub);
                return true;
            }
        }
        false
    }
    fn walk_value(v: &DeValue, span: &Range<usize>, path: &mut Vec<String>) -> bool {
        match v {
            DeValue::Table(t) => walk_table(t, span, path),
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    let mut sub = Vec::new();
                    let inside = walk_value(item.get_ref(), span, &mut sub);
                    if inside || covers(&item.span(), span) {
                        let last = path.pop().unwrap_or_default();
                        path.push(format!("{last}[{i}]"));
                        path.extend(sub);
                        return true;
                    }
                }
                false
            }
            _ => false,
        }
    }
    let table = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    if walk_table(table.get_ref(), span, &mut path) && !path.is_empty() {
        Some(path.join("."))
    } else {
        None
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// Parses sizes like `1G`, `512M`, `2GiB`, `1048576` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Parses `SRC:DST[:ro|rw]`.
pub fn parse_bind(s: &str) -> Result<BindSpec, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (source, target, readonly) = match parts.as_slice() {
        [s, t] => (*s, *t, false),
        [s, t, "ro"] => (*s, *t, true),
        [s, t, "rw"] => (*s, *t, false),
        [_, _, o] => return Err(format!("unknown bind option {o:?} (expected ro or rw)")),
        _ => return Err("expected SOURCE:TARGET[:ro|rw]".into()),
    };
    for p in [source, target] {
        if !is_clean_absolute(p) {
            return Err(format!(
                "{p:?} must be an absolute path without `..` components"
            ));
        }
    }
    Ok(BindSpec {
        source: source.into(),
        target: target.into(),
        readonly,
    })
}

/// Absolute, and no `..` component.
pub fn is_clean_absolute(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|c| c == "..") && p.len() > 1
}

fn validate(l: &Locator, recipe: Recipe) -> Result<Validated, Box<RecipeError>> {
    if !is_name(recipe.name.get_ref()) {
        return Err(l.at(
            &recipe.name,
            "must be 1-63 characters of a-z, 0-9 and `-` (it names output files)",
        ));
    }
    if recipe.version.get_ref().trim().is_empty() {
        return Err(l.at(&recipe.version, "must not be empty"));
    }

    let k = &recipe.kernel;
    let sources: Vec<&Spanned<String>> = [&k.debian, &k.image, &k.path]
        .into_iter()
        .flatten()
        .collect();
    match sources.as_slice() {
        [] => {
            return Err(l.error(
                0..0,
                "[kernel] needs exactly one source: debian, image or path",
            ))
        }
        [_] => {}
        [_, second, ..] => {
            return Err(l.at(
                second,
                "[kernel] takes exactly one of debian, image or path",
            ))
        }
    }
    if k.debian.is_none() {
        if let Some(s) = k.suite.as_ref().or(k.mirror.as_ref()) {
            return Err(l.at(s, "only applies to a `debian` kernel"));
        }
    }
    if let Some(m) = &k.modules {
        if k.path.is_none() {
            return Err(l.at(m, "only applies to a `path` kernel"));
        }
    }
    if let Some(d) = &k.debian {
        if d.get_ref().trim().is_empty() {
            return Err(l.at(d, "names no package"));
        }
    }
    if let Some(c) = &k.cmdline {
        if c.get_ref().contains('\n') {
            return Err(l.at(c, "must be one line"));
        }
    }

    let mut names = BTreeSet::new();
    for c in recipe.onboot.iter().chain(&recipe.services) {
        let name = c.name.get_ref();
        if !is_name(name) {
            return Err(l.at(&c.name, "must be 1-63 characters of a-z, 0-9 and `-`"));
        }
        if !names.insert(name.clone()) {
            return Err(l.at(
                &c.name,
                format!("another container is already named {name:?}"),
            ));
        }
        match c.image.get_ref() {
            ImageSource::Ref(r) if r.trim().is_empty() => {
                return Err(l.at(&c.image, "is empty"));
            }
            ImageSource::Debian { packages, .. } if packages.is_empty() => {
                return Err(l.at(&c.image, "lists no Debian package"));
            }
            _ => {}
        }
        if let Some(cmd) = &c.command {
            if cmd.is_empty() {
                return Err(l.at(&c.name, "`command` must not be empty when given"));
            }
        }
        for key in c.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(l.at(&c.name, format!("env key {key:?} is not a valid name")));
            }
        }
        if let Some(cwd) = &c.cwd {
            if !cwd.get_ref().starts_with('/') {
                return Err(l.at(cwd, "must be an absolute path"));
            }
        }
        if let Some(u) = &c.user {
            let s = u.get_ref();
            if s.is_empty() || s.split(':').count() > 2 || s.split(':').any(str::is_empty) {
                return Err(l.at(u, "expected USER[:GROUP] (names or numeric ids)"));
            }
        }
        if let Some(n) = &c.net {
            if !matches!(n.get_ref().as_str(), "host" | "none") {
                return Err(l.at(n, "expected \"host\" or \"none\""));
            }
        }
        for b in &c.binds {
            parse_bind(b.get_ref()).map_err(|m| l.at(b, m))?;
        }
    }

    let mut paths = BTreeSet::new();
    for f in &recipe.files {
        let p = f.path.get_ref();
        if !is_clean_absolute(p) {
            return Err(l.at(&f.path, "must be an absolute path without `..`"));
        }
        if !paths.insert(p.clone()) {
            return Err(l.at(&f.path, format!("{p} is declared twice")));
        }
        match (&f.contents, &f.source) {
            (Some(_), Some(s)) => {
                return Err(l.at(s, "give either `contents` or `source`, not both"))
            }
            (None, None) => return Err(l.at(&f.path, "needs `contents` or `source`")),
            _ => {}
        }
        if let Some(m) = &f.mode {
            if u32::from_str_radix(m.get_ref(), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .is_none()
            {
                return Err(l.at(m, "expected an octal mode such as \"0644\""));
            }
        }
    }

    if let Some(h) = &recipe.host.hostname {
        let s = h.get_ref();
        if s.is_empty()
            || s.len() > 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(l.at(h, "not a valid hostname"));
        }
    }
    if let Some(w) = &recipe.host.when_done {
        if !matches!(w.get_ref().as_str(), "stay" | "poweroff") {
            return Err(l.at(w, "expected \"stay\" or \"poweroff\""));
        }
    }

    let disk_size = match &recipe.disk.size {
        Some(s) => parse_size(s.get_ref())
            .filter(|n| *n >= 64 << 20)
            .ok_or_else(|| l.at(s, "expected a size of at least 64M, such as \"1G\""))?,
        None => parse_size(DEFAULT_DISK_SIZE).unwrap_or(1 << 30),
    };

    let formats = match &recipe.output.formats {
        Some(f) => {
            if f.get_ref().is_empty() {
                return Err(l.at(f, "lists no format"));
            }
            for name in f.get_ref() {
                if !SUPPORTED_FORMATS.contains(&name.as_str()) {
                    return Err(l.at(
                        f,
                        format!(
                            "format {name:?} is not supported (supported: {})",
                            SUPPORTED_FORMATS.join(", ")
                        ),
                    ));
                }
            }
            f.get_ref().clone()
        }
        None => vec!["raw".to_string()],
    };

    Ok(Validated {
        path: l.path.to_path_buf(),
        recipe,
        disk_size,
        formats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "hello"
version = "0.1.0"

[kernel]
debian = "linux-image-cloud-amd64"
cmdline = "console=ttyS0"

[[onboot]]
name = "greet"
image = { debian = ["busybox-static"] }
command = ["/bin/busybox", "echo", "hello"]

[[service]]
name = "web"
image = "127.0.0.1:5000/web:1"
env = { KEY = "v" }
net = "none"
binds = ["/run/config:/config:ro"]

[[file]]
path = "/etc/motd"
contents = "hi"
mode = "0644"

[host]
when_done = "poweroff"

[disk]
size = "512M"
"#;

    fn err(text: &str) -> RecipeError {
        *parse(Path::new("r.toml"), text).unwrap_err()
    }

    #[test]
    fn good_recipe_parses() {
        let v = parse(Path::new("r.toml"), GOOD).unwrap();
        assert_eq!(v.name(), "hello");
        assert_eq!(v.disk_size, 512 << 20);
        assert_eq!(v.formats, vec!["raw"]);
        assert!(v.poweroff_when_done());
        assert_eq!(v.hostname(), "hello");
        assert_eq!(
            v.recipe.onboot[0].image.get_ref(),
            &ImageSource::Debian {
                packages: vec!["busybox-static".into()],
                suite: None
            }
        );
        assert_eq!(v.containers().count(), 2);
    }

    #[test]
    fn unknown_key_names_line_and_field() {
        let text = GOOD.replace("net = \"none\"", "nett = \"none\"");
        let e = err(&text);
        assert_eq!(e.line, 18, "{e}");
        assert_eq!(e.field, "service[0].nett", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(e.to_string().starts_with("r.toml:18:1: "), "{e}");
    }

    #[test]
    fn wrong_type_names_field() {
        let text = GOOD.replace("version = \"0.1.0\"", "version = 1");
        let e = err(&text);
        assert_eq!((e.line, e.field.as_str()), (3, "version"), "{e}");
    }

    #[test]
    fn two_kernel_sources_is_an_error() {
        let text = GOOD.replace(
            "cmdline = \"console=ttyS0\"",
            "path = \"vmlinuz\"\ncmdline = \"console=ttyS0\"",
        );
        let e = err(&text);
        assert_eq!(e.field, "kernel.path", "{e}");
        assert_eq!(e.line, 7, "{e}");
    }

    #[test]
    fn validation_errors_point_at_values() {
        let e = err(&GOOD.replace("net = \"none\"", "net = \"bridge\""));
        assert_eq!((e.line, e.field.as_str()), (18, "service[0].net"), "{e}");
        let e = err(&GOOD.replace("size = \"512M\"", "size = \"lots\""));
        assert_eq!(e.field, "disk.size", "{e}");
        let e = err(&GOOD.replace("mode = \"0644\"", "mode = \"999\""));
        assert_eq!(e.field, "file[0].mode", "{e}");
        let e = err(&GOOD.replace(":/config:ro", ":../config:ro"));
        assert_eq!(e.field, "service[0].binds[0]", "{e}");
        let e = err(&GOOD.replace("name = \"web\"", "name = \"greet\""));
        assert_eq!(e.field, "service[0].name", "{e}");
        let e = err(&GOOD.replace("name = \"hello\"", "name = \"Hello\""));
        assert_eq!((e.line, e.field.as_str()), (2, "name"), "{e}");
    }

    #[test]
    fn syntax_error_is_located() {
        let e = err("name = \"x\"\nversion = \n");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn sizes_and_binds() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1X"), None);
        assert_eq!(
            parse_bind("/a:/b:ro").unwrap(),
            BindSpec {
                source: "/a".into(),
                target: "/b".into(),
                readonly: true
            }
        );
        assert!(parse_bind("a:/b").is_err());
        assert!(parse_bind("/a:/b:rx").is_err());
    }
}
