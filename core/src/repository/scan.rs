//! Finding models and their versions: a repository directory (Triton's layout) or the
//! models listed in a server config file.
//!
//! ```text
//! models/
//!   doubler/            one version (served as version 1)
//!     plugin.py
//!     config.toml       optional (see `config.rs`)
//!   classifier/         numbered versions, chosen by the version policy
//!     config.toml
//!     1/plugin.py
//!     2/plugin.py
//! ```
//!
//! Every call reads the files again, so a load after an edit serves the edited model.

use super::config::{ModelFile, ModelOverrides};
use super::error::RepositoryError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where models come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A model repository directory: one folder per model.
    Directory(PathBuf),
    /// Models listed by name in a config file (`unimodel serve --config`).
    Listed {
        /// The config file, for error messages.
        file: PathBuf,
        models: BTreeMap<String, Listed>,
    },
}

/// One model of a config file: a plugin file or model folder, and its overrides.
#[derive(Clone, Debug)]
pub struct Listed {
    pub path: PathBuf,
    pub config: ModelFile,
}

/// A model as found on disk, with the versions its policy selects.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub name: String,
    pub overrides: ModelOverrides,
    /// Selected versions, ascending.
    pub versions: Vec<VersionSpec>,
}

/// One version to serve.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionSpec {
    pub version: u64,
    /// The plugin file.
    pub plugin: PathBuf,
    /// `ctx.model_dir` of the plugin: the folder holding plugin.py.
    pub model_dir: PathBuf,
}

impl Source {
    /// Where the models are, for messages.
    pub fn describe(&self) -> String {
        match self {
            Source::Directory(d) => format!("'{}'", d.display()),
            Source::Listed { file, .. } => format!("listed in '{}'", file.display()),
        }
    }

    /// The names of every model, sorted. A folder whose name starts with '.' is skipped.
    pub fn names(&self) -> Result<Vec<String>, RepositoryError> {
        match self {
            Source::Listed { models, .. } => Ok(models.keys().cloned().collect()),
            Source::Directory(dir) => {
                let read = std::fs::read_dir(dir).map_err(|e| RepositoryError::BadLayout {
                    name: String::new(),
                    message: format!("cannot read model repository '{}': {e}", dir.display()),
                })?;
                let mut names: Vec<String> = read
                    .filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.') && n != "__pycache__")
                    .collect();
                names.sort();
                Ok(names)
            }
        }
    }

    /// Reads model `name` from disk: its config and the versions its policy selects.
    pub fn resolve(&self, name: &str) -> Result<ModelSpec, RepositoryError> {
        let unknown = || RepositoryError::UnknownModel {
            name: name.to_string(),
            repository: self.describe(),
            available: self
                .names()
                .map(|n| {
                    if n.is_empty() {
                        "nothing".into()
                    } else {
                        n.join(", ")
                    }
                })
                .unwrap_or_else(|e| e.to_string()),
        };
        // A name is one path segment: `../x` must not reach outside the repository.
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(unknown());
        }
        let (path, listed) = match self {
            Source::Directory(dir) => (dir.join(name), None),
            Source::Listed { models, file } => {
                let entry = models.get(name).ok_or_else(unknown)?;
                (entry.path.clone(), Some((file, &entry.config)))
            }
        };
        let bad_config = |file: &Path, message: String| RepositoryError::BadConfig {
            name: name.to_string(),
            file: file.display().to_string(),
            message,
        };
        if path.is_file() {
            // A listed plugin file: one version, configured by the listing only.
            let config = listed.map(|(_, c)| c.clone()).unwrap_or_default();
            let file = listed.map_or(path.clone(), |(f, _)| f.clone());
            let overrides = config.resolve().map_err(|m| bad_config(&file, m))?;
            let model_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let versions = select(name, &overrides, vec![(1, path, model_dir)])?;
            return Ok(ModelSpec {
                name: name.to_string(),
                overrides,
                versions,
            });
        }
        if !path.is_dir() {
            return match listed {
                Some((file, _)) => Err(bad_config(
                    file,
                    format!("models.{name}.path: '{}' does not exist", path.display()),
                )),
                None => Err(unknown()),
            };
        }
        let config_path = path.join("config.toml");
        let mut config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| bad_config(&config_path, format!("cannot read: {e}")))?;
            ModelFile::parse(&text).map_err(|m| bad_config(&config_path, m))?
        } else {
            ModelFile::default()
        };
        let mut config_file = config_path;
        if let Some((file, over)) = listed {
            config = config.overlay(over.clone());
            config_file = file.clone();
        }
        let overrides = config.resolve().map_err(|m| bad_config(&config_file, m))?;
        let found = versions_in(name, &path)?;
        let versions = select(name, &overrides, found)?;
        Ok(ModelSpec {
            name: name.to_string(),
            overrides,
            versions,
        })
    }
}

