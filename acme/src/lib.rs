//! portcullis-acme keeps every name the platform serves covered by a valid certificate, and
//! verifies through public DNS that alias domains point at their services. It owns
//! the [`Issuer`] seam (the local dev CA, an ACME CA), and the [`CertificateManager`] loop
//! that reads the Snapshot, finds names without a usable certificate, issues, and writes the
//! result to the store. It knows nothing of TLS serving or DNS answering: the proxy and the DNS
//! responder see its work only through the Snapshot.

mod acme;
mod dev;
mod issuer;
mod manager;
pub mod verifier;
pub mod verify;

pub use acme::AcmeIssuer;
pub use dev::DevCa;
pub use issuer::{
    Challenge, Dns01, IssueError, Issued, Issuer, NoProgress, Progress, StoreDns01, WaitLive,
};
pub use manager::{CertificateManager, FleetSlots, Preflight, RenewalPolicy};
pub use verifier::{DomainVerifier, FleetLock, VerifyPolicy};
pub use verify::PublicDns;
