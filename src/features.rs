//! Tags -> features. A schema file lists feature groups; each selects handbook dimensions and maps
//! a tag to an embedding id, by vocabulary (index in a file, out-of-vocabulary values to
//! `V + hash % oov_buckets`, as TensorFlow's vocabulary columns do) or by a stable hash. Multi-hot =
//! the set of a note's ids in a group; weights carry the tag score or 1.0. Format: `models/HANDBOOK.md`.
//!
//! Before any id, a tag value is put in its canonical spelling when the schema's `[canonical]`
//! synonym file for its dimension lists it (`通勤 | commute`): one thing, one id, whatever language
//! the note (and so the tag) was written in.
//!
//! Ids are a pure function of (tags, schema): identical across runs, machines and releases. The
//! hash is XXH3-64 with a pinned seed, never `std::hash`; `tests/fixtures/id_vectors.json` pins it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    domain::canonical::{parse_synonyms, Canonical},
    domain::normalize,
    domain::Tag,
};

/// Seed of the stable tag hash. Changing it changes every hashed id: never do.
pub const HASH_SEED: u64 = 0;

/// Stable 64-bit id of a tag: XXH3-64 (seed [`HASH_SEED`]) of the UTF-8 bytes of
/// `"dimension:value"`, masked to a non-negative int64.
pub fn stable_hash(dimension: &str, value: &str) -> i64 {
    let mut buf = Vec::with_capacity(dimension.len() + 1 + value.len());
    buf.extend_from_slice(dimension.as_bytes());
    buf.push(b':');
    buf.extend_from_slice(value.as_bytes());
    (xxhash_rust::xxh3::xxh3_64_with_seed(&buf, HASH_SEED) & (i64::MAX as u64)) as i64
}

/// How tag values become weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weight {
    /// The tag's score.
    Score,
    /// 1.0 for every id.
    One,
}

impl Weight {
    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Weight::Score => "score",
            Weight::One => "one",
        }
    }
}

/// How a group maps tags to ids.
#[derive(Debug, Clone)]
pub enum IdMap {
    /// Index in a vocabulary (normalized value -> id), OOV to `size + hash % oov_buckets`.
    Vocab {
        /// Normalized value -> index.
        index: HashMap<String, i64>,
        /// Vocabulary size.
        size: u64,
        /// Out-of-vocabulary buckets (0 drops unknown values).
        oov_buckets: u64,
    },
    /// Stable hash, `% buckets` when `buckets > 0`.
    Hash {
        /// Bucket count (0 = full non-negative int64 range).
        buckets: u64,
    },
}

/// One feature group.
#[derive(Debug, Clone)]
pub struct Group {
    /// Name in responses.
    pub name: String,
    /// Selected dimension keys; empty = every dimension (`["*"]` in the file).
    pub dimensions: Vec<String>,
    /// Tag -> id.
    pub ids: IdMap,
    /// Tag -> weight.
    pub weight: Weight,
}

impl Group {
    /// Whether tags of `dimension` feed this group.
    pub fn selects(&self, dimension: &str) -> bool {
        self.dimensions.is_empty() || self.dimensions.iter().any(|d| d == dimension)
    }

    /// The id of a tag in this group, `None` when an OOV value is dropped.
    pub fn id(&self, dimension: &str, value: &str) -> Option<i64> {
        match &self.ids {
            IdMap::Vocab {
                index,
                size,
                oov_buckets,
            } => match index.get(value) {
                Some(&i) => Some(i),
                None if *oov_buckets == 0 => None,
                None => {
                    Some(*size as i64 + (stable_hash(dimension, value) as u64 % oov_buckets) as i64)
                }
            },
            IdMap::Hash { buckets } => {
                let h = stable_hash(dimension, value);
                Some(if *buckets == 0 {
                    h
                } else {
                    (h as u64 % buckets) as i64
                })
            }
        }
    }

    /// Size of the id space (0 = the full non-negative int64 range).
    pub fn id_space(&self) -> u64 {
        match &self.ids {
            IdMap::Vocab {
                size, oov_buckets, ..
            } => size + oov_buckets,
            IdMap::Hash { buckets } => *buckets,
        }
    }
}

/// A loaded, validated feature schema.
#[derive(Debug, Clone)]
pub struct Schema {
    /// Reported with every note's features.
    pub version: String,
    /// Groups in file order (the jagged layout's key order).
    pub groups: Vec<Group>,
    /// Synonyms per dimension (`[canonical]`): tag values are put in their canonical spelling
    /// before any group's ids are computed.
    pub canonical: Canonical,
}

/// One group's multi-hot feature of one note: distinct ids and their weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupFeature {
    /// Distinct ids, in tag order.
    pub ids: Vec<i64>,
    /// One weight per id.
    pub weights: Vec<f32>,
}

