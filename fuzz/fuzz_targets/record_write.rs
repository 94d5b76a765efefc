//! Any JSON as a record set written through the records API: the API's check either refuses
//! it (a 4xx) or every question about its name is then answered, over UDP and TCP, with an
//! answer that encodes and parses, never SERVFAIL.

#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use libfuzzer_sys::fuzz_target;
use portcullis_config::file::NodeConfig;
use portcullis_config::model::Record;
use portcullis_config::names::DomainName;
use portcullis_config::store::KeyValue;
use portcullis_config::{Snapshot, keys};
use portcullis_dns::answer::{self, Transport};
use portcullis_dns::{ZoneSettings, view};

fn settings() -> (ZoneSettings, DomainName) {
    let mut config = NodeConfig::dev(Path::new("/nonexistent"));
    config.zone.name = DomainName::parse("app.example").unwrap_or_else(|_| unreachable!());
    config.dns.zones = vec![DomainName::parse("internal").unwrap_or_else(|_| unreachable!())];
    let settings = ZoneSettings::from_config(&config).unwrap_or_else(|e| panic!("{e}"));
    (settings, config.zone.name)
}

fuzz_target!(|data: &[u8]| {
    let Ok(record) = serde_json::from_slice::<Record>(data) else {
        return;
    };
    let (settings, zone) = settings();
    let empty = Snapshot::empty(zone.clone());
    if portcullis_dns::check_record(&record, &settings, &empty).is_err() {
        return;
    }
    let kv = KeyValue {
        key: format!("{}{}/{}", keys::RECORDS, record.name, record.rtype.as_str()),
        value: serde_json::to_vec(&record).unwrap_or_default(),
        create_revision: 2,
        mod_revision: 2,
        version: 1,
        lease: None,
    };
    let snapshot = Snapshot::from_kvs(zone, 2, &[kv]);
    let views = view::fixed(Arc::new(snapshot), Arc::new(settings));
    let view = views.load();
    let Ok(name) = Name::from_ascii(&record.name) else {
        panic!("an accepted record's name does not parse: {}", record.name);
    };
    let own: RecordType = record.rtype.as_str().parse().unwrap_or(RecordType::A);
    for rtype in [own, RecordType::ANY, RecordType::TXT] {
        let mut request = Message::query();
        request.add_query(Query::query(name.clone(), rtype));
        let Ok(bytes) = request.to_vec() else {
            continue;
        };
        for transport in [Transport::Udp, Transport::Tcp] {
            let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let reply = answer::answer_bytes(&view.zone, &bytes, transport, 1232, client)
                .unwrap_or_else(|| panic!("no answer for {name} {rtype}"));
            let reply = Message::from_vec(&reply).unwrap_or_else(|e| panic!("{e}"));
            assert_ne!(
                reply.metadata.response_code,
                ResponseCode::ServFail,
                "{record:?} accepted, then SERVFAIL for {rtype} over {transport:?}"
            );
        }
    }
});
