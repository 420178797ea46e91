//! The state model: Kubernetes objects from a source (a folder of YAML files
//! today; the API server later), and the view derived from them.

pub mod files;
pub mod model;
pub mod objects;

pub use self::model::{Backend, NodeInfo, ServiceView, Snapshot, Workload};
pub use self::objects::{Object, ObjectError, ObjectKey};