/// Numbered folders holding plugin.py, else plugin.py itself as version 1.
fn versions_in(name: &str, dir: &Path) -> Result<Vec<(u64, PathBuf, PathBuf)>, RepositoryError> {
    let read = std::fs::read_dir(dir).map_err(|e| RepositoryError::BadLayout {
        name: name.to_string(),
        message: format!("cannot read '{}': {e}", dir.display()),
    })?;
    let mut found: Vec<(u64, PathBuf, PathBuf)> = Vec::new();
    for entry in read.filter_map(Result::ok) {
        let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let folder = entry.path();
        let plugin = folder.join("plugin.py");
        if !plugin.is_file() {
            continue;
        }
        // `01/` would otherwise be served as version 1 beside (or instead of) `1/`.
        if crate::engine::is_noncanonical_version(&file_name) {
            let canonical = file_name.trim_start_matches('0');
            return Err(RepositoryError::BadLayout {
                name: name.to_string(),
                message: format!(
                    "version folder '{file_name}/' is not a canonical version number (no leading \
                     zeros); rename it to '{}/'",
                    if canonical.is_empty() { "0" } else { canonical }
                ),
            });
        }
        if let Some(version) = crate::engine::parse_version(&file_name) {
            found.push((version, plugin, folder));
        }
    }
    found.sort_by_key(|(v, _, _)| *v);
    if found.is_empty() {
        let plugin = dir.join("plugin.py");
        if plugin.is_file() {
            found.push((1, plugin, dir.to_path_buf()));
        }
    }
    if found.is_empty() {
        return Err(RepositoryError::BadLayout {
            name: name.to_string(),
            message: format!(
                "'{}' has no plugin.py and no numbered version folder (1/, 2/, ...) holding one",
                dir.display()
            ),
        });
    }
    Ok(found)
}

fn select(
    name: &str,
    overrides: &ModelOverrides,
    found: Vec<(u64, PathBuf, PathBuf)>,
) -> Result<Vec<VersionSpec>, RepositoryError> {
    let numbers: Vec<u64> = found.iter().map(|(v, _, _)| *v).collect();
    let chosen = overrides
        .version_policy
        .select(&numbers)
        .map_err(|message| RepositoryError::BadLayout {
            name: name.to_string(),
            message,
        })?;
    Ok(found
        .into_iter()
        .filter(|(v, _, _)| chosen.contains(v))
        .map(|(version, plugin, model_dir)| VersionSpec {
            version,
            plugin,
            model_dir,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch repository, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("um-repo-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, rel: &str, text: &str) -> &Scratch {
            let path = self.0.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
            self
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn lists_model_folders_and_resolves_versions() {
        let s = Scratch::new("scan");
        s.file("a/plugin.py", "")
            .file("b/1/plugin.py", "")
            .file("b/3/plugin.py", "")
            .file("b/2/notes.txt", "")
            .file(".hidden/plugin.py", "");
        let src = Source::Directory(s.0.clone());
        assert_eq!(src.names().unwrap(), vec!["a", "b"]);
        let a = src.resolve("a").unwrap();
        assert_eq!(a.versions.len(), 1);
        assert_eq!(a.versions[0].version, 1);
        assert_eq!(a.versions[0].model_dir, s.0.join("a"));
        let b = src.resolve("b").unwrap();
        assert_eq!(
            b.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            vec![3]
        );
        s.file("b/config.toml", "version_policy = { all = true }");
        let b = src.resolve("b").unwrap();
        assert_eq!(
            b.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            vec![1, 3]
        );
    }

    #[test]
    fn unknown_names_and_escapes_are_unknown_models() {
        let s = Scratch::new("unknown");
        s.file("a/plugin.py", "");
        let src = Source::Directory(s.0.join("a").parent().unwrap().to_path_buf());
        for name in ["nope", "../a", "a/..", "", ".a"] {
            let err = src.resolve(name).unwrap_err();
            assert!(
                matches!(err, RepositoryError::UnknownModel { .. }),
                "{name}: {err}"
            );
        }
        assert!(
            src.resolve("nope")
                .unwrap_err()
                .to_string()
                .contains("holds: a")
        );
    }

    #[test]
    fn bad_config_names_the_file_and_key() {
        let s = Scratch::new("badcfg");
        s.file("m/plugin.py", "")
            .file("m/config.toml", "max_batch = 2");
        let err = Source::Directory(s.0.clone()).resolve("m").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, RepositoryError::BadConfig { .. }), "{text}");
        assert!(
            text.contains("config.toml") && text.contains("max_batch"),
            "{text}"
        );
    }

    #[test]
    fn a_folder_without_a_plugin_is_a_layout_error() {
        let s = Scratch::new("noplugin");
        s.file("m/readme.txt", "");
        let err = Source::Directory(s.0.clone()).resolve("m").unwrap_err();
        assert!(matches!(err, RepositoryError::BadLayout { .. }), "{err}");
        assert!(err.to_string().contains("no plugin.py"), "{err}");
        s.file("m/config.toml", "version_policy = { specific = [2] }")
            .file("m/1/plugin.py", "");
        let err = Source::Directory(s.0.clone()).resolve("m").unwrap_err();
        assert!(err.to_string().contains("version(s) 2"), "{err}");
    }

    #[test]
    fn listed_models_use_their_file_or_folder() {
        let s = Scratch::new("listed");
        s.file("one.py", "")
            .file("dir/plugin.py", "")
            .file("dir/config.toml", "instances = 2");
        let listed = |path: &str, text: &str| Listed {
            path: s.0.join(path),
            config: ModelFile::parse(text).unwrap(),
        };
        let src = Source::Listed {
            file: s.0.join("unimodel.toml"),
            models: BTreeMap::from([
                ("one".to_string(), listed("one.py", "max_batch_size = 4")),
                ("two".to_string(), listed("dir", "max_batch_size = 8")),
                ("gone".to_string(), listed("missing.py", "")),
            ]),
        };
        let one = src.resolve("one").unwrap();
        assert_eq!(one.overrides.max_batch_size, Some(4));
        assert_eq!(one.versions[0].plugin, s.0.join("one.py"));
        let two = src.resolve("two").unwrap();
        assert_eq!(two.overrides.instances, Some(2));
        assert_eq!(two.overrides.max_batch_size, Some(8));
        let err = src.resolve("gone").unwrap_err().to_string();
        assert!(
            err.contains("unimodel.toml") && err.contains("models.gone.path"),
            "{err}"
        );
    }
}
