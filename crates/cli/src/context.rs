//! The rstream agent configuration file (`~/.rstream/config.yaml`, or
//! `RSTREAM_CONFIG`) and how a command resolves where to connect.
//!
//! The file is read and written as a generic YAML tree so that keys strait
//! does not use (environments, mTLS, keys other tools wrote) survive a
//! `strait context create`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// One named context, as strait uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    pub name: String,
    pub engine: Option<String>,
    pub token: Option<TokenSource>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    /// `transport.mode` (or the older `transport.useQuic`).
    pub transport: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
}

impl TokenSource {
    pub fn read(&self) -> anyhow::Result<String> {
        match self {
            TokenSource::Inline(token) => Ok(token.clone()),
            TokenSource::File(path) => Ok(std::fs::read_to_string(path)
                .with_context(|| format!("cannot read token file {}", path.display()))?
                .trim()
                .to_string()),
        }
    }
}

pub fn default_path() -> PathBuf {
    if let Some(path) = std::env::var_os("RSTREAM_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".rstream").join("config.yaml")
}

/// The configuration file as a tree.
pub struct ConfigFile {
    pub path: PathBuf,
    tree: Value,
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str().map(str::trim).filter(|s| !s.is_empty())
}

impl ConfigFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let tree = match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => serde_saphyr::from_str::<Value>(&text)
                .with_context(|| format!("{} is not valid YAML", path.display()))?,
            Ok(_) => json!({"version": 1}),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({"version": 1}),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if !tree.is_object() {
            bail!("{} is not a mapping at the top level", path.display());
        }
        Ok(Self { path: path.to_path_buf(), tree })
    }

    pub fn default_context(&self) -> Option<&str> {
        str_at(&self.tree, &["defaults", "context", "name"])
    }

    pub fn contexts(&self) -> Vec<Context> {
        let Some(list) = self.tree.get("contexts").and_then(Value::as_array) else { return Vec::new() };
        list.iter().filter_map(parse_context).collect()
    }

    pub fn context(&self, name: &str) -> Option<Context> {
        self.contexts().into_iter().find(|c| c.name == name)
    }

    /// Adds or replaces a context, keeping whatever else it held.
    pub fn upsert(&mut self, context: &Context) {
        let root = self.tree.as_object_mut().expect("checked at load");
        root.entry("version").or_insert(json!(1));
        let list = root.entry("contexts").or_insert(json!([]));
        if !list.is_array() {
            *list = json!([]);
        }
        let list = list.as_array_mut().expect("just made an array");
        let index = list.iter().position(|c| str_at(c, &["name"]) == Some(context.name.as_str()));
        let entry = match index {
            Some(i) => &mut list[i],
            None => {
                list.push(json!({"name": context.name}));
                list.last_mut().expect("just pushed")
            }
        };
        let obj = entry.as_object_mut().expect("contexts are mappings");
        if let Some(engine) = &context.engine {
            obj.insert("engine".into(), json!(engine));
        }
        match &context.token {
            Some(TokenSource::Inline(t)) => {
                obj.insert("auth".into(), json!({"token": {"storage": {"kind": "inline", "value": t}}}));
            }
            Some(TokenSource::File(p)) => {
                obj.insert("auth".into(), json!({"token": {"storage": {"kind": "file", "path": p}}}));
            }
            None => {}
        }
        if context.ca_file.is_some() || context.server_name.is_some() || context.transport.is_some() {
            let transport = obj.entry("transport").or_insert(json!({}));
            if !transport.is_object() {
                *transport = json!({});
            }
            let transport = transport.as_object_mut().expect("just made a mapping");
            if context.ca_file.is_some() || context.server_name.is_some() {
                let mut tls = serde_json::Map::new();
                if let Some(ca) = &context.ca_file {
                    tls.insert("caFile".into(), json!(ca));
                }
                if let Some(name) = &context.server_name {
                    tls.insert("serverName".into(), json!(name));
                }
                transport.insert("tls".into(), json!(tls));
            }
            if let Some(mode) = &context.transport {
                transport.insert("mode".into(), json!(mode));
            }
        }
    }

    pub fn set_default(&mut self, name: &str) {
        let root = self.tree.as_object_mut().expect("checked at load");
        root.insert("defaults".into(), json!({"context": {"name": name}}));
    }

    pub fn save(&self) -> anyhow::Result<()> {
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let text = serde_saphyr::to_string(&self.tree).context("cannot serialise the configuration")?;
        // Write then rename, so a crash never leaves half a file.
        let tmp = self.path.with_extension("yaml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        set_private(&tmp);
        std::fs::rename(&tmp, &self.path).with_context(|| format!("cannot replace {}", self.path.display()))?;
        Ok(())
    }
}

