//! Which versions of a model are served: Triton's version policy.
//!
//! `latest = N` (the default, N = 1) serves the N highest versions found, `all = true`
//! every version, `specific = [1, 3]` exactly those (each must exist).

use serde::Deserialize;

/// The resolved policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionPolicy {
    Latest(u32),
    All,
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

/// `version_policy` as written in `config.toml`: exactly one key.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyTable {
    pub latest: Option<u32>,
    pub all: Option<bool>,
    pub specific: Option<Vec<u64>>,
}

impl PolicyTable {
    /// The policy, or what is wrong with the table.
    pub fn resolve(&self) -> Result<VersionPolicy, String> {
        match (self.latest, self.all, &self.specific) {
            (Some(0), None, None) => Err("version_policy.latest must be at least 1".into()),
            (Some(n), None, None) => Ok(VersionPolicy::Latest(n)),
            (None, Some(true), None) => Ok(VersionPolicy::All),
            (None, Some(false), None) => Err(
                "version_policy.all = false selects nothing; use `latest = N` or `specific = [..]`"
                    .into(),
            ),
            (None, None, Some(v)) if v.is_empty() => {
                Err("version_policy.specific is empty; name at least one version".into())
            }
            (None, None, Some(v)) => Ok(VersionPolicy::Specific(v.clone())),
            (None, None, None) => Ok(VersionPolicy::default()),
            _ => Err(
                "version_policy takes exactly one of `latest = N`, `all = true`, `specific = [..]`"
                    .into(),
            ),
        }
    }
}

impl VersionPolicy {
    /// The versions to serve out of `found` (sorted ascending), or why none can be.
    pub fn select(&self, found: &[u64]) -> Result<Vec<u64>, String> {
        match self {
            VersionPolicy::Latest(n) => {
                let skip = found.len().saturating_sub(*n as usize);
                Ok(found[skip..].to_vec())
            }
            VersionPolicy::All => Ok(found.to_vec()),
            VersionPolicy::Specific(wanted) => {
                let missing: Vec<String> = wanted
                    .iter()
                    .filter(|v| !found.contains(v))
                    .map(u64::to_string)
                    .collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "version_policy.specific names version(s) {} with no folder; found: {}",
                        missing.join(", "),
                        list(found)
                    ));
                }
                let mut v = wanted.clone();
                v.sort_unstable();
                v.dedup();
                Ok(v)
            }
        }
    }
}

fn list(found: &[u64]) -> String {
    if found.is_empty() {
        return "none".into();
    }
    found
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(latest: Option<u32>, all: Option<bool>, specific: Option<Vec<u64>>) -> PolicyTable {
        PolicyTable {
            latest,
            all,
            specific,
        }
    }

    #[test]
    fn latest_one_is_the_default() {
        let p = table(None, None, None).resolve().unwrap();
        assert_eq!(p, VersionPolicy::Latest(1));
        assert_eq!(p.select(&[1, 2, 3]).unwrap(), vec![3]);
    }

    #[test]
    fn latest_all_and_specific_select_their_versions() {
        let found = [1, 2, 5];
        assert_eq!(VersionPolicy::Latest(2).select(&found).unwrap(), vec![2, 5]);
        assert_eq!(
            VersionPolicy::Latest(9).select(&found).unwrap(),
            vec![1, 2, 5]
        );
        assert_eq!(VersionPolicy::All.select(&found).unwrap(), vec![1, 2, 5]);
        assert_eq!(
            VersionPolicy::Specific(vec![5, 1, 5])
                .select(&found)
                .unwrap(),
            vec![1, 5]
        );
    }

    #[test]
    fn a_specific_version_without_a_folder_is_named() {
        let err = VersionPolicy::Specific(vec![1, 3])
            .select(&[1, 2])
            .unwrap_err();
        assert!(
            err.contains("version(s) 3") && err.contains("found: 1, 2"),
            "{err}"
        );
    }

    #[test]
    fn contradictory_or_empty_policies_are_refused() {
        assert!(table(Some(0), None, None).resolve().is_err());
        assert!(table(Some(1), Some(true), None).resolve().is_err());
        assert!(table(None, Some(false), None).resolve().is_err());
        assert!(table(None, None, Some(vec![])).resolve().is_err());
        assert_eq!(
            table(None, None, Some(vec![2])).resolve().unwrap(),
            VersionPolicy::Specific(vec![2])
        );
    }
}