/// Features of one note, one entry per schema group (same order).
pub type Features = Vec<GroupFeature>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: String,
    /// Dimension -> synonym file (relative to the schema file).
    #[serde(default)]
    canonical: std::collections::BTreeMap<String, PathBuf>,
    #[serde(rename = "group", default)]
    groups: Vec<GroupFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    name: String,
    dimensions: Vec<String>,
    ids: String,
    vocab: Option<PathBuf>,
    oov_buckets: Option<u64>,
    hash_buckets: Option<u64>,
    weight: Weight,
}

/// Why a schema was refused; messages name the file and the place.
#[derive(Debug, thiserror::Error)]
#[error("schema {path}: {place}: {reason}")]
pub struct SchemaError {
    /// The file.
    pub path: String,
    /// e.g. `group[2] "brand"` or `vocab/brand.txt line 14`.
    pub place: String,
    /// What is wrong.
    pub reason: String,
}

fn valid_group_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some('a'..='z'))
        && s.len() <= 64
        && c.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

impl Schema {
    /// Loads a schema file and its vocabulary files (paths relative to the schema file).
    pub fn load(path: &Path) -> Result<Schema, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|e| SchemaError {
            path: path.display().to_string(),
            place: "file".into(),
            reason: e.to_string(),
        })?;
        Schema::parse(&text, path)
    }

    /// Parses schema text as if read from `path` (vocabulary files are looked up beside it).
    pub fn parse(text: &str, path: &Path) -> Result<Schema, SchemaError> {
        let p = path.display().to_string();
        let err = |place: &str, reason: String| SchemaError {
            path: p.clone(),
            place: place.to_string(),
            reason,
        };
        let file: File = toml::from_str(text).map_err(|e| err("syntax", e.to_string()))?;
        if file.version.trim().is_empty() {
            return Err(err("version", "must not be empty".into()));
        }
        if file.groups.is_empty() {
            return Err(err("group", "at least one [[group]] is needed".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut groups: Vec<Group> = Vec::with_capacity(file.groups.len());
        for (i, g) in file.groups.into_iter().enumerate() {
            let place = format!("group[{i}] {:?}", g.name);
            if !valid_group_name(&g.name) {
                return Err(err(&place, "name must match ^[a-z][a-z0-9_]{0,63}$".into()));
            }
            if groups.iter().any(|o| o.name == g.name) {
                return Err(err(&place, "name is used by an earlier group".into()));
            }
            if g.dimensions.is_empty() {
                return Err(err(
                    &place,
                    "dimensions must not be empty (use [\"*\"] for all)".into(),
                ));
            }
            let dimensions = if g.dimensions == ["*"] {
                Vec::new()
            } else {
                for d in &g.dimensions {
                    if !crate::domain::is_valid_key(d) {
                        return Err(err(&place, format!("dimension {d:?} is not a valid key")));
                    }
                }
                g.dimensions
            };
            let ids = match g.ids.as_str() {
                "vocab" => {
                    if g.hash_buckets.is_some() {
                        return Err(err(&place, "hash_buckets is for ids = \"hash\"".into()));
                    }
                    let Some(vocab) = g.vocab else {
                        return Err(err(&place, "ids = \"vocab\" needs vocab = \"file\"".into()));
                    };
                    let vpath = base.join(&vocab);
                    let (index, size) =
                        load_vocab(&vpath).map_err(|(place, reason)| SchemaError {
                            path: p.clone(),
                            place,
                            reason,
                        })?;
                    IdMap::Vocab {
                        index,
                        size,
                        oov_buckets: g.oov_buckets.unwrap_or(0),
                    }
                }
                "hash" => {
                    if g.vocab.is_some() || g.oov_buckets.is_some() {
                        return Err(err(
                            &place,
                            "vocab and oov_buckets are for ids = \"vocab\"".into(),
                        ));
                    }
                    let Some(buckets) = g.hash_buckets else {
                        return Err(err(
                            &place,
                            "ids = \"hash\" needs hash_buckets (0 = full int64 range)".into(),
                        ));
                    };
                    IdMap::Hash { buckets }
                }
                other => {
                    return Err(err(
                        &place,
                        format!("ids = {other:?}: expected \"vocab\" or \"hash\""),
                    ))
                }
            };
            groups.push(Group {
                name: g.name,
                dimensions,
                ids,
                weight: g.weight,
            });
        }
        let mut canonical = Canonical::none();
        for (dim, file) in &file.canonical {
            let place = format!("canonical.{dim}");
            if !crate::domain::is_valid_key(dim) {
                return Err(err(&place, format!("{dim:?} is not a valid dimension key")));
            }
            let fpath = base.join(file);
            let text = std::fs::read_to_string(&fpath)
                .map_err(|e| err(&place, format!("{}: {e}", fpath.display())))?;
            let groups = parse_synonyms(&text)
                .map_err(|e| err(&format!("{} {e}", fpath.display()), e.reason.clone()))?;
            canonical.insert(dim, groups);
        }
        Ok(Schema {
            version: file.version,
            groups,
            canonical,
        })
    }

    /// Index of a group by name.
    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    /// The features of a note's tags: per group, distinct ids in tag order; a repeated id keeps
    /// the larger weight.
    pub fn features(&self, tags: &[Tag]) -> Features {
        // Each tag's canonical value, looked up once for all groups.
        let values: Vec<&str> = tags
            .iter()
            .map(|t| self.canonical.value(&t.dimension, &t.value))
            .collect();
        self.groups
            .iter()
            .map(|g| {
                let mut f = GroupFeature::default();
                for (t, value) in tags.iter().zip(&values) {
                    if !g.selects(&t.dimension) {
                        continue;
                    }
                    let Some(id) = g.id(&t.dimension, value) else {
                        continue;
                    };
                    let w = match g.weight {
                        Weight::Score => t.score,
                        Weight::One => 1.0,
                    };
                    match f.ids.iter().position(|&x| x == id) {
                        Some(k) => f.weights[k] = f.weights[k].max(w),
                        None => {
                            f.ids.push(id);
                            f.weights.push(w);
                        }
                    }
                }
                f
            })
            .collect()
    }
}

fn load_vocab(path: &Path) -> Result<(HashMap<String, i64>, u64), (String, String)> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| (name.clone(), e.to_string()))?;
    let mut index = HashMap::new();
    // One id per line: a canonical value, then optionally its aliases after ` | ` (other
    // spellings of the same thing, such as 耐克 for Nike), which get the line's id.
    let mut lines = 0i64;
    for (lineno, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let id = lines;
        lines += 1;
        for value in t.split('|').map(str::trim) {
            let v = normalize(value);
            if v.is_empty() {
                return Err((
                    format!("{name} line {}", lineno + 1),
                    format!("{t:?} has an empty value"),
                ));
            }
            if index.insert(v.clone(), id).is_some() {
                return Err((
                    format!("{name} line {}", lineno + 1),
                    format!("{value:?} normalizes to {v:?}, which an earlier value already has"),
                ));
            }
        }
    }
    if index.is_empty() {
        return Err((name, "vocabulary is empty".into()));
    }
    Ok((index, lines as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/features.toml")).unwrap()
    }

    /// Ids pinned by `tests/fixtures/id_vectors.json`, computed by an independent implementation
    /// (Python's `xxhash` package, see `scripts/gen_id_vectors.py`).
    #[test]
    fn id_test_vectors() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/id_vectors.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert!(cases.len() >= 20);
        for c in cases {
            let raw = c["raw_value"].as_str().unwrap();
            let dim = c["dimension"].as_str().unwrap();
            let norm = normalize(raw);
            assert_eq!(
                norm,
                c["normalized"].as_str().unwrap(),
                "normalize({raw:?})"
            );
            assert_eq!(
                stable_hash(dim, &norm),
                c["hash"].as_i64().unwrap(),
                "hash of {dim}:{norm}"
            );
            assert_eq!(
                (stable_hash(dim, &norm) as u64 % 1_048_576) as i64,
                c["hash_mod_2_20"].as_i64().unwrap()
            );
        }
    }

    #[test]
    fn vocab_oov_and_weights() {
        let s = schema();
        let brand = &s.groups[s.group_index("brand").unwrap()];
        let IdMap::Vocab {
            size, oov_buckets, ..
        } = brand.ids
        else {
            panic!()
        };
        let nike = brand.id("brand", &normalize("Nike")).unwrap();
        assert!((nike as u64) < size);
        let oov = brand.id("brand", "a brand nobody has heard of").unwrap() as u64;
        assert!(oov >= size && oov < size + oov_buckets);
        let tags = vec![
            Tag {
                dimension: "brand".into(),
                value: normalize("NIKE"),
                score: 0.5,
            },
            Tag {
                dimension: "brand".into(),
                value: normalize("ｎｉｋｅ"),
                score: 0.9,
            },
            Tag {
                dimension: "scene".into(),
                value: "gym".into(),
                score: 0.7,
            },
        ];
        let f = s.features(&tags);
        let b = &f[s.group_index("brand").unwrap()];
        assert_eq!(b.ids, vec![nike]);
        assert_eq!(b.weights, vec![0.9], "repeated id keeps the larger weight");
        let all = &f[s.group_index("tags").unwrap()];
        assert_eq!(all.ids.len(), 2);
        assert_eq!(all.weights, vec![1.0, 1.0]);
        assert!(all.ids.iter().all(|&i| (0..1 << 20).contains(&i)));
    }

    /// The ids `models/HANDBOOK.md` shows as examples, on the shipped vocabularies.
    #[test]
    fn documented_ids_hold() {
        let s = schema();
        let brand = &s.groups[s.group_index("brand").unwrap()];
        let price = &s.groups[s.group_index("price_band").unwrap()];
        assert_eq!(brand.id("brand", &normalize("Nike")), Some(0));
        assert_eq!(brand.id("brand", &normalize("ＡＩＲ  Jordan")), Some(1));
        // An alias gets its line's id; a brand in no line gets an out-of-vocabulary id.
        assert_eq!(brand.id("brand", &normalize("耐克")), Some(0));
        assert_eq!(brand.id("brand", &normalize("无名小牌")), Some(275 + 56));
        assert_eq!(price.id("price_band", &normalize("¥500-1000")), Some(5));
        assert_eq!(
            price.id("price_band", &normalize("about 600 yuan")),
            Some(33)
        );
        assert_eq!(stable_hash("scene", "通勤"), 7340465014993863816);
    }

    /// A synonym of `[canonical]` gets the ids of its canonical spelling in every group, the
    /// all-tags group (which hashes `dimension:value`) included.
    #[test]
    fn synonyms_share_every_id() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("scene.txt"), "通勤 | commute\n").unwrap();
        let toml = r#"
