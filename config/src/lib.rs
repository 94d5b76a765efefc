//! portcullis-config owns what every part of a node shares: the configuration file, the domain
//! model (services, domains, records, nodes, certificates, the ACME account, ECH keys) and its
//! validation, the [`store::Store`] trait with its backends, and the [`snapshot::Snapshot`] that
//! the DNS responder, the proxy and the issuers read. It knows nothing of DNS, TLS or ACME
//! protocols; those parts depend on it and never on each other.

pub mod domains;
pub mod error;
pub mod file;
pub mod keys;
pub mod material;
pub mod model;
pub mod names;
pub mod seal;
mod service_index;
pub mod snapshot;
pub mod sockets;
pub mod state;
pub mod store;

pub use error::{StateError, StoreError, ValidationError};
pub use file::{ConfigError, NodeConfig};
pub use material::CertificateMaterial;
pub use model::{Backend, Certificate, Service, ServiceId, ServiceStatus};
pub use names::{AliasName, DomainName};
pub use seal::Sealer;
pub use snapshot::{Changes, Snapshot, SnapshotHandle, SnapshotSync, StoreHealth};
pub use state::State;
pub use store::{EmbeddedStore, Store};
