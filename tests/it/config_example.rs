//! The configuration reference, `tagllm.example.toml`: it parses to `Config::default()`, it
//! validates, and it names every key of `Config`, keys with a default set to it and keys unset by
//! default (`Option`s) as commented-out `# key = value` lines.
//!
//! `Config::load` also merges `TAGLLM__` environment variables. These tests never set or remove
//! any (the tests of this binary run in parallel threads of one process): they parse the file on
//! its own, and compare `Config::load`'s result only when no such variable is set.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use tagllm::config::Config;

use crate::common::root;

fn example_path() -> PathBuf {
    root().join("tagllm.example.toml")
}

fn example_text() -> String {
    let path = example_path();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The example read by the server's serde rules (`deny_unknown_fields`, a default for every key
/// left out), without the environment.
fn example_config() -> Config {
    toml::from_str(&example_text()).unwrap_or_else(|e| panic!("tagllm.example.toml: {e}"))
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Dotted keys (`server.addr`, `replica.tls.ca_file`) of the non-table values of `v` (TOML or a
/// `Config`, seen as JSON), with those values; an empty table has none. Where `v` is a `Config`,
/// an unset `Option` is a `null` leaf; TOML has no null, so it leaves such keys out.
fn leaves(v: impl serde::Serialize) -> BTreeMap<String, serde_json::Value> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    walk(&join(prefix, k), v, out);
                }
            }
            leaf => {
                out.insert(prefix.to_string(), leaf.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", &serde_json::to_value(v).unwrap(), &mut out);
    out
}

/// `Some((key, "key = value"))` for a commented-out setting such as `# poll_secs = 5`. The
/// example's prose comments never start with a lowercase `key =`, so they are not settings.
fn commented_setting(line: &str) -> Option<(&str, &str)> {
    let setting = line.strip_prefix('#')?.trim();
    let (key, value) = setting.split_once('=')?;
    let key = key.trim();
    let is_key = key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    (is_key && !value.trim().is_empty()).then_some((key, setting))
}

/// The example with its commented-out settings uncommented, and their dotted keys (the table
/// header in force, then the key).
fn uncomment(text: &str) -> (String, BTreeSet<String>) {
    let mut table = String::new();
    let mut doc = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(header) = trimmed.strip_prefix('[') {
            table = header.split(']').next().unwrap_or("").trim().to_string();
        }
        match commented_setting(trimmed) {
            Some((key, setting)) => {
                let first = keys.insert(join(&table, key));
                assert!(first, "{key} is commented out twice in [{table}]");
                doc.push_str(setting);
            }
            None => doc.push_str(line),
        }
        doc.push('\n');
    }
    (doc, keys)
}

#[test]
fn example_config_is_the_defaults() {
    assert_eq!(
        example_config(),
        Config::default(),
        "tagllm.example.toml must hold the built-in defaults"
    );
    // The server's own loader, defaults < file < `TAGLLM__` environment. With such variables set
    // (a developer's shell, a CI job), its result is theirs to decide: the file alone is compared
    // above, and this half is skipped rather than the environment changed.
    let env: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("TAGLLM__"))
        .collect();
    if env.is_empty() {
        let loaded = Config::load(Some(&example_path()))
            .unwrap_or_else(|e| panic!("Config::load(tagllm.example.toml): {e}"));
        assert_eq!(loaded, Config::default());
    } else {
        eprintln!("TAGLLM__ variables are set ({env:?}): Config::load of the example not compared");
    }
}

#[test]
fn example_config_validates() {
    // `validate` checks every range, and that the model, handbook and schema exist (and that
    // `data_dir` is a directory if it exists). The example's paths are relative: the server
    // resolves them against its working directory, which is the repository root under
    // `cargo run`. A test does not rely on its own working directory, so they are anchored at
    // the repository root here; nothing else is changed. The default model must have been
    // fetched (`models/fetch_default_model.sh`), as for every test of this binary.
    let mut cfg = example_config();
    for path in [
        &mut cfg.data_dir,
        &mut cfg.handbook,
        &mut cfg.schema,
        &mut cfg.model.path,
    ] {
        assert!(path.is_relative(), "{}", path.display());
        let anchored = root().join(path.as_path());
        *path = anchored;
    }
    assert_eq!(cfg.model.path, crate::common::model_path());
    cfg.validate()
        .unwrap_or_else(|e| panic!("tagllm.example.toml does not validate: {e}"));
}

#[test]
fn example_config_names_every_key() {
    let text = example_text();
    let set = leaves(toml::from_str::<toml::Table>(&text).expect("tagllm.example.toml is TOML"));
    let (uncommented, commented) = uncomment(&text);

    // Every key of `Config`. TOML has no null, so `toml::Value::try_from` leaves out the keys
    // whose default is `None`; JSON keeps them, as `null`.
    let defaults = leaves(toml::Value::try_from(Config::default()).unwrap());
    let every = leaves(Config::default());
    let all: BTreeSet<String> = every.keys().cloned().collect();
    let unset: BTreeSet<String> = every
        .iter()
        .filter(|(_, v)| v.is_null())
        .map(|(k, _)| k.clone())
        .collect();

    // Documented = set or commented out: exactly the keys of `Config`.
    let documented: BTreeSet<String> = set.keys().cloned().chain(commented.clone()).collect();
    let missing: Vec<&String> = all.difference(&documented).collect();
    let extra: Vec<&String> = documented.difference(&all).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "tagllm.example.toml: keys of Config it does not name: {missing:?}; keys it names that \
         Config does not have: {extra:?}"
    );

    // Keys with a default are set to it; keys unset by default are commented out.
    let set_keys: BTreeSet<String> = set.keys().cloned().collect();
    let default_keys: BTreeSet<String> = defaults.keys().cloned().collect();
    assert_eq!(
        set_keys, default_keys,
        "set in tagllm.example.toml vs keys with a default"
    );
    assert_eq!(commented, unset, "commented out vs keys unset by default");
    let mut differ = Vec::new();
    for (key, default) in &defaults {
        if let Some(value) = set.get(key).filter(|v| *v != default) {
            differ.push(format!("{key} = {value} (default: {default})"));
        }
    }
    assert!(differ.is_empty(), "not the default: {differ:?}");

    // The commented-out examples are valid settings: uncommented, the file still loads, and then
    // sets every key.
    let everything: Config = toml::from_str(&uncommented)
        .unwrap_or_else(|e| panic!("tagllm.example.toml with its settings uncommented: {e}"));
    let everything_keys: BTreeSet<String> = leaves(toml::Value::try_from(&everything).unwrap())
        .into_keys()
        .collect();
    assert_eq!(
        everything_keys, all,
        "uncommented, the example sets every key"
    );
}
