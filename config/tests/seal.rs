//! Private keys at rest: sealed when a key file is given, opened on read, and sealed anew with
//! the first key after a rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

use std::sync::Arc;

use portcullis_config::model::AcmeAccount;
use portcullis_config::seal::sealed_with;
use portcullis_config::{DomainName, EmbeddedStore, Sealer, State, Store, keys};
use time::OffsetDateTime;

fn account() -> AcmeAccount {
    AcmeAccount {
        directory_url: "https://ca.example.test/dir".into(),
        account_url: "https://ca.example.test/acct/1".into(),
        thumbprint: "abc".into(),
        credentials_json: r#"{"id":"x","key_pkcs8":"SECRET-KEY-MATERIAL"}"#.into(),
        sealed_credentials: None,
        created_at: OffsetDateTime::UNIX_EPOCH,
    }
}

#[tokio::test]
async fn the_account_key_is_sealed_and_sealed_anew_after_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open(dir.path().join("s.redb"))
            .await
            .unwrap(),
    );
    let zone = DomainName::parse("app.example.test").unwrap();
    let old_line = Sealer::new_key_line("old").unwrap();
    let new_line = Sealer::new_key_line("new").unwrap();

    // Stored before any key file: in the clear, and sealed once a key is given.
    let plain = State::new(store.clone(), zone.clone());
    plain.put_account(&account()).await.unwrap();
    let raw = store.get(keys::ACME_ACCOUNT).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&raw.value).contains("SECRET-KEY-MATERIAL"));
    let old = State::new(store.clone(), zone.clone())
        .with_sealer(Arc::new(Sealer::parse(&old_line).unwrap()));
    assert!(old.reseal_account().await.unwrap());
    assert!(
        !old.reseal_account().await.unwrap(),
        "already sealed with the first key"
    );
    let raw = store.get(keys::ACME_ACCOUNT).await.unwrap().unwrap();
    assert!(!String::from_utf8_lossy(&raw.value).contains("SECRET-KEY-MATERIAL"));
    assert_eq!(old.get_account().await.unwrap().unwrap(), account());

    // Rotated: the new key first, the old one after; the account opens, then moves to the new.
    let rotated = State::new(store.clone(), zone.clone()).with_sealer(Arc::new(
        Sealer::parse(&format!("{new_line}\n{old_line}\n")).unwrap(),
    ));
    assert_eq!(rotated.get_account().await.unwrap().unwrap(), account());
    assert!(rotated.reseal_account().await.unwrap());
    let raw = store.get(keys::ACME_ACCOUNT).await.unwrap().unwrap();
    let stored: AcmeAccount = serde_json::from_slice(&raw.value).unwrap();
    use base64::Engine as _;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(stored.sealed_credentials.unwrap())
        .unwrap();
    assert_eq!(sealed_with(&sealed), Some("new"));
    // A node given only the old key cannot open it, and says which key it needs.
    let err = old.get_account().await.unwrap_err().to_string();
    assert!(err.contains("`new`"), "{err}");
    // A node with no key at all is told to get the fleet's key file.
    let err = plain.get_account().await.unwrap_err().to_string();
    assert!(err.contains("encryption_key_file"), "{err}");
}