/// Tokens live in this file: readable by its owner only.
fn set_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

fn parse_context(value: &Value) -> Option<Context> {
    let name = str_at(value, &["name"])?.to_string();
    let storage = &["auth", "token", "storage"];
    let kind = str_at(value, &[storage[0], storage[1], storage[2], "kind"])
        .or_else(|| str_at(value, &[storage[0], storage[1], storage[2], "provider"]));
    let token = match kind {
        Some("file") => str_at(value, &["auth", "token", "storage", "path"])
            .or_else(|| str_at(value, &["auth", "token", "storage", "value"]))
            .map(|p| TokenSource::File(PathBuf::from(p))),
        _ => str_at(value, &["auth", "token", "storage", "value"]).map(|t| TokenSource::Inline(t.to_string())),
    };
    Some(Context {
        name,
        engine: str_at(value, &["engine"]).map(String::from),
        token,
        ca_file: str_at(value, &["transport", "tls", "caFile"]).map(PathBuf::from),
        server_name: str_at(value, &["transport", "tls", "serverName"]).map(String::from),
        transport: str_at(value, &["transport", "mode"]).map(String::from).or_else(|| {
            let quic = value.get("transport")?.get("useQuic")?.as_bool()?;
            Some(if quic { "quic" } else { "tls" }.to_string())
        }),
    })
}

/// What a command was told on its command line.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub context: Option<String>,
    pub engine: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    /// `--transport` or `RSTREAM_TUNNEL_TRANSPORT` (clap reads both).
    pub transport: Option<strait_agent::TransportMode>,
}

fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// Resolves flags, then `RSTREAM_*` variables, then the selected context.
pub fn resolve(overrides: &Overrides) -> anyhow::Result<strait_agent::ClientConfig> {
    resolve_with(overrides, &process_env)
}

/// Resolves a context named in a file (`strait run --apply`): its engine
/// and token come from the configuration file alone, since `RSTREAM_*`
/// variables describe the command's default context, not this one.
pub fn resolve_named(config: Option<PathBuf>, name: &str) -> anyhow::Result<strait_agent::ClientConfig> {
    let overrides = Overrides { config, context: Some(name.to_string()), ..Default::default() };
    resolve_with(&overrides, &|key| if key == "SSL_CERT_FILE" { process_env(key) } else { None })
}

