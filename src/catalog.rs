//! The workflow catalogue: every `manifests/<id>/manifest.yaml` with its `workflow.json`,
//! parsed and cross-checked once at start-up.
//!
//! The shipped workflows are compiled into the binary ([`WorkflowCatalog::builtin`]) so
//! `comfyfleet` runs from any directory; [`WorkflowCatalog::load_dir`] reads a directory
//! of the same shape for operators who ship their own. Both go through one parser, and a
//! broken catalogue is refused whole, with every problem named by file and field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::domain::graph::{ApiGraph, ComfyValidationError};
use crate::domain::manifest::{InvalidWorkflowId, Manifest, ManifestError, WorkflowId};

/// One workflow: its manifest and the ComfyUI graph the manifest's inputs bind into.
#[derive(Clone, Debug, PartialEq)]
pub struct Workflow {
    pub manifest: Manifest,
    pub graph: ApiGraph,
}

impl Workflow {
    pub fn id(&self) -> &WorkflowId {
        &self.manifest.id
    }

    /// Node classes a worker must offer to run this workflow: declared ∪ used.
    pub fn required_nodes(&self) -> BTreeSet<String> {
        self.manifest.required_nodes(&self.graph)
    }
}

/// All known workflows, by id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkflowCatalog {
    workflows: BTreeMap<WorkflowId, Workflow>,
}

/// One problem in a catalogue, named by the file it is in.
#[derive(Debug, thiserror::Error)]
pub enum CatalogProblem {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Yaml {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: folder name is not a workflow id: {source}")]
    FolderName {
        path: String,
        #[source]
        source: InvalidWorkflowId,
    },
    #[error("{path}: {source}")]
    Manifest {
        path: String,
        #[source]
        source: ManifestError,
    },
    #[error("{path}: {source}")]
    Graph {
        path: String,
        /// Boxed: ComfyUI's body is large and this enum travels in every `Result` here.
        #[source]
        source: Box<ComfyValidationError>,
    },
}

/// A catalogue that cannot be used; lists every problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid workflow catalogue:\n{}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct CatalogError {
    pub problems: Vec<CatalogProblem>,
}

/// The shipped manifests, embedded at compile time: (folder, manifest.yaml, workflow.json).
const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "invert-image",
        include_str!("../manifests/invert-image/manifest.yaml"),
        include_str!("../manifests/invert-image/workflow.json"),
    ),
    (
        "solid-color",
        include_str!("../manifests/solid-color/manifest.yaml"),
        include_str!("../manifests/solid-color/workflow.json"),
    ),
    (
        "sdxl-txt2img",
        include_str!("../manifests/sdxl-txt2img/manifest.yaml"),
        include_str!("../manifests/sdxl-txt2img/workflow.json"),
    ),
    (
        "wan-i2v-14b",
        include_str!("../manifests/wan-i2v-14b/manifest.yaml"),
        include_str!("../manifests/wan-i2v-14b/workflow.json"),
    ),
];

impl WorkflowCatalog {
    /// The workflows shipped in `manifests/`, as compiled in.
    pub fn builtin() -> Result<Self, CatalogError> {
        Self::from_sources(
            BUILTIN.iter().map(|(folder, yaml, json)| {
                (
                    (*folder).to_owned(),
                    Ok(((*yaml).to_owned(), (*json).to_owned())),
                )
            }),
            Path::new("manifests"),
        )
    }

    /// Reads every `<dir>/*/manifest.yaml` and its `workflow.json`. Folders without a
    /// `manifest.yaml` are skipped.
    pub fn load_dir(dir: &Path) -> Result<Self, CatalogError> {
        let entries = std::fs::read_dir(dir).map_err(|source| CatalogError {
            problems: vec![CatalogProblem::Read {
                path: dir.display().to_string(),
                source,
            }],
        })?;
        let mut folders: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join("manifest.yaml").is_file())
            .collect();
        folders.sort();
        let sources = folders.into_iter().map(|folder| {
            let name = folder
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let read = |file: &str| {
                let path = folder.join(file);
                std::fs::read_to_string(&path).map_err(|source| CatalogProblem::Read {
                    path: path.display().to_string(),
                    source,
                })
            };
            (
                name,
                read("manifest.yaml").and_then(|y| Ok((y, read("workflow.json")?))),
            )
        });
        Self::from_sources(sources, dir)
    }

    fn from_sources(
        sources: impl Iterator<Item = (String, Result<(String, String), CatalogProblem>)>,
        root: &Path,
    ) -> Result<Self, CatalogError> {
        let mut workflows = BTreeMap::new();
        let mut problems = Vec::new();
        for (folder, files) in sources {
            let manifest_path = root
                .join(&folder)
                .join("manifest.yaml")
                .display()
                .to_string();
            let graph_path = root
                .join(&folder)
                .join("workflow.json")
                .display()
                .to_string();
            let (yaml, json) = match files {
                Ok(f) => f,
                Err(p) => {
                    problems.push(p);
                    continue;
                }
            };
            match parse_one(&folder, &yaml, &json, &manifest_path, &graph_path) {
                Ok(w) => {
                    workflows.insert(w.manifest.id.clone(), w);
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        if problems.is_empty() {
            Ok(Self { workflows })
        } else {
            Err(CatalogError { problems })
        }
    }

    pub fn get(&self, id: &WorkflowId) -> Option<&Workflow> {
        self.workflows.get(id)
    }

    /// All workflows, ordered by id.
    pub fn list(&self) -> impl Iterator<Item = &Workflow> {
        self.workflows.values()
    }

    pub fn len(&self) -> usize {
        self.workflows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workflows.is_empty()
    }

    /// Node classes the workflow needs (declared ∪ graph class types).
    pub fn required_nodes(&self, id: &WorkflowId) -> Option<BTreeSet<String>> {
        self.get(id).map(Workflow::required_nodes)
    }
}

fn parse_one(
    folder: &str,
    yaml: &str,
    json: &str,
    manifest_path: &str,
    graph_path: &str,
) -> Result<Workflow, Vec<CatalogProblem>> {
    let mut problems = Vec::new();
    if let Err(source) = WorkflowId::parse(folder) {
        problems.push(CatalogProblem::FolderName {
            path: manifest_path.to_owned(),
            source,
        });
    }
    let manifest: Option<Manifest> = serde_yaml::from_str(yaml)
        .map_err(|source| {
            problems.push(CatalogProblem::Yaml {
                path: manifest_path.to_owned(),
                source,
            })
        })
        .ok();
    let graph: Option<ApiGraph> = serde_json::from_str(json)
        .map_err(|source| {
            problems.push(CatalogProblem::Json {
                path: graph_path.to_owned(),
                source,
            })
        })
        .ok();
    if let Some(Err(source)) = graph.as_ref().map(ApiGraph::check_structure) {
        problems.push(CatalogProblem::Graph {
            path: graph_path.to_owned(),
            source: Box::new(source),
        });
    }
    if let Some(manifest) = &manifest {
        let manifest_problem = |source| CatalogProblem::Manifest {
            path: manifest_path.to_owned(),
            source,
        };
        if let Err(e) = manifest.check_folder(folder) {
            problems.push(manifest_problem(e));
        }
        if let Some(Err(errors)) = graph.as_ref().map(|g| manifest.validate(g)) {
            problems.extend(errors.into_iter().map(manifest_problem));
        }
    }
    match (manifest, graph) {
        (Some(manifest), Some(graph)) if problems.is_empty() => Ok(Workflow { manifest, graph }),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests;
