//! The Snapshot follows the store: every change shows up, in order, without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::sync::Arc;
use std::time::Duration;

use portcullis_config::model::{
    Backend, CertificateStatus, Domain, IssuerRef, ServiceStatus, VerificationStatus,
};
use portcullis_config::state::ServicePatch;
use portcullis_config::{AliasName, DomainName, EmbeddedStore, SnapshotSync, State, Store, keys};
use time::OffsetDateTime;

const LIVE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn snapshot_follows_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(dir.path().join("s.redb"))
            .await
            .unwrap(),
    );
    let zone = DomainName::parse("app.example.test").unwrap();
    let state = State::new(store.clone(), zone.clone());
    let backend = |s: &str| vec![Backend::parse(s).unwrap()];

    // State written before the sync starts is loaded by it.
    let (before, _) = state
        .create_service(
            backend("10.0.0.1:80"),
            ServiceStatus::Active,
            Default::default(),
            IssuerRef::Dev,
        )
        .await
        .unwrap();
    let sync = SnapshotSync::start(store.clone(), zone.clone())
        .await
        .unwrap();
    let snap = sync.handle.clone();
    assert!(snap.load().service(&before.id).is_some());

    let (svc, rev) = state
        .create_service(
            backend("10.0.0.2:80"),
            ServiceStatus::Active,
            Default::default(),
            IssuerRef::Dev,
        )
        .await
        .unwrap();
    assert!(snap.wait_for(rev, LIVE).await);
    let now = snap.load_full();
    assert_eq!(now.revision(), rev);
    let host = format!("{}.app.example.test", svc.id);
    assert_eq!(now.service_for_host(&host).unwrap().id, svc.id);
    assert_eq!(
        now.service_for_host(&format!("{}:8443", host.to_uppercase()))
            .unwrap()
            .id,
        svc.id,
        "case and port do not matter"
    );
    assert_eq!(
        now.service_for_host(&format!("{host}.")).unwrap().id,
        svc.id
    );
    assert!(
        now.service_for_host(&format!("{}.other.test", svc.id))
            .is_none()
    );
    assert!(now.service_for_host("x.app.example.test").is_none());
    let cert = now
        .certificate(&host)
        .expect("pending certificate created with the service");
    assert_eq!(cert.status, CertificateStatus::Pending);

    // An alias domain routes to its service.
    let alias = Domain {
        verification: VerificationStatus::Verified,
        ..Domain::new(
            AliasName::parse("www.shop.example").unwrap(),
            svc.id,
            "token".into(),
            OffsetDateTime::now_utc(),
        )
    };
    let rev = store
        .put(
            &keys::domain("www.shop.example"),
            serde_json::to_vec(&alias).unwrap(),
        )
        .await
        .unwrap();
    assert!(snap.wait_for(rev, LIVE).await);
    assert_eq!(
        snap.load()
            .service_for_host("WWW.Shop.Example:443")
            .unwrap()
            .id,
        svc.id
    );

    // A burst of updates ends in the last state.
    let mut last = 0;
    for port in 1..=50 {
        let (_, rev) = state
            .update_service(
                &svc.id,
                ServicePatch {
                    backends: Some(backend(&format!("10.0.0.2:{port}"))),
                    ..ServicePatch::default()
                },
            )
            .await
            .unwrap();
        last = rev;
    }
    assert!(snap.wait_for(last, LIVE).await);
    assert_eq!(
        snap.load().service(&svc.id).unwrap().backends,
        backend("10.0.0.2:50")
    );

    // A delete removes the service and its certificate; the alias no longer routes.
    let rev = state.delete_service(&svc.id).await.unwrap();
    assert!(snap.wait_for(rev, LIVE).await);
    let now = snap.load_full();
    assert!(now.service(&svc.id).is_none());
    assert!(now.certificate(&host).is_none());
    assert!(now.service_for_host("www.shop.example").is_none());
    assert!(now.service(&before.id).is_some(), "others untouched");

    // A value that does not decode is skipped, not fatal.
    let rev = store
        .put("services/garbage", b"{not json".to_vec())
        .await
        .unwrap();
    assert!(snap.wait_for(rev, LIVE).await);
    assert_eq!(snap.load().service_count(), 1);

    assert!(
        !snap.wait_for(rev + 100, Duration::from_millis(50)).await,
        "wait_for reports a timeout"
    );
}
