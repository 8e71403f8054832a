//! The router lands with the cluster issue (#3); this crate only reserves its place in the workspace.