version = "t"
[canonical]
scene = "scene.txt"
[[group]]
name = "scene"
dimensions = ["scene"]
ids = "hash"
hash_buckets = 0
weight = "one"
[[group]]
name = "tags"
dimensions = ["*"]
ids = "hash"
hash_buckets = 1024
weight = "one"
"#;
        let s = Schema::parse(toml, &dir.path().join("features.toml")).unwrap();
        let tag = |v: &str| Tag {
            dimension: "scene".into(),
            value: normalize(v),
            score: 1.0,
        };
        let zh = s.features(&[tag("通勤")]);
        assert_eq!(s.features(&[tag("Commute")]), zh);
        assert_eq!(zh[0].ids, [stable_hash("scene", "通勤")]);
        assert_ne!(
            s.features(&[tag("上班")]),
            zh,
            "unlisted values keep their own ids"
        );
        // Both spellings in one note: one id.
        assert_eq!(s.features(&[tag("通勤"), tag("commute")]), zh);
        // The shipped schema: brand aliases are canonical in the all-tags group too.
        let shipped = schema();
        let brand = |v: &str| Tag {
            dimension: "brand".into(),
            value: normalize(v),
            score: 1.0,
        };
        assert_eq!(
            shipped.features(&[brand("耐克")]),
            shipped.features(&[brand("Nike")])
        );
        // A broken synonym file is refused with its place.
        std::fs::write(dir.path().join("scene.txt"), "通勤 | commute\nCOMMUTE\n").unwrap();
        let e = Schema::parse(toml, &dir.path().join("features.toml")).unwrap_err();
        assert!(e.place.contains("scene.txt line 2"), "{e}");
    }

    #[test]
    fn vocab_aliases_share_their_line_id() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("v.txt");
        std::fs::write(
            &v,
            "# brands\nNike | 耐克 | ＮＩＫＥ  SPORTS\n\nadidas|阿迪达斯\nASICS\n",
        )
        .unwrap();
        let (index, size) = load_vocab(&v).unwrap();
        assert_eq!(size, 3, "one id per line, aliases included");
        assert_eq!(index[&normalize("耐克")], 0);
        assert_eq!(index[&normalize("nike sports")], 0);
        assert_eq!(index[&normalize("阿迪达斯")], 1);
        assert_eq!(index[&normalize("asics")], 2);
        std::fs::write(&v, "Nike | 耐克\nadidas | 耐克\n").unwrap();
        let (place, reason) = load_vocab(&v).unwrap_err();
        assert!(
            place.ends_with("line 2") && reason.contains("耐克"),
            "{place}: {reason}"
        );
        std::fs::write(&v, "Nike | \n").unwrap();
        assert!(load_vocab(&v).unwrap_err().1.contains("empty value"));
    }

    #[test]
    fn schema_errors_name_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        std::fs::write(&f, "version = \"1\"\n[[group]]\nname = \"Bad Name\"\ndimensions = [\"*\"]\nids = \"hash\"\nhash_buckets = 0\nweight = \"one\"\n").unwrap();
        let e = Schema::load(&f).unwrap_err().to_string();
        assert!(e.contains("group[0]") && e.contains("name"), "{e}");
        std::fs::write(dir.path().join("v.txt"), "Nike\nＮＩＫＥ\n").unwrap();
        std::fs::write(&f, "version = \"1\"\n[[group]]\nname = \"b\"\ndimensions = [\"brand\"]\nids = \"vocab\"\nvocab = \"v.txt\"\noov_buckets = 0\nweight = \"one\"\n").unwrap();
        let e = Schema::load(&f).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