fn resolve_with(
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<strait_agent::ClientConfig> {
    let path = overrides.config.clone().unwrap_or_else(default_path);
    let file = ConfigFile::load(&path)?;
    let context_name =
        overrides.context.clone().or_else(|| env("RSTREAM_CONTEXT")).or(file.default_context().map(String::from));
    let context =
        match &context_name {
            Some(name) => Some(file.context(name).with_context(|| {
                format!("context {name:?} is not in {} (see `strait context list`)", path.display())
            })?),
            None => None,
        };
    let engine = overrides
        .engine
        .clone()
        .or_else(|| env("RSTREAM_ENGINE"))
        .or_else(|| context.as_ref().and_then(|c| c.engine.clone()))
        .context("no engine: pass --engine, set RSTREAM_ENGINE, or create a context with `strait context create`")?;
    let token = match overrides.token.clone().or_else(|| env("RSTREAM_AUTHENTICATION_TOKEN")) {
        Some(token) => Some(token),
        None => context.as_ref().and_then(|c| c.token.as_ref()).map(TokenSource::read).transpose()?,
    };
    let mut config = strait_agent::ClientConfig::new(engine, token);
    config.ca_file = overrides
        .ca_file
        .clone()
        .or_else(|| context.as_ref().and_then(|c| c.ca_file.clone()))
        .or_else(|| env("SSL_CERT_FILE").map(PathBuf::from));
    config.server_name = overrides.server_name.clone().or_else(|| context.as_ref().and_then(|c| c.server_name.clone()));
    config.transport = match (overrides.transport, context.as_ref().and_then(|c| c.transport.as_deref())) {
        (Some(mode), _) => mode,
        (None, Some(mode)) => mode.parse().map_err(|e| anyhow::anyhow!("context transport.mode: {e}"))?,
        // The rstream SDKs' older switch, still honoured by them.
        (None, None) if env("RSTREAM_QUIC_TRANSPORT").as_deref() == Some("1") => strait_agent::TransportMode::Quic,
        (None, None) => strait_agent::TransportMode::Auto,
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_shape_and_keeps_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "version: 1\n\
             defaults: {context: {name: self-hosted}}\n\
             environments: [{apiUrl: https://api.example.com}]\n\
             contexts:\n  - name: self-hosted\n    engine: edge.example.com:443\n    \
             auth: {token: {storage: {kind: inline, value: \"jwt\"}}}\n    \
             transport: {tls: {caFile: /etc/rstream/ca.pem, serverName: edge.example.com}}\n",
        )
        .unwrap();
        let mut file = ConfigFile::load(&path).unwrap();
        assert_eq!(file.default_context(), Some("self-hosted"));
        let ctx = file.context("self-hosted").unwrap();
        assert_eq!(ctx.engine.as_deref(), Some("edge.example.com:443"));
        assert_eq!(ctx.token, Some(TokenSource::Inline("jwt".into())));
        assert_eq!(ctx.ca_file, Some(PathBuf::from("/etc/rstream/ca.pem")));
        assert_eq!(ctx.server_name.as_deref(), Some("edge.example.com"));

        file.upsert(&Context {
            name: "lab".into(),
            engine: Some("lab:8443".into()),
            token: Some(TokenSource::File("/run/token".into())),
            ..Default::default()
        });
        file.set_default("lab");
        file.save().unwrap();
        let again = ConfigFile::load(&path).unwrap();
        assert_eq!(again.default_context(), Some("lab"));
        assert_eq!(again.contexts().len(), 2);
        assert_eq!(again.context("lab").unwrap().token, Some(TokenSource::File("/run/token".into())));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("api.example.com"), "unknown keys survive: {text}");
    }

    #[test]
    fn the_transport_comes_from_the_flag_then_the_context_then_the_old_switch() {
        use strait_agent::TransportMode;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            "contexts:\n  - {name: q, engine: e:1, transport: {mode: quic, tls: {caFile: /ca.pem}}}\n  \
             - {name: old, engine: e:1, transport: {useQuic: false}}\n  - {name: plain, engine: e:1}\n  \
             - {name: bad, engine: e:1, transport: {mode: udp}}\n",
        )
        .unwrap();
        let resolve = |context: &str, flag: Option<TransportMode>, legacy: bool| {
            let overrides = Overrides {
                config: Some(path.clone()),
                context: Some(context.into()),
                transport: flag,
                ..Default::default()
            };
            resolve_with(&overrides, &|key| (legacy && key == "RSTREAM_QUIC_TRANSPORT").then(|| "1".to_string()))
        };
        assert_eq!(resolve("q", None, false).unwrap().transport, TransportMode::Quic);
        assert_eq!(resolve("q", Some(TransportMode::Tls), false).unwrap().transport, TransportMode::Tls);
        assert_eq!(resolve("old", None, true).unwrap().transport, TransportMode::Tls);
        assert_eq!(resolve("plain", None, false).unwrap().transport, TransportMode::Auto);
        assert_eq!(resolve("plain", None, true).unwrap().transport, TransportMode::Quic);
        let error = resolve("bad", None, false).unwrap_err().to_string();
        assert!(error.contains("transport.mode") && error.contains("auto, tls, quic"), "{error}");

        // Saving a mode keeps the TLS settings beside it.
        let mut file = ConfigFile::load(&path).unwrap();
        file.upsert(&Context { name: "q".into(), transport: Some("tls".into()), ..Default::default() });
        file.save().unwrap();
        let ctx = ConfigFile::load(&path).unwrap().context("q").unwrap();
        assert_eq!((ctx.transport.as_deref(), ctx.ca_file), (Some("tls"), Some(PathBuf::from("/ca.pem"))));
    }
}
